"""Random-weight files for InstantBooth demo runs and tests (no InstantBooth weights are public).

* ``write_random_clip_vision``: a CLIP vision tower in ComfyUI's ``clip_vision`` format, which is the
  transformers ``CLIPVisionModelWithProjection`` state dict (``vision_model.*``, ``visual_projection.weight``).
  ComfyUI picks the architecture from the number of layers (24 -> ViT-L/14, 32 -> ViT-H/14, 48 -> ViT-bigG), so
  the smallest file it loads is a full-size ViT-L/14 at 224 px (about 600 MB in fp16); smaller configs
  (``TINY_CLIP_VISION``) serve tests that build the model directly.
* ``write_random_instantbooth``: an InstantBooth file (FC heads + adapters) for a given UNet layout; by default
  the random SD1.5 test checkpoint's (``devmodels.sd15_checkpoint.TinySD15Config``), with the heads sized for
  ViT-L/14. The gates are set open (tanh(gamma) = 0.5) so a demo run exercises the adapters.
* ``demo_models(seed)``: the two files as the example runner's default-model entries.

Both writers skip the work when a file with the same fingerprint (in its metadata) already exists.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..pipelines.instantbooth import InstantBoothConfig, InstantBoothModel, save_instantbooth, sd_unet_layout
from ..utils.files import atomic_save_safetensors

PathLike = Union[str, os.PathLike]

# ComfyUI's clip_vision_config_vitl.json (openai/clip-vit-large-patch14's vision tower).
VIT_L14_224: dict = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
# Same token count (257 at 224 px), tiny widths: for tests that build the backbone themselves.
TINY_CLIP_VISION: dict = {**VIT_L14_224, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "projection_dim": 24}

CLIP_VISION_FILE = "clip_vision_random_vit_l14.safetensors"
INSTANTBOOTH_FILE = "instantbooth_random_tiny_sd15.safetensors"
_KIND_CLIP = "facebooth.random_clip_vision"
_KIND_IB = "facebooth.random_instantbooth"


def _fingerprint_matches(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:  # unreadable: rewrite it
        return False


def clip_vision_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a transformers CLIPVisionModelWithProjection (what ComfyUI's clip_vision loader reads)."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1
    p = config["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (d,),
        "vision_model.embeddings.patch_embedding.weight": (d, config.get("num_channels", 3), p, p),
        "vision_model.embeddings.position_embedding.weight": (tokens, d),
        "vision_model.pre_layrnorm.weight": (d,),
        "vision_model.pre_layrnorm.bias": (d,),
        "vision_model.post_layernorm.weight": (d,),
        "vision_model.post_layernorm.bias": (d,),
        "visual_projection.weight": (config["projection_dim"], d),
    }
    for i in range(layers):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{pre}self_attn.{proj}.bias"] = (d,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{ln}.weight"] = (d,)
            shapes[f"{pre}{ln}.bias"] = (d,)
        shapes[f"{pre}mlp.fc1.weight"] = (ff, d)
        shapes[f"{pre}mlp.fc1.bias"] = (ff,)
        shapes[f"{pre}mlp.fc2.weight"] = (d, ff)
        shapes[f"{pre}mlp.fc2.bias"] = (d,)
    return shapes


def random_clip_vision_state_dict(config: Mapping = VIT_L14_224, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Seeded weights: LayerNorm scales near 1, matrices with 1/sqrt(fan_in) std, small biases; rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in clip_vision_shapes(config).items():
        if "norm" in key and key.endswith(".weight"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:  # class embedding
            t = 0.5 * torch.randn(shape, generator=gen)
        out[key] = t.to(dtype)
    return out


def write_random_clip_vision(path: PathLike, seed: int = 0, config: Mapping = VIT_L14_224) -> Path:
    path = Path(path)
    fingerprint = json.dumps({"seed": seed, "config": dict(config), "kind": _KIND_CLIP, "version": 1}, sort_keys=True)
    if _fingerprint_matches(path, fingerprint):
        return path
    sd = random_clip_vision_state_dict(config, seed)
    return atomic_save_safetensors(sd, path, {"kind": _KIND_CLIP, "fingerprint": fingerprint, "config": json.dumps(dict(config))})


def tiny_checkpoint_layout() -> dict[str, int]:
    """Transformer blocks (LDM path -> width) of the random SD1.5 test checkpoint."""
    from .sd15_checkpoint import TinySD15Config

    c = TinySD15Config()
    return sd_unet_layout(c.model_channels, c.channel_mult, c.num_res_blocks, c.attention_levels)


def random_instantbooth_model(
    layout: Optional[Mapping[str, int]] = None,
    seed: int = 0,
    clip_config: Mapping = VIT_L14_224,
    text_dim: int = 768,
    patch_dim: int = 768,
    gate: float = 0.5,
) -> InstantBoothModel:
    """A model with seeded weights; ``gate`` = tanh(gamma) of every adapter (0 = a freshly initialised model)."""
    cfg = InstantBoothConfig(
        clip_hidden_dim=clip_config["hidden_size"], clip_global_dim=clip_config["projection_dim"],
        text_dim=text_dim, patch_dim=patch_dim, adapters=dict(layout or tiny_checkpoint_layout()),
    )
    gen = torch.Generator().manual_seed(seed)
    model = InstantBoothModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(math.atanh(gate))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def write_random_instantbooth(
    path: PathLike, seed: int = 0, layout: Optional[Mapping[str, int]] = None, clip_config: Mapping = VIT_L14_224, gate: float = 0.5
) -> Path:
    path = Path(path)
    layout = dict(layout or tiny_checkpoint_layout())
    fingerprint = json.dumps({"seed": seed, "layout": layout, "clip": dict(clip_config), "gate": gate, "kind": _KIND_IB,
                              "version": 1}, sort_keys=True)
    if _fingerprint_matches(path, fingerprint):
        return path
    model = random_instantbooth_model(layout, seed, clip_config, gate=gate)
    save_instantbooth(model, path, {"kind": _KIND_IB, "fingerprint": fingerprint, "random_weights": "true"}, dtype=torch.float16)
    return path


def demo_models(seed: int = 0) -> list[dict]:
    """The example runner's default models for InstantBooth workflows, as ``runner.demo_models.DemoModel`` fields."""
    from ..pipelines.instantbooth import adapter, files, model

    here = __file__
    return [
        {
            "relpath": f"facebooth/instantbooth/{INSTANTBOOTH_FILE}",
            "placeholder": "INSTANTBOOTH_MODEL",
            "value": INSTANTBOOTH_FILE,
            "write": lambda p: write_random_instantbooth(p, seed=seed),
            "sources": (here, model.__file__, adapter.__file__, files.__file__),
        },
        {
            "relpath": f"clip_vision/{CLIP_VISION_FILE}",
            "placeholder": "CLIP_VISION",
            "value": CLIP_VISION_FILE,
            "write": lambda p: write_random_clip_vision(p, seed=seed),
            "sources": (here,),
        },
    ]
