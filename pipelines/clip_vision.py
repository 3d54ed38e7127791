"""Sizes of a CLIP vision tower read off its state dict (transformers layout: ``vision_model.*`` and
``visual_projection.weight``, as ComfyUI's clip_vision files and FastComposer's image encoder). Host-independent.
Heads and activation are not in the weights: callers choose them."""
from __future__ import annotations

from typing import Mapping

import torch


def clip_vision_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """transformers ``CLIPVisionConfig`` sizes: hidden_size, intermediate_size, num_hidden_layers, image_size,
    patch_size, projection_dim. Raises ValueError naming the missing key, or a position count that is not a
    square grid plus CLS."""
    try:
        hidden = int(sd["vision_model.embeddings.class_embedding"].shape[0])
        patch = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1])
        positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
        inter = int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
        proj = int(sd["visual_projection.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"Not a CLIP vision state dict in ComfyUI/transformers layout (no {exc.args[0]}).") from None
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"The CLIP vision tower has {positions} positions, not a square grid plus CLS.")
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "image_size": grid * patch,
            "patch_size": patch, "projection_dim": proj}
