"""InstantBooth's adapter layer (paper eq. 3), one per UNet transformer block:

    y <- y + beta * tanh(gamma) * S([y, f_p])[:len(y)]

``y`` are the block's visual tokens after self-attention, ``f_p`` the patch tokens of all reference images,
``S`` a pre-norm multi-head self-attention over the concatenation, kept only at the ``y`` positions, ``gamma``
a learnable scalar initialised to 0 (so a fresh adapter leaves the UNet unchanged) and ``beta`` the inference
knob (1 in training, 0.3 by default at inference).

The layer is GLIGEN's gated self-attention (``GatedSelfAttentionDense`` in diffusers) without its feed-forward
half, which the paper's eq. 3 does not have: ``linear`` (patch width -> block width), ``norm1``, ``attn``
(``to_q``/``to_k``/``to_v`` without bias, ``to_out.0`` with bias, as in SD's attention) and the gate ``gamma``.

Because the LayerNorm, keys and values are per token, the patch tokens' keys and values do not depend on
``y``: :func:`prepare` computes them once (per run at inference) and :func:`attend` only adds the ``y`` part
per call. That is the exact same computation as attending over the concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from einops import rearrange
import torch
import torch.nn.functional as F
from torch import nn


class AdapterAttention(nn.Module):
    """Multi-head attention projections in SD's layout (no q/k/v bias, ``to_out.0`` with bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Adapter width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class GatedSelfAttentionAdapter(nn.Module):
    """Eq. 3 for one transformer block of width ``dim``; ``context_dim`` is the patch-token width."""

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(context_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = AdapterAttention(dim, num_heads)
        self.gamma = nn.Parameter(torch.zeros(()))

    def prepare(self, patch_tokens: torch.Tensor, device=None, dtype=None) -> "PreparedAdapter":
        return prepare(self, patch_tokens, device=device, dtype=dtype)

    def forward(self, y: torch.Tensor, patch_tokens: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """``y`` (B, T, dim), ``patch_tokens`` (B or 1, M, context_dim) -> updated ``y``. Differentiable."""
        prep = prepare(self, patch_tokens)
        return y + gated_delta(y, prep, beta)


@dataclass
class PreparedAdapter:
    """One adapter's tensors for a run: fused y-projections and the patch tokens' keys and values."""

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    eps: float
    w_qkv: torch.Tensor  # (3C, C): to_q, to_k, to_v stacked, one matmul for y
    w_out: torch.Tensor
    b_out: torch.Tensor
    k_patch: torch.Tensor  # (Bp, M, C)
    v_patch: torch.Tensor
    gate: torch.Tensor  # tanh(gamma), 0-dim
    num_heads: int


def prepare(adapter: GatedSelfAttentionAdapter, patch_tokens: torch.Tensor, device=None, dtype=None) -> PreparedAdapter:
    """Everything :func:`attend` needs that does not depend on ``y``; keeps autograd (training calls it per step)."""
    if patch_tokens.ndim == 2:
        patch_tokens = patch_tokens.unsqueeze(0)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or t.device, dtype=dtype or t.dtype)

    lin_w, lin_b = cast(adapter.linear.weight), cast(adapter.linear.bias)
    nw, nb = cast(adapter.norm1.weight), cast(adapter.norm1.bias)
    a = adapter.attn
    p = F.linear(cast(patch_tokens), lin_w, lin_b)
    p = F.layer_norm(p, (adapter.dim,), nw, nb, adapter.norm1.eps)
    return PreparedAdapter(
        norm_weight=nw,
        norm_bias=nb,
        eps=adapter.norm1.eps,
        w_qkv=torch.cat([cast(a.to_q.weight), cast(a.to_k.weight), cast(a.to_v.weight)], dim=0),
        w_out=cast(a.to_out[0].weight),
        b_out=cast(a.to_out[0].bias),
        k_patch=F.linear(p, cast(a.to_k.weight)),
        v_patch=F.linear(p, cast(a.to_v.weight)),
        gate=torch.tanh(cast(adapter.gamma)),
        num_heads=a.num_heads,
    )


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=h)


def attend(y: torch.Tensor, prep: PreparedAdapter) -> torch.Tensor:
    """S([y, f_p]) at the ``y`` positions: (B, T, C) -> (B, T, C)."""
    b, _, c = y.shape
    yn = F.layer_norm(y, (c,), prep.norm_weight, prep.norm_bias, prep.eps)
    q, k, v = F.linear(yn, prep.w_qkv).chunk(3, dim=-1)
    kp, vp = prep.k_patch, prep.v_patch
    if kp.shape[0] != b:
        if kp.shape[0] != 1:
            raise ValueError(f"Patch tokens for {kp.shape[0]} samples cannot serve a batch of {b}.")
        kp, vp = kp.expand(b, -1, -1), vp.expand(b, -1, -1)
    k = torch.cat([k, kp], dim=1)
    v = torch.cat([v, vp], dim=1)
    h = prep.num_heads
    out = F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h))
    out = rearrange(out, "b h n d -> b n (h d)")
    return F.linear(out, prep.w_out, prep.b_out)


def gated_delta(y: torch.Tensor, prep: PreparedAdapter, beta: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``beta * tanh(gamma) * S([y, f_p])``, optionally times a per-token ``weight`` (B or 1, T, 1)."""
    delta = attend(y, prep) * (prep.gate * beta)
    return delta if weight is None else delta * weight
