"""Random-weight PortraitBooth / FastComposer files in the official layouts, for tests and demo runs.

* ``fastcomposer_state_dict``: FastComposer's ``pytorch_model.bin`` layout from given diffusers / transformers
  models, with the quirks of the published file: ``text_encoder.*`` without the ``text_model.`` level and with
  a persistent ``position_ids``; ``image_encoder.vision_model.*`` with ``position_ids``; the VAE's mid-block
  attention under the pre-0.17 names (``query``, ``key``, ``value``, ``proj_attn``); frozen parts in bf16 and
  trained parts (UNet, post-fuse, last two vision layers) in fp32.
* ``write_random_fastcomposer``: such a file with the random SD1.5 test models (ComfyUI detects the UNet as
  SD15), a small CLIP vision tower (the official one is ViT-L/14; only its width of 768 after projection
  matters to the post-fuse MLP) and a random post-fuse MLP. Written with ``torch.save`` like the original.
* ``write_random_stea``: a PortraitBooth STEA .safetensors reading ArcFace features from the random r18
  backbone the runner writes (by default the training default, shallow layer2 + layer3 = 128 + 256).

Random weights mean nothing: they exercise loading, shapes and plumbing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from . import save_official_pickle
from ..pipelines.portraitbooth.fastcomposer_loading import save_stea
from ..pipelines.portraitbooth.stea import DEFAULT_ARCFACE_LAYERS, STEAConfig, STEAModel

PathLike = Union[str, os.PathLike]

FASTCOMPOSER_FILE = "fastcomposer_random.bin"
STEA_FILE = "portraitbooth_random_stea.safetensors"

# A small CLIP vision tower with FastComposer's input size (224, patch 14) and projection width (768).
SMALL_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                    image_size=224, patch_size=14, projection_dim=768)
_OLD_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
TRAINED_VISION_LAYERS = 2  # FastComposer fine-tunes the last two vision layers (stored fp32)


def _randomize_(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if name.endswith("weight") and p.ndim == 1:
                noise += 1.0
            p.copy_(noise)
    return module.eval()


def random_vision_encoder(seed: int = 0, **overrides):
    """transformers CLIPVisionModelWithProjection with the small config (or ``overrides``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = dict(SMALL_VISION, hidden_act="quick_gelu", **overrides)
    return _randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)), seed, std=0.05)


def random_postfuse(text_dim: int = 768, feature_dim: int = 768, seed: int = 0, source: str = "clip_image",
                    layers: Sequence[str] = ()) -> STEAModel:
    config = STEAConfig(text_dim=text_dim, feature_dim=feature_dim, hidden_dim=text_dim, feature_source=source,
                        arcface_layers=tuple(layers))
    model = STEAModel(config)
    _randomize_(model.fuse, seed, std=0.02)
    return model


def _vae_old_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if ".mid_block.attentions.0." in key:
            head, leaf = key.split(".mid_block.attentions.0.", 1)
            for new, old in _OLD_VAE_ATTN.items():
                if leaf.startswith(new + "."):
                    leaf = old + leaf[len(new):]
                    break
            key = f"{head}.mid_block.attentions.0.{leaf}"
        out[key] = value
    return out


def fastcomposer_state_dict(unet, vae, text_encoder, image_encoder, postfuse: torch.nn.Module,
                            frozen_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The published checkpoint's layout built from diffusers / transformers modules (see module docstring)."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        sd["unet." + k] = v.float()
    for k, v in _vae_old_names(vae.state_dict()).items():
        sd["vae." + k] = v.to(frozen_dtype)
    text = text_encoder.state_dict()
    for k, v in text.items():
        if k.endswith("position_ids"):
            continue
        sd["text_encoder." + k.removeprefix("text_model.")] = v.to(frozen_dtype)
    n_pos = text_encoder.config.max_position_embeddings
    sd["text_encoder.embeddings.position_ids"] = torch.arange(n_pos)[None]
    layers = image_encoder.config.num_hidden_layers
    for k, v in image_encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        trained = any(f"encoder.layers.{i}." in k for i in range(layers - TRAINED_VISION_LAYERS, layers))
        sd["image_encoder." + k] = v.float() if trained or k.startswith("visual_projection") else v.to(frozen_dtype)
    n_img = image_encoder.config.image_size // image_encoder.config.patch_size
    sd["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(n_img * n_img + 1)[None]
    for k, v in postfuse.state_dict().items():
        sd["postfuse_module." + k] = v.float()
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_random_fastcomposer(path: PathLike, seed: int = 0, sd15_checkpoint: Optional[PathLike] = None) -> Path:
    """A FastComposer-layout ``pytorch_model.bin`` with random weights (about 430 MB, mostly the full-size
    CLIP-L text encoder and VAE in bf16, which ComfyUI needs to recognise SD1.5).

    ``sd15_checkpoint``: the random SD1.5 checkpoint to take the UNet / VAE / text encoder from (fast); without
    it they are drawn anew with the same seed rules (slower, same weights for the same seed).
    """
    from . import sd15_checkpoint as sd15

    if sd15_checkpoint is not None:
        unet, vae, text = sd15.load_reference_models(sd15_checkpoint)
    else:
        cfg = sd15.TinySD15Config(seed=seed)
        unet, vae, text = sd15.build_unet(cfg), sd15.build_vae(cfg), sd15.build_text_encoder(cfg)
    state = fastcomposer_state_dict(unet, vae, text, random_vision_encoder(seed + 10), random_postfuse(seed=seed + 11).fuse)
    return save_official_pickle(state, Path(path))


def write_random_stea(path: PathLike, seed: int = 0, layers: Sequence[str] = DEFAULT_ARCFACE_LAYERS,
                      arcface_widths: Sequence[int] = (64, 128, 256, 512), num_features: int = 512) -> Path:
    """A PortraitBooth STEA safetensors for an arcface_torch backbone of the given widths (default: r18/r50/r100)."""
    dims = {f"layer{i + 1}": int(w) for i, w in enumerate(arcface_widths)}
    dims["embedding"] = int(num_features)
    model = random_postfuse(feature_dim=sum(dims[name] for name in layers), seed=seed + 12, source="arcface", layers=layers)
    return save_stea(model, path, {"weights": "random", "random_seed": seed})
