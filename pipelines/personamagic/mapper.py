"""PersonaMagic's timestep mapper: t → N token embeddings (input level) + N bypass vectors (V path).

Layout and constants follow the official code (xzhe-Vision/PersonaMagic, NeTI-based), see
``reference/methods.md`` §3.2:

* time code: the standard sinusoidal embedding of the integer timestep, ``time_dim`` = 2048 wide
  (1024 cosines then 1024 sines, frequencies exp(−ln(10000)·k/1024));
* ``input_layer`` Linear(2048 → 200), its weight initialised to the time codes of the anchor timesteps
  400, 402, …, 798 (so its output is a bank of kernels cos-similar to each anchor); trainable. The anchors
  span the dynamic stage: with the IoU stage partition they follow the stage found (``set_anchors``);
* ``timestep_proj``: Linear → LayerNorm → LeakyReLU, twice, to a 128-d time feature;
* base tokens: ``output_layer`` Linear(128 → N·D), plus the supercategory word embedding, then each row
  renormalised to that word's norm (``target_norm``). SDXL (``word_dims`` = (768, 1280)): D = 2048 is the
  CLIP-L row then the CLIP-G row of each token, each renormalised to its own encoder's "face" norm;
* bypass: ``image_proj`` (same MLP shape) on [time feature, CLIP image embedding], then
  ``image_output_layer`` Linear(128 → N·D). Training zeroes it for half the samples.

State-dict keys are the official ones (``input_layer.weight``, ``timestep_proj.0.weight``, …,
``output_layer.0.weight``); the supercategory embedding and its norm are buffers kept out of the state dict
(the official code keeps them in its config), and our files store them under their own keys.

The official image encoder is OpenAI CLIP ViT-B/32 (512-d). ComfyUI cannot load B/32 vision towers, so
``image_dim`` follows the CLIP_VISION model used (ViT-L/14: 768, ViT-H/14: 1024); with 512 the shapes
are the official ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.config import MetadataConfig


@dataclass(frozen=True)
class MapperConfig(MetadataConfig):
    METADATA_KEY: ClassVar[str] = "mapper_config"  # the key files have always used

    token_num: int = 4  # placeholder tokens the mapper fills (official: <new1>…<new4>)
    word_dim: int = 768  # text-encoder width (CLIP-L 768, OpenCLIP-H 1024; SDXL 2048 = CLIP-L ‖ CLIP-G)
    time_dim: int = 2048  # sinusoidal time-code width
    num_anchors: int = 200  # rows of input_layer, initialised at anchor timesteps
    anchor_start: int = 400
    anchor_end: int = 800
    hidden_dim: int = 128
    image_dim: int = 512  # CLIP image-embedding width (official ViT-B/32: 512)
    output_bypass: bool = True
    max_period: float = 10000.0
    leaky_slope: float = 0.01  # torch's LeakyReLU default, as the official nn.LeakyReLU()
    word_dims: Optional[tuple[int, ...]] = None  # several text encoders (SDXL: (768, 1280)), in context order

    def __post_init__(self) -> None:
        if self.word_dims is not None:
            object.__setattr__(self, "word_dims", tuple(int(d) for d in self.word_dims))  # JSON gives a list
            if sum(self.word_dims) != self.word_dim:
                raise ValueError(f"the encoders' widths {self.word_dims} do not add up to word_dim {self.word_dim}")
        if self.time_dim % 2:
            raise ValueError(f"time_dim must be even (cos and sin halves), got {self.time_dim}")
        if self.num_anchors < 1 or self.anchor_end <= self.anchor_start:
            raise ValueError(
                f"{self.num_anchors} anchors do not fit between timesteps {self.anchor_start} and {self.anchor_end}"
            )
        if self.token_num < 1:
            raise ValueError(f"token_num must be at least 1, got {self.token_num}")

    @property
    def anchors(self) -> torch.Tensor:
        """Anchor timesteps start + k·(end − start)/num_anchors: the official range(start, end, (end − start) //
        num_anchors) whenever num_anchors divides the stage (400..798 step 2), and still spread over the whole
        stage when it does not (a stage found by IoU may be narrower than 200 timesteps)."""
        step = (self.anchor_end - self.anchor_start) / self.num_anchors
        return torch.arange(self.num_anchors, dtype=torch.float64) * step + self.anchor_start


def sinusoidal_time_code(timesteps: torch.Tensor, dim: int = 2048, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps → (B, dim): [cos(t·f_k) for k < dim/2] ++ [sin(t·f_k)], f_k = exp(−ln(max_period)·k/(dim/2)).

    float32 throughout, as the official code (and diffusers' ``get_timestep_embedding``) computes it.
    """
    half = dim // 2
    device = timesteps.device
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp(in_dim: int, hidden: int, slope: float) -> nn.Sequential:
    # indices 0, 1, 3, 4 carry weights: the official keys timestep_proj.0/.1/.3/.4
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(slope),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(slope),
    )


@dataclass
class MapperOutput:
    base: torch.Tensor  # (B, N, D) input token embeddings, each of norm target_norm
    bypass: Optional[torch.Tensor]  # (B, N, D) V-path residuals, or None without a bypass branch


