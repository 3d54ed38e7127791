"""InstantBooth weight files: ``models/facebooth/instantbooth/<name>.safetensors``.

Keys: the state dict of :class:`~.model.InstantBoothModel` (see the key table there), fp32 or fp16.
Metadata (all strings):

==================  ===============================================================================
``method``          ``instantbooth``
``format``          ``facebooth.instantbooth``
``format_version``  ``1``
``base_model``      ``sd15`` (the UNet family the adapters were made for)
``config``          JSON: clip_hidden_dim, clip_global_dim, text_dim, patch_dim, num_heads, identifier,
                    class_nouns, adapters (LDM block path -> width)
``clip_vision``     which CLIP vision backbone the heads expect, in words (e.g. "ViT-L/14 224 px")
``trained_steps``   optional, from the training script
==================  ===============================================================================

Shapes are checked against the metadata on load; a file without ``config`` metadata is read from its shapes
(num_heads 8, identifier "sks").
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional

import torch

from ...utils.config import ConfigError
from ...utils.files import atomic_save_safetensors, load_state_dict_file
from .model import InstantBoothConfig, InstantBoothModel

log = logging.getLogger(__name__)

FORMAT = "facebooth.instantbooth"
FORMAT_VERSION = "1"


class InstantBoothFileError(ValueError):
    """The file is not a usable InstantBooth weight file."""


def save_instantbooth(
    model: InstantBoothModel,
    path: str | os.PathLike,
    metadata: Optional[Mapping[str, object]] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {
        "method": "instantbooth",
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": "sd15",
        **model.config.to_metadata(),
        "clip_vision": f"CLIP vision with width {model.config.clip_hidden_dim} and image-embedding width {model.config.clip_global_dim}",
    }
    meta.update({str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    atomic_save_safetensors(sd, path, meta)


def _config_from_shapes(sd: Mapping[str, torch.Tensor], stored: Optional[InstantBoothConfig]) -> InstantBoothConfig:
    try:
        concept_w = sd["concept_encoder.fc.weight"]
        patch_w = sd["patch_encoder.fc.weight"]
    except KeyError as exc:
        raise InstantBoothFileError(f"No {exc.args[0]} in the file: it is not an InstantBooth weight file.") from None
    adapters = {
        k[len("adapters."): -len(".linear.weight")]: int(v.shape[0])
        for k, v in sd.items()
        if k.startswith("adapters.") and k.endswith(".linear.weight")
    }
    if not adapters:
        raise InstantBoothFileError("The file has no adapter weights (adapters.*): it is not an InstantBooth weight file.")
    cfg = InstantBoothConfig(
        clip_hidden_dim=int(patch_w.shape[1]),
        clip_global_dim=int(concept_w.shape[1]),
        text_dim=int(concept_w.shape[0]),
        patch_dim=int(patch_w.shape[0]),
        adapters=adapters,
    )
    if stored is None:
        return cfg
    for name in ("clip_hidden_dim", "clip_global_dim", "text_dim", "patch_dim"):
        if getattr(stored, name) != getattr(cfg, name):
            raise InstantBoothFileError(f"The file's metadata says {name}={getattr(stored, name)} but its weights say {getattr(cfg, name)}.")
    if stored.adapters and {k: int(v) for k, v in stored.adapters.items()} != adapters:
        raise InstantBoothFileError("The file's adapter list in the metadata does not match its weights; the file is damaged.")
    cfg.num_heads = stored.num_heads
    cfg.identifier = stored.identifier or cfg.identifier
    cfg.class_nouns = stored.class_nouns or cfg.class_nouns
    return cfg


def load_instantbooth(path: str | os.PathLike) -> InstantBoothModel:
    """Read a file written by :func:`save_instantbooth` (or the training script) into an fp32 eval-mode model."""
    sd, meta = load_state_dict_file(path)
    fmt = meta.get("format")
    if fmt is not None and fmt != FORMAT:
        raise InstantBoothFileError(f"{os.path.basename(str(path))} is a '{fmt}' file, not an InstantBooth file.")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise InstantBoothFileError(
            f"{os.path.basename(str(path))} has format version {meta.get('format_version')}; this FaceBooth reads version "
            f"{FORMAT_VERSION}. Update FaceBooth."
        )
    try:
        stored = InstantBoothConfig.from_metadata(meta, source=os.path.basename(str(path)))
    except ConfigError as exc:
        raise InstantBoothFileError(str(exc)) from exc
    cfg = _config_from_shapes(sd, stored)
    model = InstantBoothModel(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InstantBoothFileError(f"{os.path.basename(str(path))} does not match the InstantBooth layout ({what}).")
    log.info("InstantBooth: %d adapters, CLIP %d/%d -> text %d, patch %d", len(cfg.adapters), cfg.clip_hidden_dim,
             cfg.clip_global_dim, cfg.text_dim, cfg.patch_dim)
    return model.eval().requires_grad_(False)
