"""The controls every apply node shares: weight, start/end of sampling, and an attention mask.

InstantBooth's names and semantics, carried over to the methods whose identity lives in the CONDITIONING
(Face2Diffusion, PortraitBooth, PersonaMagic): the node builds the identity conditioning and the plain one
(the same prompt without the identity), and ``schedule`` hands ComfyUI both, through its own keys:

* ``start_at`` / ``end_at`` -> ``start_percent`` / ``end_percent``: the identity acts in [start_at, end_at] of
  the sampling, the plain prompt before and after (ComfyUI's ConditioningSetTimestepRange does the same);
* ``attn_mask`` -> ``mask`` (as ConditioningSetMask, full area, strength 1): inside [start_at, end_at] the
  identity conditioning covers the white part and the plain one the rest (1 - mask), so the sampler's
  masked average is identity * m + plain * (1 - m) per latent pixel;
* the weight is each node's own blend toward the plain prompt (0 = plain, 1 = the method as published).

With the defaults (0, 1, no mask) the identity conditioning passes through unchanged.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io


def range_inputs() -> list:
    """start_at, end_at, attn_mask: optional, so API workflows written before them still validate."""
    return [
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                       tooltip="The identity acts from this fraction of the sampling on; before it the plain prompt is used."),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                       tooltip="The identity stops after this fraction of the sampling; after it the plain prompt is used."),
        io.Mask.Input("attn_mask", optional=True,
                      tooltip="Where in the generated image the identity acts (white = on); elsewhere the plain prompt. "
                      "Costs one more conditioning pass per step while the identity is active."),
    ]


def check_range(start_at: float, end_at: float) -> None:
    if end_at < start_at:
        raise ValueError(f"end_at ({end_at}) is before start_at ({start_at}).")


def _window(conditioning: list, lo: float, hi: float, mask: torch.Tensor | None) -> list:
    """Entries clipped to [lo, hi] (their own ranges intersected), dropping empty ones; mask added if given."""
    out = []
    for cond, extra in conditioning:
        s = max(float(extra.get("start_percent", 0.0)), lo)
        e = min(float(extra.get("end_percent", 1.0)), hi)
        if e <= s:
            continue
        d = dict(extra)
        if (s, e) != (0.0, 1.0) or "start_percent" in extra or "end_percent" in extra:
            d["start_percent"], d["end_percent"] = s, e
        if mask is not None:
            d.update(mask=mask, set_area_to_bounds=False, mask_strength=1.0)
        out.append([cond, d])
    return out


def schedule(identity: list, plain: list, start_at: float = 0.0, end_at: float = 1.0,
             attn_mask: torch.Tensor | None = None) -> list:
    """CONDITIONING: ``identity`` within [start_at, end_at] (under ``attn_mask``), ``plain`` everywhere else."""
    check_range(start_at, end_at)
    inside = _window(identity, start_at, end_at, None)
    if not inside:  # empty window: the plain prompt throughout
        return plain
    if attn_mask is None and (start_at, end_at) == (0.0, 1.0):
        return identity
    out = []
    if start_at > 0.0:
        out += _window(plain, 0.0, start_at, None)
    if attn_mask is None:
        out += inside
    else:
        m = attn_mask.float()
        m = (m[None] if m.dim() == 2 else m).clamp(0.0, 1.0)
        out += _window(identity, start_at, end_at, m)
        out += _window(plain, start_at, end_at, 1.0 - m)
    if end_at < 1.0:
        out += _window(plain, end_at, 1.0, None)
    return out


def blend(identity: torch.Tensor, plain: torch.Tensor, weight: float) -> torch.Tensor:
    """plain + weight * (identity - plain); weight 1 returns ``identity`` itself, 0 returns ``plain``."""
    if weight == 1.0:
        return identity
    if weight == 0.0:
        return plain
    return plain + weight * (identity - plain.to(identity.dtype))
