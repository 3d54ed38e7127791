"""Cross-attention pieces shared by the hosts: K/V conditioning for training and the attention probe.

* ``KVCond``: what PersonaMagic hands a backend's ``predict``: the K context, the V context, an optional
  probe and (SDXL) the pooled output. Backends that support it (``DiffusersKVBackend`` here, the ComfyUI one in ``nodes/``) route V to
  every cross-attention's ``to_v``; plain backends get K only when V equals K.
* ``AttentionProbe``: records the cross-attention map of the placeholder tokens (for the IoU stage
  partition). Its ``__call__`` has ComfyUI's ``attn2_replace`` signature ``(q, k, v, extra_options)``
  (projected q/k/v, heads in ``extra_options['n_heads']``); the diffusers processor calls ``record`` with
  the same tensors.
* ``KVAttnProcessor``: a diffusers attention processor giving cross-attention K = to_k(key context),
  V = to_v(value context), as the official ``MyAttenProc``; self-attention unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from einops import rearrange
import torch
import torch.nn.functional as F


@dataclass
class KVCond:
    key: torch.Tensor  # (B, L, D)
    value: torch.Tensor  # (B, L, D)
    probe: Optional["AttentionProbe"] = None
    pooled: Optional[torch.Tensor] = None  # (B, 1280): SDXL's pooled CLIP-G output, for the UNet's y


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) per head, (B, heads, Nq, Nk), in float32."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return (qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1)


@dataclass
class AttentionProbe:
    """Accumulates, per query length (= spatial resolution), the mean over heads and layers of the
    attention that each query pays to the ``token_positions`` (summed over those tokens)."""

    token_positions: torch.Tensor  # (P,) long: key columns to watch (the placeholder slots)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # Nq -> (B, Nq) summed over layers
    counts: dict[int, int] = field(default_factory=dict)

    def record(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        with torch.no_grad():
            probs = attention_probs(q, k, heads)  # (B, H, Nq, Nk)
            cols = self.token_positions.to(probs.device)
            m = probs[..., cols].sum(-1).mean(1).cpu()  # (B, Nq)
        n = m.shape[1]
        self.maps[n] = self.maps.get(n, 0) + m
        self.counts[n] = self.counts.get(n, 0) + 1

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: Mapping[str, Any]) -> torch.Tensor:
        heads = int(extra_options["n_heads"])
        self.record(q, k, heads)
        out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
        return rearrange(out, "b h n d -> b n (h d)")

    def spatial_map(self, height: int, width: int) -> torch.Tensor:
        """(B, height, width): every resolution's map resized to (height, width), averaged over resolutions.

        ``height`` × ``width`` is the latent size; a map with Nq queries is (height/s, width/s) with
        s = √(height·width / Nq).
        """
        if not self.maps:
            raise RuntimeError("the probe recorded no cross-attention; the model did not run through it")
        total = None
        for n, acc in self.maps.items():
            s = math.sqrt(height * width / n)
            h, w = round(height / s), round(width / s)
            m = (acc / self.counts[n]).reshape(acc.shape[0], 1, h, w)
            m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            total = m if total is None else total + m
        return total / len(self.maps)


class KVState:
    """What the processors read during one UNet call (set by the backend around ``predict``)."""

    value: Optional[torch.Tensor] = None
    probe: Optional[AttentionProbe] = None


class KVAttnProcessor:
    """diffusers processor: cross-attention uses K from ``encoder_hidden_states`` and V from ``state.value``."""

    def __init__(self, state: KVState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        if (
            attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None
            or attn.norm_k is not None or hidden_states.ndim != 3 or attention_mask is not None
        ):
            raise NotImplementedError("KVAttnProcessor supports the plain SD1/SD2 attention layers only")
        context = encoder_hidden_states if cross else hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        value_ctx = context
        if cross and self.state.value is not None:
            value_ctx = self.state.value.to(context.dtype)
            if value_ctx.shape != context.shape:
                raise ValueError(f"value context {tuple(value_ctx.shape)} does not match key context {tuple(context.shape)}")
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(value_ctx)
        if cross and self.state.probe is not None:
            self.state.probe.record(q, k, attn.heads)
        h = attn.heads
        out = F.scaled_dot_product_attention(split_heads(q, h), split_heads(k, h), split_heads(v, h))
        out = rearrange(out, "b h n d -> b n (h d)").to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
