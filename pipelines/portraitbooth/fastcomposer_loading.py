"""Read FastComposer's published checkpoint and our STEA files.

FastComposer's ``pytorch_model.bin`` (mit-han-lab/fastcomposer, MIT) is the whole training model's state
dict, read here with ``torch.load(weights_only=True)`` only. Its prefixes and quirks:

* ``unet.*``: the fine-tuned SD1.5 UNet in diffusers layout -> converted to the original LDM layout
  (``model.diffusion_model.*``) that ComfyUI's checkpoint loader reads;
* ``vae.*``: the SD VAE in diffusers layout with the **pre-0.17 attention names** (``query``, ``key``,
  ``value``, ``proj_attn``) -> LDM ``first_stage_model.*`` (1x1-conv attention weights);
* ``text_encoder.*``: the CLIP-L text model **without the ``text_model.`` level**, with a persistent
  ``position_ids`` buffer -> ``cond_stage_model.transformer.text_model.*``;
* ``image_encoder.vision_model.*`` + ``image_encoder.visual_projection.weight``: the CLIP-L/14 vision tower
  (last layers fine-tuned) with persistent ``position_ids`` -> a transformers CLIPVisionModelWithProjection;
* ``postfuse_module.*``: the STEA fuse MLP.

Frozen parts are stored bf16 and trained parts fp32; everything we build runs in float32 unless asked.

Our own STEA files are safetensors: ``stea.*`` (the fuse MLP, FastComposer's key names under a new prefix),
optionally ``image_encoder.*``, and metadata ``method=portraitbooth``, ``component=stea``, ``config`` (JSON).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ...utils.config import ConfigError
from ...utils.files import UnsafeFileError, atomic_save_safetensors, load_state_dict_file
from ...utils.state_dict import StateDictMismatchError, load_strict
from ..clip_vision import clip_vision_sizes
from ..ldm_keys import (
    LDM_CLIP,
    LDM_UNET,
    LDM_VAE,
    LDMKeyError,
    clip_text_to_ldm,
    unet_diffusers_to_ldm,
    vae_diffusers_to_ldm,
)
from .stea import STEAConfig, STEAModel, config_from_fuse_state_dict

log = logging.getLogger(__name__)

METHOD = "portraitbooth"
COMPONENT = "stea"
FORMAT_VERSION = "1"

FC_PREFIXES = ("unet.", "vae.", "text_encoder.", "image_encoder.", "postfuse_module.")


class FastComposerWeightsError(ValueError):
    """A file is not a FastComposer / PortraitBooth checkpoint, or is damaged."""


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors, or a weights-only pickle memory-mapped (FastComposer's file is 4.5 GB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weight file not found: {path}")
    if path.suffix.lower() in (".safetensors", ".sft"):
        try:
            return load_state_dict_file(path)
        except UnsafeFileError as exc:
            raise FastComposerWeightsError(str(exc)) from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:  # legacy (non-zip) pickles cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _pickle_error(path, exc) from exc
    except Exception as exc:
        raise _pickle_error(path, exc) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FastComposerWeightsError(f"{path.name} does not hold a flat dictionary of tensors.")
    return dict(obj), {}


def _pickle_error(path: Path, exc: Exception) -> FastComposerWeightsError:
    return FastComposerWeightsError(
        f"{path.name} could not be read as a weights-only checkpoint ({type(exc).__name__}: {exc}). FaceBooth never "
        "unpickles arbitrary objects. Download FastComposer's pytorch_model.bin again (it is 4.5 GB; a truncated "
        "download fails like this) or convert the file to .safetensors."
    )


def is_fastcomposer_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("postfuse_module.") for k in sd) and any(k.startswith("unet.") for k in sd)


@dataclass
class FastComposerParts:
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    image_encoder: dict[str, torch.Tensor]
    postfuse: dict[str, torch.Tensor]


def split_fastcomposer(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> FastComposerParts:
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in FC_PREFIXES}
    other = []
    for key, value in sd.items():
        prefix = next((p for p in FC_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            other.append(key)
        else:
            parts[prefix][key[len(prefix):]] = value
    missing = [p.rstrip(".") for p, d in parts.items() if not d]
    if missing:
        hint = ""
        if "postfuse_module" in missing and any(k.startswith("stea.") for k in sd):
            hint = " It looks like a FaceBooth STEA file: load it with the STEA loader."
        raise FastComposerWeightsError(
            f"{name} is not a FastComposer checkpoint: no {', '.join(missing)} weights "
            f"(FastComposer's pytorch_model.bin has unet., vae., text_encoder., image_encoder. and postfuse_module.).{hint}"
        )
    if other:
        log.info("FastComposer %s: ignoring %d unrecognised keys (e.g. %s)", name, len(other), other[:3])
    return FastComposerParts(
        unet=parts["unet."], vae=parts["vae."], text_encoder=parts["text_encoder."],
        image_encoder=parts["image_encoder."], postfuse=parts["postfuse_module."],
    )


# ----------------------------------------------------------------------------------------------------
# diffusers -> LDM key conversion (the block numbering lives in pipelines/ldm_keys.py)
# ----------------------------------------------------------------------------------------------------


def text_encoder_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FastComposer's text encoder (no ``text_model.`` level, persistent position_ids) -> keys under
    ``text_model.`` as in Hugging Face files, without the position_ids buffer (every loader rebuilds it)."""
    return {"text_model." + k: v for k, v in clip_text_to_ldm(sd).items()}


