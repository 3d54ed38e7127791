"""Random-weight BiSeNet face-parsing files in the official ``parsing_bisenet.pth`` layout, for integration runs.

The weights are random, so the labels mean nothing; the file exercises loading, preprocessing and mask
plumbing. Convolutions get He-scaled normal weights and BatchNorm layers random affine parameters and
running statistics, so eval-mode BatchNorm is exercised and the logits vary across the image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from . import save_by_suffix
from ..pipelines.face.parsing import bisenet_class
from ..utils.files import atomic_save_safetensors


def random_bisenet_state_dict(seed: int = 0, num_classes: int = 19) -> dict[str, torch.Tensor]:
    """State dict with the official key names and shapes (facexlib's BiSeNet: needs facexlib) and seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # only names and shapes are needed
        state = bisenet_class()(num_class=num_classes).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        if not ref.is_floating_point():  # num_batches_tracked
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype)
        elif ref.dim() == 4:
            fan_in = ref.shape[1] * ref.shape[2] * ref.shape[3]
            out[key] = torch.randn(ref.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(ref.shape, generator=gen)
        elif key.endswith(".weight"):  # BatchNorm scale
            out[key] = 0.5 + 0.5 * torch.rand(ref.shape, generator=gen)
        else:  # BatchNorm shift and running mean
            out[key] = 0.1 * torch.randn(ref.shape, generator=gen)
    return out


def write_random_bisenet(path: Union[str, os.PathLike], seed: int = 0) -> Path:
    """Write a random BiSeNet to ``path``: a plain torch state-dict pickle for ``.pth``/``.pt`` (as the official
    file is), safetensors for ``.safetensors``. Either way the write is atomic."""
    state = random_bisenet_state_dict(seed)
    return save_by_suffix(path, lambda: state, lambda p: atomic_save_safetensors(
        state, p, {"model": "bisenet-face-parsing", "random_seed": str(seed)}))
