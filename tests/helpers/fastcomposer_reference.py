"""FastComposer's post-fuse MLP written out with plain torch ops from its state dict (prefix already stripped):
the reference the STEA tests and the in-ComfyUI PortraitBooth script compare our module against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_postfuse(sd: dict, text: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    p = {k: v.float() for k, v in sd.items()}

    def mlp(x, name, residual):
        h = F.layer_norm(x, x.shape[-1:], p[f"{name}.layernorm.weight"], p[f"{name}.layernorm.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(h, p[f"{name}.fc1.weight"], p[f"{name}.fc1.bias"])), p[f"{name}.fc2.weight"], p[f"{name}.fc2.bias"])
        return h + x if residual else h

    u = mlp(torch.cat([text, feat], -1), "mlp1", False) + text
    u = mlp(u, "mlp2", True)
    return F.layer_norm(u, u.shape[-1:], p["layer_norm.weight"], p["layer_norm.bias"], 1e-5)