def fastcomposer_to_ldm_checkpoint(parts: FastComposerParts) -> dict[str, torch.Tensor]:
    """An SD1.x checkpoint in the original LDM layout (what ComfyUI's checkpoint loader reads):
    the fine-tuned UNet, the VAE and the text encoder from the FastComposer file."""
    try:
        sd = {LDM_UNET + k: v for k, v in unet_diffusers_to_ldm(parts.unet).items()}
        sd.update({LDM_VAE + k: v for k, v in vae_diffusers_to_ldm(parts.vae).items()})
    except LDMKeyError as exc:
        raise FastComposerWeightsError(str(exc)) from exc
    sd.update({LDM_CLIP + k: v for k, v in clip_text_to_ldm(parts.text_encoder).items()})
    return sd


# ----------------------------------------------------------------------------------------------------
# STEA modules from state dicts
# ----------------------------------------------------------------------------------------------------


def _strict_load(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    try:
        load_strict(module, sd, source="The file", network=what, assign=assign,
                    hint="The file is damaged or of another model.")
    except StateDictMismatchError as exc:
        raise FastComposerWeightsError(str(exc)) from exc


def image_encoder_config(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None):
    """transformers CLIPVisionConfig read off the weights (ViT-L/14 for FastComposer). The head count is not
    in the weights: 64-wide heads, as in every OpenAI CLIP vision tower, unless ``num_heads`` is given."""
    from transformers import CLIPVisionConfig

    try:
        sizes = clip_vision_sizes(sd)
    except ValueError as exc:
        raise FastComposerWeightsError(f"The image encoder: {exc}") from exc
    heads = num_heads or max(1, sizes["hidden_size"] // 64)
    return CLIPVisionConfig(**sizes, num_attention_heads=heads, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def image_encoder_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> nn.Module:
    """``vision_model.*`` + ``visual_projection.weight`` -> transformers CLIPVisionModelWithProjection (fp32, eval)."""
    from transformers import CLIPVisionModelWithProjection

    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    config = image_encoder_config(sd, num_heads)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    _strict_load(model, sd, "CLIP image encoder", assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers stay on meta: rebuild them
        if buf.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer(name.rsplit(".", 1)[1], torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
    return model.float().eval().requires_grad_(False)


def stea_from_fastcomposer(parts: FastComposerParts, source: str = "FastComposer") -> STEAModel:
    config = config_from_fuse_state_dict(parts.postfuse, feature_source="clip_image")
    model = STEAModel(config, image_encoder=image_encoder_from_state_dict(parts.image_encoder), source=source)
    _strict_load(model.fuse, parts.postfuse, "FastComposer post-fuse")
    model.metadata = {"method": "fastcomposer", "base_model": "sd15"}
    return model.eval().requires_grad_(False)


def load_fastcomposer(path: str | os.PathLike) -> tuple[FastComposerParts, STEAModel]:
    """FastComposer's pytorch_model.bin -> (its parts, the STEA with its image encoder)."""
    sd, _ = read_weights(path)
    parts = split_fastcomposer(sd, Path(path).name)
    stea = stea_from_fastcomposer(parts, source=Path(path).name)
    log.info("FastComposer %s: post-fuse %d+%d -> %d, CLIP image encoder %d layers.", Path(path).name,
             stea.config.text_dim, stea.config.feature_dim, stea.config.text_dim,
             stea.image_encoder.config.num_hidden_layers)
    return parts, stea


# ----------------------------------------------------------------------------------------------------
# Our STEA files
# ----------------------------------------------------------------------------------------------------


def save_stea(model: STEAModel, path: str | os.PathLike, extra_metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomic safetensors: ``stea.*`` (+ ``image_encoder.*`` when present) and the config as metadata."""
    tensors = {f"stea.{k}": v for k, v in model.fuse.state_dict().items()}
    if model.image_encoder is not None:
        tensors.update({f"image_encoder.{k}": v for k, v in model.image_encoder.state_dict().items() if not k.endswith("position_ids")})
    meta = {
        "method": METHOD, "component": COMPONENT, "format_version": FORMAT_VERSION, **model.config.to_metadata(),
        "base_model": "sd1" if model.config.text_dim == 768 else f"text_width_{model.config.text_dim}",
    }
    meta.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    return atomic_save_safetensors(tensors, path, meta)


def stea_from_state_dict(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], name: str = "STEA file") -> STEAModel:
    if meta.get("method") not in (None, METHOD) or meta.get("component") not in (None, COMPONENT):
        raise FastComposerWeightsError(f"{name} is a {meta.get('method')}/{meta.get('component')} file, not a PortraitBooth STEA file.")
    fuse = {k[len("stea."):]: v for k, v in sd.items() if k.startswith("stea.")}
    if not fuse:
        raise FastComposerWeightsError(f"{name} has no stea.* weights; it is not a PortraitBooth STEA file.")
    try:
        stored = STEAConfig.from_metadata(meta, source=name)  # validates source and layers
    except ConfigError as exc:
        raise FastComposerWeightsError(str(exc)) from exc
    overrides: dict[str, Any] = {}
    if stored is not None:
        overrides = {"feature_source": stored.feature_source, "arcface_layers": stored.arcface_layers,
                     "layer_norm_eps": stored.layer_norm_eps}
    config = config_from_fuse_state_dict(fuse, **overrides)
    if stored is not None and (stored.text_dim, stored.feature_dim) != (config.text_dim, config.feature_dim):
        raise FastComposerWeightsError(
            f"{name}: metadata says {stored.text_dim}+{stored.feature_dim} but the weights are "
            f"{config.text_dim}+{config.feature_dim}; the file is damaged."
        )
    image_sd = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    encoder = image_encoder_from_state_dict(image_sd) if image_sd else None
    model = STEAModel(config, image_encoder=encoder, source=name)
    _strict_load(model.fuse, fuse, "STEA")
    model.metadata = dict(meta)
    return model.eval().requires_grad_(False)


def load_stea(path: str | os.PathLike) -> STEAModel:
    """Our STEA safetensors, or FastComposer's pytorch_model.bin (its post-fuse MLP and image encoder)."""
    sd, meta = read_weights(path)
    name = Path(path).name
    if is_fastcomposer_state_dict(sd):
        return stea_from_fastcomposer(split_fastcomposer(sd, name), source=name)
    return stea_from_state_dict(sd, meta, name)
