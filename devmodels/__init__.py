"""Random-weight models in the official layouts, for tests and for the main job's embedded default."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..utils.files import atomic_write


def save_official_pickle(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a plain state dict with ``torch.save``, atomically.

    Only for imitating official upstream files (which are pickles) in tests and demos; FaceBooth's own files
    are always safetensors.
    """
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
