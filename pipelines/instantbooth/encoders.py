"""InstantBooth's two image encoders: a frozen CLIP vision backbone (the host's) followed by trainable FC heads.

- Concept encoder E_c (paper eq. 2): CLIP's global image embedding -> ``fc`` -> a text-space vector, averaged
  over the N reference images; it replaces the text-encoder output at the identifier token.
- Patch encoder E_p (eq. 4): CLIP's 257 last-layer tokens per 224 px image (ViT-L/14: 1 class + 16x16 patches)
  -> ``fc`` -> patch tokens, concatenated over all reference images, fed to every adapter.

Backbone outputs used (the same in ComfyUI's CLIP_VISION and transformers' ``CLIPVisionModelWithProjection``):
``image_embeds`` (projected pooled output) for the concept, ``last_hidden_state`` (last encoder layer, before
the post-LayerNorm) for the patches.
"""
from __future__ import annotations

import torch
from torch import nn


class ConceptEncoder(nn.Module):
    def __init__(self, clip_global_dim: int, text_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(clip_global_dim, text_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, Dg) per-image global features -> (N, text_dim) per-image concept vectors."""
        return self.fc(image_embeds)

    def concept(self, image_embeds: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """f_c = alpha * mean_i E_c(x_i): one (text_dim,) vector for a set of N images (eq. 2 and eq. 6)."""
        if image_embeds.ndim != 2 or image_embeds.shape[0] == 0:
            raise ValueError(f"Expected (N, {self.fc.in_features}) image embeddings with N >= 1, got {tuple(image_embeds.shape)}.")
        return self(image_embeds).mean(0) * alpha


class PatchEncoder(nn.Module):
    def __init__(self, clip_hidden_dim: int, patch_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(clip_hidden_dim, patch_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., T, Dh) CLIP tokens -> (..., T, patch_dim)."""
        return self.fc(hidden_states)

    def concatenated(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """f_p for one set of N images: (N, T, Dh) -> (N*T, patch_dim), image after image (eq. 4)."""
        if hidden_states.ndim != 3 or hidden_states.shape[0] == 0:
            raise ValueError(f"Expected (N, T, {self.fc.in_features}) CLIP tokens with N >= 1, got {tuple(hidden_states.shape)}.")
        return self(hidden_states).reshape(-1, self.fc.out_features)
