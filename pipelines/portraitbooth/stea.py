"""Subject Text Embedding Augmentation (STEA): identity features fused into the subject word's text output.

PortraitBooth (paper Sec. 4.1) concatenates face-recognition features with the text-encoder output of the
identity token ("man", "woman", ...) and passes the pair through an MLP whose output replaces that token's
output. FastComposer, PortraitBooth's base, does the same with a CLIP image embedding; its published
"post-fuse" module is the MLP layout used here, so one module loads both:

    u   = mlp1(concat[t, f]) + t        mlp1 = LayerNorm(T+F) -> Linear(T+F -> H) -> GELU -> Linear(H -> T)
    u   = mlp2(u) + u                   mlp2 = LayerNorm(T)   -> Linear(T -> T)   -> GELU -> Linear(T -> T)
    out = LayerNorm(T)(u)

with t the text output (T = 768 for SD1.x), f the identity features (F) and H = T in FastComposer.
State-dict keys are FastComposer's (``mlp1.layernorm``, ``mlp1.fc1``, ``mlp1.fc2``, ``mlp2.*``,
``layer_norm``), so ``postfuse_module.*`` of the official checkpoint loads unchanged.

Identity features:
- ``clip_image`` (FastComposer): the CLIP-L/14 pooled output through ``visual_projection`` (768), not
  normalised; input padded to a black square, resized to 224 (bilinear, antialiased), CLIP mean/std.
- ``arcface`` (PortraitBooth): features of an arcface_torch IResNet. Which layers feed the MLP is
  configurable: shallow stages (``layer1``..``layer4``, global-average-pooled) and/or the deep
  ``embedding``. Each group is L2-normalised and scaled by sqrt(dim) so all groups enter the first
  LayerNorm at the same scale, whatever the backbone's activation sizes. The default is shallow only, as
  the paper (Sec. 4.1): the deep embedding is trained for recognition, not generation.

Delayed subject conditioning: FastComposer's weights were made to be sampled with the plain text for the
first ~20 % of the steps (``start_merge_step`` 10 of 50). ``STEAModel.recommended_start_at`` gives that value
for FastComposer, the value a STEA file stores under ``recommended_start_at`` in its metadata, else 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.config import MetadataConfig

FEATURE_SOURCES = ("clip_image", "arcface")
ARCFACE_LAYERS = ("layer1", "layer2", "layer3", "layer4", "embedding")
# Shallow only (paper Sec. 4.1: recognizer features "are primarily designed for recognition purposes and may not be
# optimal for generation, we choose to extract only the shallow features"): two mid-level stages, 128 + 256 = 384-d
# on r18/r50/r100.
DEFAULT_ARCFACE_LAYERS = ("layer2", "layer3")
# The other choice, kept as an option (--arcface-layers layer3 embedding): adds the deep identity embedding (512-d).
# It is invariant to pose, light and expression by design, so it carries identity strongly on small training sets but
# also pulls the generated face toward the recognizer's notion of identity rather than the reference's appearance.
SHALLOW_AND_DEEP_LAYERS = ("layer3", "embedding")

START_AT_KEY = "recommended_start_at"  # STEA file metadata: the delayed-conditioning start its weights were made for
FASTCOMPOSER_START_AT = 0.2  # FastComposer's published inference: text only for the first 10 of 50 steps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224


class STEAError(ValueError):
    """The STEA weights, features or inputs do not fit together."""


@dataclass
class STEAConfig(MetadataConfig):
    text_dim: int = 768
    feature_dim: int = 768
    hidden_dim: int = 768
    feature_source: str = "clip_image"
    arcface_layers: tuple[str, ...] = ()
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.arcface_layers = tuple(self.arcface_layers)
        if self.feature_source not in FEATURE_SOURCES:
            raise STEAError(f"Unknown STEA feature source {self.feature_source!r}; choose one of {FEATURE_SOURCES}.")
        if self.feature_source == "arcface":
            bad = [name for name in self.arcface_layers if name not in ARCFACE_LAYERS]
            if bad or not self.arcface_layers:
                raise STEAError(
                    f"STEA arcface layers must be a non-empty subset of {ARCFACE_LAYERS}, got {self.arcface_layers}."
                )


class FuseMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, optional residual (FastComposer's ``MLP`` block)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, residual: bool, eps: float = 1e-5) -> None:
        super().__init__()
        if residual and in_dim != out_dim:
            raise STEAError("A residual fuse block needs equal input and output widths.")
        self.layernorm = nn.LayerNorm(in_dim, eps=eps)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class STEAFuse(nn.Module):
    """(…, T) text outputs + (…, F) identity features -> (…, T) augmented subject embeddings."""

    def __init__(self, config: STEAConfig) -> None:
        super().__init__()
        self.config = config
        t, f, h, eps = config.text_dim, config.feature_dim, config.hidden_dim, config.layer_norm_eps
        self.mlp1 = FuseMLP(t + f, h, t, residual=False, eps=eps)
        self.mlp2 = FuseMLP(t, t, t, residual=True, eps=eps)
        self.layer_norm = nn.LayerNorm(t, eps=eps)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if text.shape[-1] != self.config.text_dim:
            raise STEAError(
                f"This STEA fuses {self.config.text_dim}-wide text embeddings, but the text encoder gives "
                f"{text.shape[-1]}. FastComposer/PortraitBooth weights are for SD1.x (CLIP-L, 768)."
            )
        if features.shape[-1] != self.config.feature_dim:
            raise STEAError(
                f"This STEA expects {self.config.feature_dim}-d identity features, got {features.shape[-1]}. "
                "Use the recognizer (and layers) it was trained with."
            )
        u = self.mlp1(torch.cat([text, features.to(text.dtype)], dim=-1)) + text
        return self.layer_norm(self.mlp2(u))


def config_from_fuse_state_dict(sd: dict[str, torch.Tensor], **overrides: Any) -> STEAConfig:
    """Widths from the post-fuse keys: mlp1.fc1 is (H, T+F), mlp1.fc2 is (T, H)."""
    try:
        hidden, in_dim = sd["mlp1.fc1.weight"].shape
        text_dim = sd["mlp1.fc2.weight"].shape[0]
    except KeyError as exc:
        raise STEAError(f"Not a STEA/post-fuse state dict: key {exc} is missing.") from exc
    return STEAConfig(text_dim=int(text_dim), feature_dim=int(in_dim - text_dim), hidden_dim=int(hidden), **overrides)


# ----------------------------------------------------------------------------------------------------
# Identity features
# ----------------------------------------------------------------------------------------------------


def _group_norm(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1) * math.sqrt(features.shape[-1])


def arcface_feature_dims(backbone_config: Any, layers: Sequence[str]) -> int:
    """Total feature width for an IResNetConfig (widths, num_features) and a layer choice."""
    dims = {f"layer{i + 1}": int(w) for i, w in enumerate(backbone_config.widths)}
    dims["embedding"] = int(backbone_config.num_features)
    return sum(dims[name] for name in layers)


def arcface_features(backbone: nn.Module, crops_112: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
    """(N, 112, 112, 3) ArcFace-aligned crops in [0, 1] -> (N, F) STEA features from the chosen layers.

    ``backbone`` is an arcface_torch IResNet (``pipelines.face.arcface.IResNet``). The stages run only as
    deep as the deepest requested layer. Differentiable with respect to the crops.
    """
    if crops_112.dim() != 4 or crops_112.shape[-1] != 3 or tuple(crops_112.shape[1:3]) != (112, 112):
        raise STEAError(f"ArcFace features need (N, 112, 112, 3) aligned crops, got {tuple(crops_112.shape)}.")
    param = next(backbone.parameters())
    # NCHW-contiguous: torch 2.11's CPU backward through IResNet corrupts memory on channels-last input.
    x = crops_112.to(param.device, param.dtype).permute(0, 3, 1, 2).contiguous()
    x = (x - 0.5) / 0.5
    wanted = set(layers)
    depth = max(ARCFACE_LAYERS.index(name) for name in layers)
    found: dict[str, torch.Tensor] = {}
    x = backbone.prelu(backbone.bn1(backbone.conv1(x)))
    for i in range(min(depth + 1, 4)):
        x = getattr(backbone, f"layer{i + 1}")(x)
        if f"layer{i + 1}" in wanted:
            found[f"layer{i + 1}"] = x.mean(dim=(2, 3))
    if "embedding" in wanted:
        flat = backbone.dropout(torch.flatten(backbone.bn2(x), 1))
        found["embedding"] = backbone.features(backbone.fc(flat))
    return torch.cat([_group_norm(found[name]) for name in layers], dim=-1)


def embedding_features(embeddings: torch.Tensor) -> torch.Tensor:
    """Deep-only STEA features from recognizer embeddings (any recognizer that gives them, e.g. insightface)."""
    return _group_norm(embeddings)


def pad_to_square(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> black-padded, centred square (FastComposer's reference-image preprocessing)."""
    h, w = images.shape[-2:]
    if h == w:
        return images
    d = abs(h - w)
    pad = (d // 2, d - d // 2, 0, 0) if h > w else (0, 0, d // 2, d - d // 2)
    return F.pad(images, pad, value=0.0)


def clip_image_input(images: torch.Tensor, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """(N, H, W, 3) RGB in [0, 1] -> (N, 3, size, size) CLIP-normalised, FastComposer style."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] != 3:
        raise STEAError(f"Expected reference images shaped (N, H, W, 3), got {tuple(images.shape)}.")
    x = pad_to_square(images.float().permute(0, 3, 1, 2))
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_image_features(image_encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 768) projected CLIP image embeddings (FastComposer's object embeddings)."""
    param = next(image_encoder.parameters())
    pixels = clip_image_input(images).to(param.device, param.dtype)
    out = image_encoder(pixel_values=pixels)
    embeds = out.image_embeds if hasattr(out, "image_embeds") else out[0]
    return embeds.float()


# ----------------------------------------------------------------------------------------------------
# The model and the fusion into a prompt
# ----------------------------------------------------------------------------------------------------


@dataclass
class SubjectFeatures:
    """What identity features a STEA needs for one subject; one of the fields, per the STEA's source."""

    clip_images: Optional[torch.Tensor] = None  # (N, H, W, 3) reference images/crops in [0, 1]
    arcface_crops: Optional[torch.Tensor] = None  # (N, 112, 112, 3) aligned crops in [0, 1]
    embeddings: Optional[torch.Tensor] = None  # (N, D) recognizer embeddings (deep-only arcface STEA)
    name: str = "subject"


class STEAModel(nn.Module):
    """STEA fuse MLP plus, for the FastComposer flavour, the CLIP image encoder it was trained with."""

    def __init__(self, config: STEAConfig, image_encoder: Optional[nn.Module] = None, source: str = "") -> None:
        super().__init__()
        self.config = config
        self.fuse = STEAFuse(config)
        self.image_encoder = image_encoder
        self.source = source  # where the weights came from, for logs and errors
        self.metadata: dict[str, str] = {}

    @property
    def recommended_start_at(self) -> float:
        """The delayed subject conditioning these weights were made for (share of the sampling on plain text)."""
        stored = self.metadata.get(START_AT_KEY)
        if stored is not None:
            try:
                value = float(stored)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise STEAError(f"{self.source or 'This STEA'}: metadata {START_AT_KEY}={stored!r} is not a share between 0 and 1.")
            return value
        return FASTCOMPOSER_START_AT if self.metadata.get("method") == "fastcomposer" else 0.0

    @property
    def needs_backbone(self) -> bool:
        """True when the features need intermediate layers of an arcface_torch backbone."""
        return self.config.feature_source == "arcface" and tuple(self.config.arcface_layers) != ("embedding",)

    def features(self, subject: SubjectFeatures, backbone: Optional[nn.Module] = None) -> torch.Tensor:
        """(F,) identity features of one subject; several reference faces are averaged."""
        cfg = self.config
        if cfg.feature_source == "clip_image":
            if self.image_encoder is None:
                raise STEAError(f"{self.source or 'This STEA'} has no CLIP image encoder; load the FastComposer checkpoint it came with.")
            if subject.clip_images is None:
                raise STEAError(f"{subject.name}: a FastComposer STEA needs reference face images.")
            feats = clip_image_features(self.image_encoder, subject.clip_images)
        elif backbone is not None and subject.arcface_crops is not None:
            feats = arcface_features(backbone, subject.arcface_crops, cfg.arcface_layers)
        elif not self.needs_backbone and subject.embeddings is not None:
            feats = embedding_features(subject.embeddings)
        elif self.needs_backbone:
            raise STEAError(
                f"{self.source or 'This STEA'} reads ArcFace layers {list(cfg.arcface_layers)}, so it needs a PyTorch "
                "ArcFace backbone (Face Analyzer (PyTorch)) and aligned 112 crops; an embedding alone is not enough."
            )
        else:
            raise STEAError(f"{subject.name}: no recognizer embedding; run Detect Faces with a recognizer.")
        if feats.shape[-1] != cfg.feature_dim:
            raise STEAError(
                f"{self.source or 'This STEA'} expects {cfg.feature_dim}-d features but the identity gives "
                f"{feats.shape[-1]} (layers {list(cfg.arcface_layers) or 'clip image'}). Use the recognizer it was trained with."
            )
        return feats.mean(dim=0)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fuse(text, features)


def fuse_subject_rows(
    cond: torch.Tensor, positions: Sequence[int], features: torch.Tensor, fuse: nn.Module
) -> torch.Tensor:
    """Replace ``cond[:, positions[k]]`` by ``fuse(cond[:, positions[k]], features[k])``; other rows untouched.

    ``cond`` (B, L, T) text-encoder output, ``features`` (S, F) one row per subject. Out of place and
    differentiable (training backpropagates through the fuse MLP).
    """
    if len(positions) != features.shape[0]:
        raise STEAError(f"{len(positions)} subject positions but {features.shape[0]} feature rows.")
    if not positions:
        return cond
    idx = torch.as_tensor(list(positions), device=cond.device, dtype=torch.long)
    if int(idx.max()) >= cond.shape[1] or int(idx.min()) < 0:
        raise STEAError(f"Subject position {int(idx.max())} is outside the {cond.shape[1]}-token conditioning.")
    param = next(fuse.parameters())
    text = cond[:, idx].to(param.device, param.dtype)  # (B, S, T)
    feats = features.to(param.device, param.dtype)[None].expand(cond.shape[0], -1, -1)
    fused = fuse(text, feats).to(cond.device, cond.dtype)
    out = cond.clone()
    out[:, idx] = fused
    return out



def fuse_rows_per_sample(
    cond: torch.Tensor, positions: torch.Tensor, features: torch.Tensor, fuse: nn.Module, active: torch.Tensor
) -> torch.Tensor:
    """Training form: each sample b has its own subject row ``positions[b]`` and features ``features[b]``; rows of
    samples with ``active[b]`` False (text-only or unconditional samples) are left as they are. Differentiable."""
    b = cond.shape[0]
    rows = torch.arange(b, device=cond.device)
    pos = positions.to(cond.device).long()
    text = cond[rows, pos]  # (B, T)
    fused = fuse(text, features.to(cond.device, cond.dtype))
    keep = active.to(cond.device).reshape(b, 1)
    new_rows = torch.where(keep, fused.to(cond.dtype), text)
    out = cond.clone()
    out[rows, pos] = new_rows
    return out
