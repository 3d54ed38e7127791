"""Where InstantBooth's adapters sit in a Stable Diffusion UNet, under each host's naming.

One adapter per transformer block (``BasicTransformerBlock``), named by the block's path in the original LDM
state-dict layout, which is also how ComfyUI names the modules of its UNet::

    input_blocks.1.1.transformer_blocks.0      (SD1.5: 320 wide)
    middle_block.1.transformer_blocks.0        (SD1.5: 1280 wide)
    output_blocks.11.1.transformer_blocks.0    (SD1.5: 320 wide)

Three views of the same block are mapped here:
- LDM path (file keys, ComfyUI module names);
- ComfyUI's ``middle_patch`` view: ``extra_options['block']`` = ("input" | "middle" | "output", id) plus
  ``extra_options['block_index']`` (position inside the SpatialTransformer);
- diffusers module names (``down_blocks.0.attentions.0.transformer_blocks.0``), used by the training script.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence, Union

from ..ldm_keys import input_block_index, output_block_index

_LDM_RE = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.(\d+)\.transformer_blocks\.(\d+)$")
_DIFFUSERS_RE = re.compile(
    r"^(?:(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.(\d+))\.transformer_blocks\.(\d+)$"
)
_KIND = {"input_blocks": "input", "output_blocks": "output", "middle_block": "middle"}

BlockKey = tuple[str, int, int]  # ComfyUI: (block kind, block id, block_index)


class LayoutError(ValueError):
    """A name does not describe a UNet transformer block, or adapters do not fit the UNet."""


def parse_ldm_path(path: str) -> tuple[BlockKey, int]:
    """``input_blocks.4.1.transformer_blocks.0`` -> (("input", 4, 0), 1); the second value is the
    SpatialTransformer's position inside its block (1 in every SD UNet)."""
    m = _LDM_RE.match(path)
    if m is None:
        raise LayoutError(f"{path!r} is not a UNet transformer-block path such as 'input_blocks.1.1.transformer_blocks.0'.")
    if m.group(3):
        return ("middle", 0, int(m.group(5))), int(m.group(4))
    return (_KIND[m.group(1)], int(m.group(2)), int(m.group(5))), int(m.group(4))


def comfy_block_map(paths: Iterable[str]) -> dict[BlockKey, str]:
    """ComfyUI's (kind, id, block_index) -> LDM path, for every path given."""
    out: dict[BlockKey, str] = {}
    for p in paths:
        key, _ = parse_ldm_path(p)
        if key in out:
            raise LayoutError(f"Two adapters for the same transformer block: {out[key]!r} and {p!r}.")
        out[key] = p
    return out


def _per_level(value: Union[int, Sequence[int]], levels: int) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if len(value) != levels:
        raise LayoutError(f"Expected {levels} per-level values, got {list(value)}.")
    return [int(v) for v in value]


def diffusers_to_ldm(name: str, layers_per_block: Union[int, Sequence[int]], levels: int) -> str:
    """diffusers transformer-block name -> LDM path.

    ``layers_per_block`` is the UNet's ``config.layers_per_block`` (int or per level), ``levels`` the number of
    down blocks. Input ids count one stem conv, then per level its res blocks plus one downsampler (none after
    the last level); output ids count, per level from the deepest, its res blocks + 1.
    """
    m = _DIFFUSERS_RE.match(name)
    if m is None:
        raise LayoutError(f"{name!r} is not a diffusers transformer-block name such as 'down_blocks.0.attentions.0.transformer_blocks.0'.")
    depth_index = int(m.group(5))
    if m.group(4) is not None:
        return f"middle_block.1.transformer_blocks.{depth_index}"
    kind, level, j = m.group(1), int(m.group(2)), int(m.group(3))
    per_level = _per_level(layers_per_block, levels)
    if level >= levels:
        raise LayoutError(f"{name!r}: the UNet has only {levels} levels.")
    if kind == "down_blocks":
        return f"input_blocks.{input_block_index(level, j, per_level)}.1.transformer_blocks.{depth_index}"
    return f"output_blocks.{output_block_index(level, j, per_level)}.1.transformer_blocks.{depth_index}"


def sd_unet_layout(
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: Union[int, Sequence[int]],
    attention_levels: Sequence[bool],
    transformer_depth: int = 1,
) -> dict[str, int]:
    """LDM path -> width of every transformer block of an SD-style UNet (SD1.x/2.x shapes).

    The middle block carries a transformer when the deepest level does or when any level does (SD1.x: the
    deepest level has none, the middle block has one), as in every SD UNet.
    """
    levels = len(channel_mult)
    nres = _per_level(num_res_blocks, levels)
    if len(attention_levels) != levels:
        raise LayoutError("attention_levels needs one flag per level of channel_mult.")
    out: dict[str, int] = {}
    for lv in range(levels):
        for j in range(nres[lv]):
            if attention_levels[lv]:
                for d in range(transformer_depth):
                    out[f"input_blocks.{input_block_index(lv, j, nres)}.1.transformer_blocks.{d}"] = model_channels * channel_mult[lv]
    if any(attention_levels):
        for d in range(transformer_depth):
            out[f"middle_block.1.transformer_blocks.{d}"] = model_channels * channel_mult[-1]
    for up in range(levels):  # up levels run deepest first
        lv = levels - 1 - up
        for j in range(nres[lv] + 1):
            if attention_levels[lv]:
                for d in range(transformer_depth):
                    out[f"output_blocks.{output_block_index(up, j, nres)}.1.transformer_blocks.{d}"] = model_channels * channel_mult[lv]
    return out


# SD1.x: 320 channels, levels x1 x2 x4 x4, 2 res blocks per level, attention on the first three levels.
SD15_LAYOUT: dict[str, int] = sd_unet_layout(320, (1, 2, 4, 4), 2, (True, True, True, False))


def check_coverage(adapter_widths: Mapping[str, int], model_widths: Mapping[str, int]) -> list[str]:
    """Every transformer block of the model needs an adapter of its width. Returns the adapters the model does
    not use (a file made for a bigger UNet of the same family); raises :class:`LayoutError` otherwise."""
    missing = sorted(set(model_widths) - set(adapter_widths))
    if missing:
        raise LayoutError(
            f"This InstantBooth file has no adapter for {len(missing)} of the model's {len(model_widths)} transformer blocks "
            f"(first: {missing[0]}). It was trained for a different UNet; use an InstantBooth file made for this checkpoint's family."
        )
    wrong = [(p, adapter_widths[p], w) for p, w in model_widths.items() if adapter_widths[p] != w]
    if wrong:
        p, a, w = wrong[0]
        raise LayoutError(
            f"Adapter {p} is {a} wide but the model's block is {w} wide. The InstantBooth file was trained for another "
            "model family (SD1.x files need an SD1.x checkpoint)."
        )
    return sorted(set(adapter_widths) - set(model_widths))
