"""Backends that can give the UNet's cross-attention separate K and V contexts (and probe it).

The textual-inversion backends take one context. PersonaMagic's ``predict`` gets a ``KVCond``; a backend
that supports it sets ``supports_kv = True`` (this diffusers one; the ComfyUI one lives in ``nodes/``, since
``pipelines/`` never imports ComfyUI) and, for the identity loss, ``decode_differentiable``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..textual_inversion.backend import TIBackend
from ..textual_inversion.diffusers_backend import DiffusersBackend
from .attention import KVAttnProcessor, KVCond, KVState


def predict_kv(backend: TIBackend, noisy: torch.Tensor, timesteps: torch.Tensor, cond: KVCond) -> torch.Tensor:
    """The UNet prediction with K/V contexts; a plain backend is fine only when V = K and nothing is probed."""
    if getattr(backend, "supports_kv", False):
        return backend.predict(noisy, timesteps, cond)
    if cond.probe is None and cond.value is cond.key:
        return backend.predict(noisy, timesteps, cond.key)
    raise NotImplementedError(
        f"{type(backend).__name__} cannot give the cross-attention a separate value context; "
        "use DiffusersKVBackend or the ComfyUI PersonaMagic backend"
    )


class DiffusersKVBackend(DiffusersBackend):
    """``DiffusersBackend`` whose UNet cross-attention takes V from ``KVCond.value`` (official ``MyAttenProc``)."""

    supports_kv = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_state = KVState()
        self.unet.set_attn_processor(KVAttnProcessor(self.kv_state))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, KVCond):
            return super().predict(noisy_latents, timesteps, cond)
        self.kv_state.value, self.kv_state.probe = cond.value, cond.probe
        try:
            return super().predict(noisy_latents, timesteps, cond.key)
        finally:
            self.kv_state.value = self.kv_state.probe = None

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1], with gradients to ``latents``."""
        return self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample.float()
