"""Face2Diffusion's multi-scale identity (MSID) encoder.

A plain ViT (timm layout: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.*``, ``norm``) whose
CLS token is read after a few blocks (0-based [2, 5, 8, 11] in the official model), each through its own
``norms.layer_{i}`` = BatchNorm1d -> LayerNorm, and concatenated: 4 x 384 = 1536-d for the official weights.
State-dict keys are exactly those of the official ``msid.pt``, so that file loads unchanged.

Input: ArcFace-aligned 112x112 RGB crops scaled to [-1, 1] (see :func:`preprocess_aligned`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from einops import rearrange
import torch
import torch.nn.functional as F
from torch import nn

from ...utils.config import MetadataConfig


@dataclass
class MSIDConfig(MetadataConfig):
    """Shapes of the encoder. Defaults are the official ``msid_base_patch8_112``."""

    img_size: int = 112
    patch_size: int = 8
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6  # the ViT's own LayerNorms; the per-level heads use torch's defaults (1e-5)
    feature_blocks: tuple[int, ...] = field(default=(2, 5, 8, 11))

    def __post_init__(self) -> None:
        self.feature_blocks = tuple(sorted(int(i) for i in self.feature_blocks))
        if self.img_size % self.patch_size:
            raise ValueError(f"MSID img_size {self.img_size} is not a multiple of patch_size {self.patch_size}.")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"MSID embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if not self.feature_blocks or min(self.feature_blocks) < 0 or max(self.feature_blocks) >= self.depth:
            raise ValueError(f"MSID feature_blocks {self.feature_blocks} must be block indices in [0, {self.depth}).")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def feature_dim(self) -> int:
        """Width of the concatenated identity vector (1536 for the official model)."""
        return self.embed_dim * len(self.feature_blocks)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MSIDConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, cfg: MSIDConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, cfg: MSIDConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale, no drop path: none are in the official weights)."""

    def __init__(self, cfg: MSIDConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MSIDEncoder(nn.Module):
    """ViT identity encoder returning the concatenated per-level CLS features."""

    def __init__(self, config: MSIDConfig | None = None):
        super().__init__()
        self.config = cfg = config or MSIDConfig()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # Present in the official checkpoint but not on the feature path; kept so its keys load strictly.
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.norms = nn.ModuleDict(
            {f"layer_{i}": nn.Sequential(nn.BatchNorm1d(cfg.embed_dim), nn.LayerNorm(cfg.embed_dim)) for i in cfg.feature_blocks}
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Same recipe as the official/timm ViT init (trunc-normal 0.02, zero biases), so training starts sanely.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def forward_levels(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> one normalised (B, embed_dim) CLS feature per feature block, in block order."""
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1] != cfg.in_chans or pixels.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(
                f"MSID expects (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) aligned face crops, got {tuple(pixels.shape)}. "
                "Use preprocess_aligned() on ArcFace-aligned 112x112 crops."
            )
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        feats = []
        last = cfg.feature_blocks[-1]
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in cfg.feature_blocks:
                feats.append(self.norms[f"layer_{i}"](x[:, 0]))
            if i == last:  # later blocks do not feed any feature
                break
        return feats

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, feature_dim) multi-scale identity vector v_id."""
        return torch.cat(self.forward_levels(pixels), dim=1)


def preprocess_aligned(crops: torch.Tensor, size: int = 112) -> torch.Tensor:
    """ArcFace-aligned crops (N, S, S, 3) or (S, S, 3), RGB in [0, 1] -> (N, 3, S, S) in [-1, 1] (official: (x-0.5)/0.5)."""
    if crops.ndim == 3:
        crops = crops.unsqueeze(0)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"Expected aligned face crops shaped (N, {size}, {size}, 3), got {tuple(crops.shape)}.")
    if crops.shape[1:3] != (size, size):
        raise ValueError(
            f"Face2Diffusion needs ArcFace-aligned {size}x{size} crops (kind 'arcface_{size}'), got {crops.shape[1]}x{crops.shape[2]}. "
            "Align the face with the 5-point ArcFace template first."
        )
    x = crops.permute(0, 3, 1, 2).float()
    return (x - 0.5) / 0.5


@torch.no_grad()
def encode_identity(encoder: MSIDEncoder, crops: torch.Tensor) -> torch.Tensor:
    """Aligned crops (N, S, S, 3) in [0, 1] -> (N, feature_dim) identity vectors, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()  # BatchNorm must use its running statistics, as in the official inference
    try:
        p = next(encoder.parameters())
        pixels = preprocess_aligned(crops, encoder.config.img_size).to(device=p.device, dtype=p.dtype)
        return encoder(pixels)
    finally:
        encoder.train(was_training)


def msid_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> MSIDConfig:
    """Read the encoder's shapes from an official-layout state dict.

    The head count is not stored in the weights: it comes from ``num_heads`` (our files keep it in their
    metadata) or, for a plain official file, from the official 32-d heads (12 heads at width 384).
    """
    try:
        embed_dim = int(sd["cls_token"].shape[-1])
        proj = sd["patch_embed.proj.weight"]
        n_tokens = int(sd["pos_embed"].shape[1])
        mlp_hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise KeyError(f"not an MSID encoder state dict: key {exc} is missing") from exc
    patch = int(proj.shape[-1])
    grid = int(round((n_tokens - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    blocks = sorted({int(k.split(".")[1][len("layer_"):]) for k in sd if k.startswith("norms.layer_")})
    return MSIDConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=int(proj.shape[1]),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(num_heads) if num_heads else max(1, embed_dim // 32),
        mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        feature_blocks=tuple(blocks),
    )


def level_slices(config: MSIDConfig) -> Sequence[slice]:
    """Where each level's feature sits inside the concatenated vector."""
    d = config.embed_dim
    return [slice(k * d, (k + 1) * d) for k in range(len(config.feature_blocks))]
