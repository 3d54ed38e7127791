"""The adapters in a diffusers ``UNet2DConditionModel`` (training, benchmarks, reference runs), through hooks only.

In diffusers' ``BasicTransformerBlock`` the self-attention output is added to the block input
(``y = attn1(norm1(h)) + h``) before cross-attention. A forward pre-hook on the block keeps ``h``; a forward
hook on ``attn1`` returns ``attn1_out + delta`` with ``delta = beta * tanh(gamma) * S([h + attn1_out, f_p])``,
so the block continues with ``y + delta``: eq. 3 exactly, with gradients to the adapters and FC heads.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .adapter import gated_delta, prepare
from .layout import LayoutError, check_coverage, diffusers_to_ldm
from .model import InstantBoothModel


def diffusers_transformer_blocks(unet: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """LDM path -> (diffusers name, BasicTransformerBlock) for every transformer block of the UNet."""
    cfg = unet.config
    levels = len(cfg.block_out_channels)
    out: dict[str, tuple[str, nn.Module]] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ != "BasicTransformerBlock":
            continue
        out[diffusers_to_ldm(name, cfg.layers_per_block, levels)] = (name, module)
    return out


def diffusers_layout(unet: nn.Module) -> dict[str, int]:
    """LDM path -> width of every transformer block (what :class:`InstantBoothConfig.adapters` needs)."""
    return {path: int(block.norm1.normalized_shape[0]) for path, (_, block) in diffusers_transformer_blocks(unet).items()}


class DiffusersAdapterHooks:
    """Installs ``model``'s adapters into ``unet``. Set the patch tokens before each UNet call.

    ``patch_tokens``: (B, M, D) per sample or (1, M, D) / (M, D) shared by the batch. ``beta``: 1 in training.
    With ``prepare_once`` (inference) the patch tokens' keys/values are computed once per :meth:`set_patch_tokens`.
    """

    def __init__(self, unet: nn.Module, model: InstantBoothModel, beta: float = 1.0, prepare_once: bool = False) -> None:
        blocks = diffusers_transformer_blocks(unet)
        unused = check_coverage(model.config.adapters, {p: int(b.norm1.normalized_shape[0]) for p, (_, b) in blocks.items()})
        if unused:
            raise LayoutError(f"The InstantBooth model has adapters the UNet lacks: {unused[:3]}.")
        self.model = model
        self.beta = float(beta)
        self.prepare_once = prepare_once
        self._tokens: Optional[torch.Tensor] = None
        self._cache: dict[str, Any] = {}
        self._handles = []
        for path, (name, block) in blocks.items():
            if getattr(block, "norm_type", "layer_norm") != "layer_norm" or getattr(block, "only_cross_attention", False):
                raise LayoutError(f"{name}: InstantBooth supports SD-style transformer blocks (layer_norm, self-attention first).")
            self._handles.append(block.register_forward_pre_hook(self._keep_input(block), with_kwargs=True))
            self._handles.append(block.attn1.register_forward_hook(self._add_delta(block, path)))

    def set_patch_tokens(self, patch_tokens: Optional[torch.Tensor]) -> None:
        """f_p for the next UNet calls; None turns the adapters off."""
        if patch_tokens is not None and patch_tokens.ndim == 2:
            patch_tokens = patch_tokens.unsqueeze(0)
        self._tokens = patch_tokens
        self._cache.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep_input(self, block: nn.Module):
        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            block._instantbooth_input = args[0] if args else kwargs["hidden_states"]

        return hook

    def _add_delta(self, block: nn.Module, path: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            h = getattr(block, "_instantbooth_input", None)
            block._instantbooth_input = None
            if self._tokens is None or self.beta == 0.0 or h is None:
                return None
            if self.prepare_once:
                prep = self._cache.get(path)
                if prep is None:
                    prep = self._cache[path] = prepare(self.model.adapter(path), self._tokens, device=output.device, dtype=output.dtype)
            else:
                prep = prepare(self.model.adapter(path), self._tokens, device=output.device, dtype=output.dtype)
            y = output + (h.squeeze(1) if h.ndim == 4 else h)
            return output + gated_delta(y, prep, self.beta)

        return hook
