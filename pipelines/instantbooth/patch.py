"""The adapters as one plain callable ``patch(x, extra_options) -> x`` for a host that calls it inside every UNet
transformer block between self- and cross-attention (ComfyUI's ``middle_patch``).

``extra_options`` keys read (all plain values; nothing host-specific is imported):
- ``block`` ("input" | "middle" | "output", id) and ``block_index``: which transformer block is running;
- ``sigmas``: the current noise level, for the start/end range;
- ``cond_or_uncond``: which equal chunks of the batch are conditional (0) or unconditional (1);
- ``activations_shape`` [b, c, h, w]: the block's token grid, to resize the attention mask.

The patch tokens' projections (per adapter: linear, LayerNorm, keys, values) are computed once per device and
dtype, on first use, and reused for every step and both CFG branches.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .adapter import PreparedAdapter, gated_delta, prepare
from .layout import BlockKey
from .model import InstantBoothModel

log = logging.getLogger(__name__)

APPLY_TO = ("both", "cond only")


class AdapterPatch:
    def __init__(
        self,
        model: InstantBoothModel,
        patch_tokens: torch.Tensor,
        block_map: Mapping[BlockKey, str],
        beta: float = 0.3,
        sigma_range: Optional[tuple[float, float]] = None,
        attn_mask: Optional[torch.Tensor] = None,
        apply_to: str = "both",
        host_models: Sequence[Any] = (),
    ) -> None:
        """``patch_tokens`` (M, D) = f_p of all references; ``block_map`` (kind, id, block_index) -> adapter path;
        ``sigma_range`` (sigma_start, sigma_end): active while sigma_end <= sigma <= sigma_start; ``attn_mask``
        (H, W) or (B, H, W) in [0, 1]: where on the image the adapters act; ``host_models``: the host's handles
        of ``model`` (ComfyUI: its ModelPatcher), returned by ``models()`` so the host loads them with the UNet."""
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}.")
        self.model = model
        self.patch_tokens = patch_tokens.detach()
        self.block_map = dict(block_map)
        self.beta = float(beta)
        self.sigma_range = sigma_range
        self.attn_mask = None if attn_mask is None else (attn_mask[None] if attn_mask.ndim == 2 else attn_mask).float()
        self.apply_to = apply_to
        self._prepared: dict[tuple[str, torch.device, torch.dtype], PreparedAdapter] = {}
        self._masks: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self._host_models = list(host_models)

    def models(self) -> list:
        """What the host must load with the UNet (ComfyUI: ``ModelPatcher.model_patches_models``)."""
        return list(self._host_models)

    def to(self, device: Any) -> "AdapterPatch":
        """Hosts move patches with the model (ComfyUI: ``ModelPatcher.model_patches_to``). The weights stay where
        they are (the loaded file is shared); prepared copies on another device are dropped, freeing its memory."""
        if isinstance(device, (str, torch.device)):
            dev = torch.device(device)
            self._prepared = {k: v for k, v in self._prepared.items() if k[1] == dev}
            self._masks = {k: v for k, v in self._masks.items() if k[2] == dev}
        return self

    def _active(self, extra_options: Mapping[str, Any]) -> bool:
        if self.beta == 0.0:
            return False
        if self.sigma_range is None:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        start, end = self.sigma_range
        return end <= sigma <= start

    def _prepare(self, path: str, device: torch.device, dtype: torch.dtype) -> PreparedAdapter:
        key = (path, device, dtype)
        prep = self._prepared.get(key)
        if prep is None:
            with torch.no_grad():
                prep = prepare(self.model.adapter(path), self.patch_tokens, device=device, dtype=dtype)
            self._prepared[key] = prep
        return prep

    def _mask_weight(self, tokens: int, rows: int, extra_options: Mapping[str, Any], device, dtype) -> Optional[torch.Tensor]:
        if self.attn_mask is None:
            return None
        shape = extra_options.get("activations_shape")
        if shape is not None and shape[-2] * shape[-1] == tokens:
            h, w = int(shape[-2]), int(shape[-1])
        else:  # fall back to the latent's aspect ratio
            oh, ow = (extra_options.get("original_shape") or [0, 0, 1, 1])[-2:]
            f = math.sqrt(oh * ow / tokens)
            h, w = max(1, round(oh / f)), max(1, round(ow / f))
            if h * w != tokens:
                h, w = tokens, 1
        key = (h, w, device, dtype)
        m = self._masks.get(key)
        if m is None:
            m = F.interpolate(self.attn_mask[:, None].to(device), size=(h, w), mode="bilinear", align_corners=False)
            m = m.reshape(m.shape[0], h * w, 1).to(dtype)
            self._masks[key] = m
        per_chunk = max(1, rows // max(1, len(extra_options.get("cond_or_uncond") or [0])))
        idx = torch.arange(rows, device=device) % per_chunk % m.shape[0]
        return m[idx]

    def __call__(self, x: torch.Tensor, extra_options: Mapping[str, Any]) -> torch.Tensor:
        block = extra_options.get("block")
        if block is None or not self._active(extra_options):
            return x
        path = self.block_map.get((block[0], int(block[1]), int(extra_options.get("block_index", 0))))
        if path is None:
            return x
        prep = self._prepare(path, x.device, x.dtype)
        weight = self._mask_weight(x.shape[1], x.shape[0], extra_options, x.device, x.dtype)
        if self.apply_to == "both":
            return x + gated_delta(x, prep, self.beta, weight)
        # cond only: the batch is len(cond_or_uncond) equal chunks; only the conditional ones get the adapter
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        n = x.shape[0] // len(chunks)
        rows = torch.cat([torch.arange(i * n, (i + 1) * n) for i, c in enumerate(chunks) if c == 0]) if 0 in chunks else None
        if rows is None:
            return x
        rows = rows.to(x.device)
        w = None if weight is None else weight[rows]
        out = x.clone()
        out[rows] = x[rows] + gated_delta(x[rows], prep, self.beta, w)
        return out
