"""Random-weight models in the official layouts, for tests and for the main job's embedded default."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..utils.files import atomic_write


def save_official_pickle(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a plain state dict with ``torch.save``, atomically.

    Only for imitating official upstream files (which are pickles) in tests and demos; FaceBooth's own files
    are always safetensors.
    """
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_by_suffix(path: str | os.PathLike, state: Callable[[], dict[str, torch.Tensor]],
                   save_ours: Callable[[Path], Path]) -> Path:
    """``.safetensors`` / ``.sft``: ``save_ours(path)`` (FaceBooth's file, with metadata); ``.pt`` / ``.pth``: the
    plain state-dict pickle an official release ships, of contiguous CPU tensors and nothing else. ``state`` is
    called only for the pickle."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return save_ours(path)
    if suffix not in (".pt", ".pth"):
        raise ValueError(f"Give the file a .pt, .pth or .safetensors suffix, not {path.name!r}.")
    return save_official_pickle({k: v.detach().cpu().contiguous().clone() for k, v in state().items()}, path)
