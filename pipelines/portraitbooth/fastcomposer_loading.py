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

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ...utils.files import UnsafeFileError, atomic_save_safetensors, load_state_dict_file
from .stea import STEAConfig, STEAModel, config_from_fuse_state_dict

log = logging.getLogger(__name__)

METHOD = "portraitbooth"
COMPONENT = "stea"
FORMAT_VERSION = "1"

FC_PREFIXES = ("unet.", "vae.", "text_encoder.", "image_encoder.", "postfuse_module.")
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer.text_model."


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
# diffusers -> LDM key conversion
# ----------------------------------------------------------------------------------------------------

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
# New (diffusers >= 0.17) and old attention names in the VAE's mid block -> LDM's 1x1-conv attention.
_VAE_ATTN = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("query", "q"),
    ("to_k", "k"),
    ("key", "k"),
    ("to_v", "v"),
    ("value", "v"),
    ("to_out.0", "proj_out"),
    ("proj_attn", "proj_out"),
)


def _rename(leaf: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if leaf == old or leaf.startswith(old + "."):
            return new + leaf[len(old):]
    return leaf


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys (SD1.x / SD2.x) -> original LDM ``UNetModel`` keys.

    Numbering: ``input_blocks.0`` is conv_in; down level i, resnet j is ``input_blocks.{1 + i(L+1) + j}``
    (``.0`` resnet, ``.1`` its transformer); the level's downsampler is ``input_blocks.{(i+1)(L+1)}.0.op``.
    Up level i has L+1 resnets at ``output_blocks.{i(L+1) + j}``; its upsampler rides on the last one at
    ``.1`` or, when that block has a transformer, ``.2``. L = resnets per down level.
    """
    levels = [int(m.group(4)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == "down_blocks" and m.group(3) == "resnets"]
    if not levels:
        raise FastComposerWeightsError("The UNet weights have no down_blocks.*.resnets: not a diffusers UNet2DConditionModel.")
    per_level = 1 + max(levels)
    up_with_attn = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        mid = _MID.match(key)
        if m:
            side, level, kind, j, leaf = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down_blocks":
                n = 1 + level * (per_level + 1) + j
                if kind == "resnets":
                    new = f"input_blocks.{n}.0.{_rename(leaf, _RESNET)}"
                elif kind == "attentions":
                    new = f"input_blocks.{n}.1.{leaf}"
                else:  # downsamplers.0.conv.*
                    new = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.{leaf.removeprefix('conv.')}"
            else:
                n = level * (per_level + 1) + j
                if kind == "resnets":
                    new = f"output_blocks.{n}.0.{_rename(leaf, _RESNET)}"
                elif kind == "attentions":
                    new = f"output_blocks.{n}.1.{leaf}"
                else:  # upsamplers.0.conv.*
                    slot = 2 if level in up_with_attn else 1
                    new = f"output_blocks.{level * (per_level + 1) + per_level}.{slot}.{leaf}"
        elif mid:
            kind, j, leaf = mid.group(1), int(mid.group(2)), mid.group(3)
            new = f"middle_block.{2 * j}.{_rename(leaf, _RESNET)}" if kind == "resnets" else f"middle_block.1.{leaf}"
        elif key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + key.rsplit(".", 1)[1]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + key.rsplit(".", 1)[1]
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + key[len("conv_in."):]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + key[len("conv_norm_out."):]
        elif key.startswith("conv_out."):
            new = "out.2." + key[len("conv_out."):]
        else:
            raise FastComposerWeightsError(
                f"Unexpected UNet key {key!r}: only SD1.x/SD2.x UNets (no class or added embeddings) can be converted."
            )
        out[new] = value
    return out


_VAE_LEVEL = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$")


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys, old or new attention names -> original LDM VAE keys.

    The decoder's levels are numbered in reverse in LDM, and its mid-block attention uses 1x1 convolutions,
    so linear q/k/v/proj weights gain two unit dims.
    """
    ups = [int(m.group(3)) for k in sd if (m := _VAE_LEVEL.match(k)) and m.group(2) == "up_blocks"]
    n_up = 1 + max(ups) if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = value
            continue
        m = _VAE_LEVEL.match(key)
        if m:
            side, kind, level, sub, j, leaf = m.group(1), m.group(2), int(m.group(3)), m.group(4), m.group(5), m.group(6)
            if kind == "up_blocks":
                level = n_up - 1 - level
            block = "down" if kind == "down_blocks" else "up"
            if sub == "resnets":
                new = f"{side}.{block}.{level}.block.{j}.{_rename(leaf, _VAE_RESNET)}"
            else:
                new = f"{side}.{block}.{level}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{leaf}"
            out[new] = value
            continue
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):
            raise FastComposerWeightsError(f"Unexpected VAE key {key!r}.")
        if rest.startswith("mid_block.resnets."):
            j, _, leaf = rest[len("mid_block.resnets."):].partition(".")
            new = f"mid.block_{int(j) + 1}.{_rename(leaf, _VAE_RESNET)}"
        elif rest.startswith("mid_block.attentions.0."):
            leaf = _rename(rest[len("mid_block.attentions.0."):], _VAE_ATTN)
            new = f"mid.attn_1.{leaf}"
            if leaf.split(".")[0] in ("q", "k", "v", "proj_out") and leaf.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out."):]
        elif rest.startswith(("conv_in.", "conv_out.")):
            new = rest
        else:
            raise FastComposerWeightsError(f"Unexpected VAE key {key!r}.")
        out[f"{side}.{new}"] = value
    return out


