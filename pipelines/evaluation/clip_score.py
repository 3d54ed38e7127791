"""Text fidelity (CLIP score) and image similarity (CLIP-I) through open_clip, from local weight files only.

open_clip is imported lazily (an optional dependency). Weights are always a local file passed as
``pretrained=<path>``: open_clip downloads only for a pretrained *tag* (``openai``, ``laion2b_...``) or an
``hf-hub:`` name, and both are refused here, so nothing is ever fetched.

Preprocessing is open_clip's own for the model (PIL resize of the shortest side, bicubic, centre crop,
normalise), fed 8-bit RGB the way the papers' scripts read their PNG/JPEG files; an IMAGE tensor is
rounded to 8 bits first, so a node and the command give the same number for the same picture.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...utils.files import require_weight_file

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]


class OpenClipUnavailableError(ImportError):
    pass


def import_open_clip():
    try:
        import open_clip  # noqa: WPS433 (lazy on purpose)
    except ImportError as exc:
        raise OpenClipUnavailableError(
            "The CLIP score needs open_clip: `pip install open_clip_torch` in ComfyUI's Python environment."
        ) from exc
    return open_clip


def to_pil(image: ImageLike) -> Image.Image:
    """(H, W, 3) float tensor in [0, 1], uint8 array or PIL image -> 8-bit RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3:
            raise ValueError(f"Expected one image (H, W, C), got shape {tuple(t.shape)}.")
        if t.is_floating_point():
            t = (t.float().clamp(0, 1) * 255).round()
        arr = t.to(torch.uint8).numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), mode="RGB")


def clip_score_from_cosine(cos: torch.Tensor, scale: float = 1.0, clamp_min: Optional[float] = None) -> torch.Tensor:
    """Raw cosine (scale 1, no clamp) or Hessel et al.'s CLIPScore (scale 2.5, clamp at 0)."""
    out = cos if clamp_min is None else cos.clamp(min=clamp_min)
    return out * scale


@dataclass
class ClipScorer:
    """An open_clip model with its tokenizer and preprocessing; scores images against texts and images."""

    model: torch.nn.Module
    tokenizer: object
    preprocess: object
    name: str
    device: torch.device
    batch_size: int = 32

    def pixels(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return torch.stack([self.preprocess(to_pil(im)) for im in images])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) preprocessed pixels -> (N, D) unit image features."""
        outs = []
        dtype = next(self.model.parameters()).dtype
        for start in range(0, pixels.shape[0], self.batch_size):
            x = pixels[start:start + self.batch_size].to(self.device, dtype)
            outs.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    def encode_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self.encode_pixels(self.pixels(images))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) sentences -> (N, D) unit text features."""
        outs = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            outs.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    def text_scores(self, images: Sequence[ImageLike], texts: Sequence[str], scale: float = 1.0,
                    clamp_min: Optional[float] = None) -> torch.Tensor:
        """One CLIP score per (image, text) pair."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: give one text per image (or one for all).")
        cos = (self.encode_images(images) * self.encode_texts(texts)).sum(-1)
        return clip_score_from_cosine(cos, scale, clamp_min)


def _register_config(open_clip, config: Path) -> str:
    """Make a custom open_clip model config (JSON with embed_dim / vision_cfg / text_cfg) known by its stem."""
    open_clip.add_model_config(config)
    return config.stem


def load_clip_scorer(
    model_name: str,
    weights: Union[str, os.PathLike],
    *,
    config: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
) -> ClipScorer:
    """Build ``model_name`` (an open_clip architecture, e.g. ``ViT-B-32-quickgelu``) from a local weight file.

    ``config`` is an optional open_clip model-config JSON for architectures open_clip does not ship; its
    file stem becomes the model name. OpenAI's weights need the ``-quickgelu`` architectures.
    """
    open_clip = import_open_clip()
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"Give an open_clip architecture name and a local weight file, not {model_name!r}.")
    if config is not None:
        model_name = _register_config(open_clip, Path(config))
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"open_clip has no architecture {model_name!r}. Known ones include ViT-B-32-quickgelu, ViT-L-14-quickgelu, "
            "ViT-H-14; or pass a model-config JSON."
        )
    path = require_weight_file(weights, "CLIP")
    # A file path (never a tag) as `pretrained`: open_clip loads it with weights_only=True and downloads nothing.
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(path.resolve()), device=torch.device(device), precision=precision,
        pretrained_text=False, pretrained_image=False,
    )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    log.info("Loaded CLIP %s from %s", model_name, path)
    return ClipScorer(model=model, tokenizer=tokenizer, preprocess=preprocess, name=model_name, device=torch.device(device))