class PersonaMagicMapper(nn.Module):
    def __init__(self, config: MapperConfig, word_embedding: torch.Tensor):
        super().__init__()
        if word_embedding.shape != (config.word_dim,):
            raise ValueError(
                f"the supercategory embedding has shape {tuple(word_embedding.shape)}, expected ({config.word_dim},)"
            )
        self.config = config
        c = config
        self.input_layer = nn.Linear(c.time_dim, c.num_anchors)
        with torch.no_grad():
            self.input_layer.weight.copy_(sinusoidal_time_code(c.anchors, c.time_dim, c.max_period))
        self.timestep_proj = _mlp(c.num_anchors, c.hidden_dim, c.leaky_slope)
        self.output_layer = nn.Sequential(nn.Linear(c.hidden_dim, c.token_num * c.word_dim))
        if c.output_bypass:
            self.image_proj = _mlp(c.hidden_dim + c.image_dim, c.hidden_dim, c.leaky_slope)
            self.image_output_layer = nn.Sequential(nn.Linear(c.hidden_dim, c.token_num * c.word_dim))
        word = word_embedding.detach().float().clone()
        self.register_buffer("word_embedding", word, persistent=False)
        norm = word.norm() if c.word_dims is None else torch.stack([w.norm() for w in word.split(list(c.word_dims))])
        self.register_buffer("target_norm", norm, persistent=False)

    @torch.no_grad()
    def set_anchors(self, start: int, end: int) -> None:
        """Move the anchors to the dynamic stage [start, end) and re-initialise ``input_layer``'s weight to their
        time codes (the official initialisation, for the stage actually trained)."""
        self.config = replace(self.config, anchor_start=int(start), anchor_end=int(end))
        c = self.config
        w = self.input_layer.weight
        w.copy_(sinusoidal_time_code(c.anchors, c.time_dim, c.max_period).to(w.device, w.dtype))

    def time_feature(self, timesteps: torch.Tensor) -> torch.Tensor:
        code = sinusoidal_time_code(timesteps, self.config.time_dim, self.config.max_period)
        w = self.input_layer.weight
        return self.timestep_proj(self.input_layer(code.to(w.device, w.dtype)))

    def forward(
        self,
        timesteps: torch.Tensor,
        image_embeds: Optional[torch.Tensor] = None,
        bypass_keep: Optional[torch.Tensor] = None,
    ) -> MapperOutput:
        """``timesteps`` (B,) or scalar; ``image_embeds`` (B, image_dim) or (image_dim,), needed for the bypass.

        ``bypass_keep`` (B,) of 0/1 multiplies each sample's bypass (training drops it with p = 0.5).
        """
        c = self.config
        t = timesteps.reshape(-1)
        b = t.shape[0]
        feat = self.time_feature(t)
        base = self.output_layer(feat).view(b, c.token_num, c.word_dim) + self.word_embedding.to(feat.dtype)
        norm = self.target_norm.to(feat.dtype)
        if c.word_dims is None:
            base = F.normalize(base, dim=-1) * norm
        else:  # each encoder's part of the row keeps that encoder's "face" norm
            parts = base.split(list(c.word_dims), dim=-1)
            base = torch.cat([F.normalize(p, dim=-1) * n for p, n in zip(parts, norm)], dim=-1)
        bypass = None
        if c.output_bypass:
            if image_embeds is None:
                raise ValueError("this mapper has a bypass branch: give the CLIP image embedding of the reference")
            img = image_embeds.to(feat.device, feat.dtype)
            img = img.reshape(1, -1).expand(b, -1) if img.dim() == 1 else img
            if img.shape != (b, c.image_dim):
                raise ValueError(
                    f"image embedding shape {tuple(img.shape)} does not fit {b} timesteps × {c.image_dim} "
                    "(the CLIP vision model differs from the one used in training)"
                )
            bypass = self.image_output_layer(self.image_proj(torch.cat([feat, img], dim=-1)))
            bypass = bypass.view(b, c.token_num, c.word_dim)
            if bypass_keep is not None:
                bypass = bypass * bypass_keep.to(bypass.dtype).view(b, 1, 1)
        return MapperOutput(base=base, bypass=bypass)


def config_from_state_dict(state: dict, word_dim: int, **overrides) -> MapperConfig:
    """Shapes from an official-layout mapper state dict; ``word_dim`` from the supercategory embedding
    (4 × 768 and 3 × 1024 give the same output width). Anchor range / period come from ``overrides``."""
    anchors, time_dim = state["input_layer.weight"].shape
    hidden = state["timestep_proj.0.weight"].shape[0]
    out = state["output_layer.0.weight"].shape[0]
    bypass = "image_proj.0.weight" in state
    image_dim = state["image_proj.0.weight"].shape[1] - hidden if bypass else overrides.pop("image_dim", 512)
    if out % word_dim:
        raise ValueError(f"output_layer gives {out} values, not a multiple of the {word_dim}-wide embeddings")
    return MapperConfig(
        token_num=out // word_dim, word_dim=word_dim, time_dim=time_dim, num_anchors=anchors, hidden_dim=hidden,
        image_dim=image_dim, output_bypass=bypass, **overrides,
    )