def text_encoder_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FastComposer's text encoder (no ``text_model.`` level, persistent position_ids) -> keys under
    ``text_model.`` as in Hugging Face files, without the position_ids buffer (every loader rebuilds it)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        out["text_model." + key.removeprefix("text_model.")] = value
    return out


def fastcomposer_to_ldm_checkpoint(parts: FastComposerParts) -> dict[str, torch.Tensor]:
    """An SD1.x checkpoint in the original LDM layout (what ComfyUI's checkpoint loader reads):
    the fine-tuned UNet, the VAE and the text encoder from the FastComposer file."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in unet_diffusers_to_ldm(parts.unet).items():
        sd[LDM_UNET + k] = v
    for k, v in vae_diffusers_to_ldm(parts.vae).items():
        sd[LDM_VAE + k] = v
    for k, v in text_encoder_to_hf(parts.text_encoder).items():
        sd[LDM_CLIP + k.removeprefix("text_model.")] = v
    return sd


# ----------------------------------------------------------------------------------------------------
# STEA modules from state dicts
# ----------------------------------------------------------------------------------------------------


def _strict_load(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if bad:
            parts.append("shape mismatches " + ", ".join(f"{k} {a} vs {b}" for k, a, b in bad[:4]))
        raise FastComposerWeightsError(f"The {what} weights do not fit: {'; '.join(parts)}. The file is damaged or of another model.")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True, assign=assign)


def image_encoder_config(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None):
    """transformers CLIPVisionConfig read off the weights (ViT-L/14 for FastComposer). The head count is not
    in the weights: 64-wide heads, as in every OpenAI CLIP vision tower, unless ``num_heads`` is given."""
    from transformers import CLIPVisionConfig

    try:
        hidden = int(sd["vision_model.embeddings.class_embedding"].shape[0])
        patch = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1])
        positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
        inter = int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
        proj = int(sd["visual_projection.weight"].shape[0])
    except KeyError as exc:
        raise FastComposerWeightsError(f"The CLIP image encoder weights lack {exc}.") from exc
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise FastComposerWeightsError(f"The image encoder has {positions} positions, not a square grid plus CLS.")
    heads = num_heads or max(1, hidden // 64)
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=grid * patch, patch_size=patch, projection_dim=proj, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


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
        "method": METHOD, "component": COMPONENT, "format_version": FORMAT_VERSION, "config": model.config.to_json(),
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
        cfg_data = json.loads(meta.get("config") or "{}")
    except json.JSONDecodeError as exc:
        raise FastComposerWeightsError(f"{name}: broken 'config' metadata ({exc}).") from exc
    overrides: dict[str, Any] = {}
    if cfg_data:
        stored = STEAConfig.from_dict(cfg_data)  # validates source and layers
        overrides = {"feature_source": stored.feature_source, "arcface_layers": stored.arcface_layers,
                     "layer_norm_eps": stored.layer_norm_eps}
    config = config_from_fuse_state_dict(fuse, **overrides)
    if cfg_data and (stored.text_dim, stored.feature_dim) != (config.text_dim, config.feature_dim):
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
