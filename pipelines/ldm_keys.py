"""diffusers / transformers state-dict keys -> the original LDM checkpoint layout (what ComfyUI's checkpoint
loader reads). One home for the block numbering, used by the FastComposer import, the random test checkpoints
(SD1.5 and SDXL) and InstantBooth's adapter names. Host-independent torch; names only, tensors untouched except
the VAE attention's linear -> 1x1-conv reshape.

Prefixes of an SD1.x checkpoint: ``LDM_UNET``, ``LDM_VAE``, ``LDM_CLIP``.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer.text_model."


class LDMKeyError(ValueError):
    """A state dict that is not a diffusers UNet / VAE of the layouts handled here."""


# ----------------------------------------------------------------------------------------------------
# block numbering
# ----------------------------------------------------------------------------------------------------


def input_block_index(level: int, j: int, per_level: Sequence[int]) -> int:
    """LDM ``input_blocks`` id of down level ``level``'s resnet ``j``: one stem conv, then per level its
    resnets plus one downsampler. ``per_level`` = resnets per down level (``layers_per_block``)."""
    return 1 + sum(per_level[lv] + 1 for lv in range(level)) + j


def output_block_index(level: int, j: int, per_level: Sequence[int]) -> int:
    """LDM ``output_blocks`` id of up level ``level``'s resnet ``j``: up levels run deepest first and each
    has one resnet more than its down level."""
    up = list(reversed(per_level))
    return sum(up[i] + 1 for i in range(level)) + j


# ----------------------------------------------------------------------------------------------------
# UNet
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
    """diffusers ``UNet2DConditionModel`` keys (SD1.x / SD2.x, and SDXL's blocks) -> original LDM ``UNetModel``
    keys, one key out per key in, order kept (callers invert the map by position).

    Resnets per level are read from the keys. A down level's downsampler is ``input_blocks.{next level's
    first id - 1}.0.op``; an up level's upsampler rides on its last resnet at ``.1`` or, when that block has a
    transformer, ``.2``. SDXL's ``add_embedding`` is not a block: callers map it (``label_emb``) themselves.
    """
    down = [(int(m.group(2)), int(m.group(4))) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == "down_blocks"
            and m.group(3) == "resnets"]
    if not down:
        raise LDMKeyError("The UNet weights have no down_blocks.*.resnets: not a diffusers UNet2DConditionModel.")
    levels = 1 + max(lv for lv, _ in down)
    per_level = [1 + max(j for lv, j in down if lv == level) for level in range(levels)]
    up_with_attn = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        mid = _MID.match(key)
        if m:
            side, level, kind, j, leaf = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down_blocks":
                if kind == "resnets":
                    new = f"input_blocks.{input_block_index(level, j, per_level)}.0.{_rename(leaf, _RESNET)}"
                elif kind == "attentions":
                    new = f"input_blocks.{input_block_index(level, j, per_level)}.1.{leaf}"
                else:  # downsamplers.0.conv.*
                    new = f"input_blocks.{input_block_index(level + 1, 0, per_level) - 1}.0.op.{leaf.removeprefix('conv.')}"
            else:
                if kind == "resnets":
                    new = f"output_blocks.{output_block_index(level, j, per_level)}.0.{_rename(leaf, _RESNET)}"
                elif kind == "attentions":
                    new = f"output_blocks.{output_block_index(level, j, per_level)}.1.{leaf}"
                else:  # upsamplers.0.conv.*, on the level's last resnet
                    last = list(reversed(per_level))[level]
                    slot = 2 if level in up_with_attn else 1
                    new = f"output_blocks.{output_block_index(level, last, per_level)}.{slot}.{leaf}"
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
            raise LDMKeyError(
                f"Unexpected UNet key {key!r}: only SD1.x/SD2.x UNets (no class or added embeddings) can be converted."
            )
        out[new] = value
    return out


# ----------------------------------------------------------------------------------------------------
# VAE and text encoder
# ----------------------------------------------------------------------------------------------------

_VAE_LEVEL = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$")


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys, old or new attention names -> original LDM VAE keys (order kept).

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
            raise LDMKeyError(f"Unexpected VAE key {key!r}.")
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
            raise LDMKeyError(f"Unexpected VAE key {key!r}.")
        out[f"{side}.{new}"] = value
    return out


def clip_text_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys (with or without the ``text_model.`` level, which transformers 5 and FastComposer
    drop) -> the part after ``cond_stage_model.transformer.text_model.``; the position_ids buffer is left out
    (every loader rebuilds it)."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
