"""Random-weight Face2Diffusion files in the official layout, for demo runs and tests.

* ``write_random_msid``: the MSID encoder, like the official ``msid.pt``.
* ``write_random_mapping``: the mapping networks, like the official ``mapping.pt``.

A ``.pt``/``.pth`` path gets a plain ``torch.save`` of the state dict with the official keys and shapes, as the
upstream files are (loadable with ``weights_only=True``). A ``.safetensors`` path gets FaceBooth's own format
(``loading.save_msid`` / ``save_mapping``, with metadata). The defaults are the official sizes. Smaller
configs give tiny files with the same key layout, for fast tests.

Random weights mean nothing; they exercise loading, shapes and plumbing. The MSID BatchNorms get random
running statistics, so eval-mode BatchNorm counts in every comparison. The mapping's output layer is scaled
so the word vectors have the size of CLIP token embeddings. Sampling with the random SD1.5 checkpoint then
stays numerically tame.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from . import save_by_suffix
from ..pipelines.face2diffusion.loading import save_mapping, save_msid
from ..pipelines.face2diffusion.mapping import F2DMapping, F2DMappingConfig
from ..pipelines.face2diffusion.msid import MSIDConfig, MSIDEncoder

PathLike = Union[str, os.PathLike]

MSID_FILE = "msid.pt"  # the official names; the loader node offers them first
MAPPING_FILE = "mapping.pt"
WORD_VECTOR_STD = 0.02  # about the spread of CLIP-L token embeddings


def random_msid(seed: int = 0, config: Optional[MSIDConfig] = None) -> MSIDEncoder:
    """An MSID encoder with seeded random weights (ViT init) and random BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MSIDEncoder(config or MSIDConfig())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.startswith("norms.") and name.endswith(".weight"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
            elif name.startswith("norms.") and name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def random_mapping(seed: int = 0, config: Optional[F2DMappingConfig] = None) -> F2DMapping:
    """Mapping networks with seeded random weights; outputs about the size of CLIP token embeddings."""
    gen = torch.Generator().manual_seed(seed + 1)
    cfg = config or F2DMappingConfig()
    model = F2DMapping(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "null_exp":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".weight"):
                fan_in = p.shape[1]
                # He init for the hidden layers; the output layer is scaled down to word-embedding size.
                std = (2.0 / fan_in) ** 0.5 if ".layers." in name else WORD_VECTOR_STD * 2.0 / fan_in**0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _write(model: torch.nn.Module, path: PathLike, save_ours, seed: int) -> Path:
    return save_by_suffix(path, model.state_dict,
                          lambda p: save_ours(model, p, {"weights": "random", "random_seed": str(seed)}))


def write_random_msid(path: PathLike, seed: int = 0, config: Optional[MSIDConfig] = None) -> Path:
    """Write a random MSID encoder (official ``msid.pt`` layout for .pt, FaceBooth safetensors otherwise)."""
    return _write(random_msid(seed, config), path, save_msid, seed)


def write_random_mapping(path: PathLike, seed: int = 0, config: Optional[F2DMappingConfig] = None) -> Path:
    """Write random mapping networks (official ``mapping.pt`` layout for .pt, FaceBooth safetensors otherwise)."""
    return _write(random_mapping(seed, config), path, save_mapping, seed)


def write_random_pair(folder: PathLike, seed: int = 0, msid_config: Optional[MSIDConfig] = None,
                      mapping_config: Optional[F2DMappingConfig] = None) -> tuple[Path, Path]:
    """``msid.pt`` and ``mapping.pt`` that fit together, in ``folder`` (e.g. models/facebooth/face2diffusion)."""
    folder = Path(folder)
    msid_cfg = msid_config or MSIDConfig()
    map_cfg = mapping_config or F2DMappingConfig(id_dim=msid_cfg.feature_dim)
    if map_cfg.id_dim != msid_cfg.feature_dim:
        raise ValueError(f"The mapping takes {map_cfg.id_dim}-d identities but the MSID encoder makes {msid_cfg.feature_dim}-d ones.")
    return (write_random_msid(folder / MSID_FILE, seed, msid_cfg), write_random_mapping(folder / MAPPING_FILE, seed, map_cfg))
