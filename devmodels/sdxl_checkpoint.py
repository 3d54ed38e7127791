"""A small random SDXL-family checkpoint that ComfyUI detects (as KOALA-700M, an SDXL class).

Why: the SDXL paths of Cross Initialization, PersonaMagic and MultiDiffusion must run end to end in a real
ComfyUI without downloadable weights. What ComfyUI needs to see, measured by loading candidates:

* **UNet** (``model.diffusion_model.*``, LDM layout). ComfyUI matches the SDXL family on ``model_channels``
  320, linear transformer projections, ``context_dim`` 2048, ``adm_in_channels`` 2816 and the
  ``transformer_depth`` list, not on ``channel_mult``. So 320 channels at three levels (``channel_mult``
  [1, 1, 1]), one res block per level, transformer depths [0, 2, 5] and no middle block is KOALA_700M's
  signature. With shallower decoder transformers (not matched either) it has 80 M parameters and takes
  well under a second per 64-px step on 2 CPU cores. (A single-level variant is smaller but ten times
  slower per step: all attention then runs at full latent resolution.)
* **Text encoders at full size.** ComfyUI builds CLIP-L and CLIP-G from fixed configs: a narrower CLIP-G
  fails to load and a shallower one loads with missing keys and gives NaN conditioning. CLIP-L goes under
  ``conditioner.embedders.0.transformer.text_model.*`` (written explicitly: transformers 5 drops the
  ``text_model.`` prefix from ``CLIPTextModel.state_dict()``, ComfyUI's SDXL path does not add it back, and
  CLIP-L would silently load as garbage), CLIP-G in open_clip layout under ``conditioner.embedders.1.model.*``.
* **TAESD in the VAE slot** (``first_stage_model.taesd_encoder/decoder.*``): ComfyUI accepts it and it
  decodes ~8x faster than the full VAE.

The file is ~1.8 GB at fp16, so it is generated once into a cache and found again by its fingerprint.
Weights come from seeded generators with a small std; tensor names and shapes come from diffusers /
transformers models built on the meta device (no memory, no slow init).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..pipelines.ldm_keys import unet_diffusers_to_ldm
from .sd15_checkpoint import CLIP_L_TEXT_CONFIG, write_random_checkpoint
from .sd15_checkpoint import read_fingerprint as read_checkpoint_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
METADATA_KIND = "facebooth.random_sdxl"
DEFAULT_CHECKPOINT_NAME = "facebooth_random_sdxl.safetensors"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder): ComfyUI's clip_config_bigg.json.
CLIP_G_TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
}

# SDXL noise schedule (same as SD1.x: scaled-linear betas, epsilon prediction).
SDXL_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def checkpoint_name(seed: int = 0) -> str:
    return DEFAULT_CHECKPOINT_NAME if seed == 0 else f"facebooth_random_sdxl_seed{seed}.safetensors"


@dataclass(frozen=True)
class TinySDXLConfig:
    """Everything that decides the weights. Change a field and the cached file is regenerated."""

    seed: int = 0
    init_std: float = 0.02
    model_channels: int = 320  # SDXL-family detection needs 320
    channel_mult: tuple[int, ...] = (1, 1, 1)
    num_res_blocks: int = 1
    transformer_depth: tuple[int, ...] = (0, 2, 5)  # KOALA-700M's list: detected as an SDXL-family model
    # Decoder depths are not part of the match: shallower ones keep the UNet at ~60 M parameters.
    up_transformer_depth: tuple[int, ...] = (0, 1, 2)
    head_channels: int = 64  # SDXL: num_head_channels 64
    context_dim: int = 2048  # CLIP-L 768 + CLIP-G 1280
    adm_in_channels: int = 2816  # pooled CLIP-G 1280 + 6 size/crop values x 256

    def fingerprint(self) -> str:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, sort_keys=True)


def unet_diffusers_config(cfg: TinySDXLConfig = TinySDXLConfig()) -> dict:
    """Kwargs for ``diffusers.UNet2DConditionModel`` with the checkpoint's UNet shape (SDXL's text_time adm)."""
    levels = len(cfg.channel_mult)
    if len(cfg.transformer_depth) != levels or len(cfg.up_transformer_depth) != levels:
        raise ValueError("transformer_depth and up_transformer_depth need one depth per channel_mult level")
    if any(bool(a) != bool(b) for a, b in zip(cfg.transformer_depth, cfg.up_transformer_depth)):
        raise ValueError("a level has attention in both halves of the UNet or in neither")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth]
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)],
        "mid_block_type": None,  # KOALA has no middle block
        # Per level and res block; the decoder's levels run in reverse with one more res block each.
        "transformer_layers_per_block": [[max(1, d)] * cfg.num_res_blocks for d in cfg.transformer_depth],
        "reverse_transformer_layers_per_block": [
            [max(1, d)] * (cfg.num_res_blocks + 1) for d in reversed(cfg.up_transformer_depth)
        ],
        "attention_head_dim": [w // cfg.head_channels for w in widths],  # diffusers' SDXL configs: head counts
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


# ---------------------------------------------------------------------------------------------- names
def unet_shapes(cfg: TinySDXLConfig = TinySDXLConfig()) -> dict[str, torch.Size]:
    """LDM key (without prefix) -> shape of the checkpoint's UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_diffusers_config(cfg))
    sd = unet.state_dict()
    adm = {k: sd.pop(k) for k in list(sd) if k.startswith("add_embedding.")}
    out = {k: v.shape for k, v in unet_diffusers_to_ldm(sd).items()}
    for k, v in adm.items():  # the SDXL "label" embedding: Linear, SiLU, Linear
        out[k.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2", "label_emb.0.2")] = v.shape
    return out


def clip_l_shapes() -> dict[str, torch.Size]:
    """CLIP-L text keys after ``text_model.`` (no position_ids buffer)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    return {k.removeprefix("text_model."): v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def clip_g_shapes(config: dict = CLIP_G_TEXT_CONFIG) -> dict[str, torch.Size]:
    """CLIP-G in open_clip layout: fused q/k/v ``in_proj``, ``text_projection`` stored as (width, proj)."""
    d, ff, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    out: dict[str, torch.Size] = {
        "token_embedding.weight": torch.Size([config["vocab_size"], d]),
        "positional_embedding": torch.Size([config["max_position_embeddings"], d]),
        "ln_final.weight": torch.Size([d]),
        "ln_final.bias": torch.Size([d]),
        "text_projection": torch.Size([d, config["projection_dim"]]),
        "logit_scale": torch.Size([]),
    }
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        out.update({
            p + "ln_1.weight": torch.Size([d]), p + "ln_1.bias": torch.Size([d]),
            p + "attn.in_proj_weight": torch.Size([3 * d, d]), p + "attn.in_proj_bias": torch.Size([3 * d]),
            p + "attn.out_proj.weight": torch.Size([d, d]), p + "attn.out_proj.bias": torch.Size([d]),
            p + "ln_2.weight": torch.Size([d]), p + "ln_2.bias": torch.Size([d]),
            p + "mlp.c_fc.weight": torch.Size([ff, d]), p + "mlp.c_fc.bias": torch.Size([ff]),
            p + "mlp.c_proj.weight": torch.Size([d, ff]), p + "mlp.c_proj.bias": torch.Size([d]),
        })
    return out


def taesd_shapes(latent_channels: int = 4) -> dict[str, torch.Size]:
    """TAESD (tiny autoencoder) keys as ComfyUI's ``comfy.taesd.taesd.TAESD`` names them.

    Encoder: conv 3->64, then three (stride-2 conv + 3 blocks) stages, conv 64->latent. Decoder: (clamp),
    conv latent->64, relu, three (3 blocks, upsample, conv) stages, block, conv 64->3. A block is three
    3x3 convs; all widths are 64, so no skip conv.
    """
    def conv(n_in: int, n_out: int, bias: bool = True, k: int = 3) -> dict[str, torch.Size]:
        d = {"weight": torch.Size([n_out, n_in, k, k])}
        if bias:
            d["bias"] = torch.Size([n_out])
        return d

    def block() -> dict[str, torch.Size]:
        return {f"conv.{j}.{n}": s for j in (0, 2, 4) for n, s in conv(64, 64).items()}

    enc: list[dict | None] = [conv(3, 64), block()]
    for _ in range(3):
        enc += [conv(64, 64, bias=False), block(), block(), block()]
    enc.append(conv(64, latent_channels))
    dec: list[dict | None] = [None, conv(latent_channels, 64), None]
    for _ in range(3):
        dec += [block(), block(), block(), None, conv(64, 64, bias=False)]
    dec += [block(), conv(64, 3)]
    out: dict[str, torch.Size] = {}
    for name, layers in (("taesd_encoder", enc), ("taesd_decoder", dec)):
        for i, layer in enumerate(layers):
            for k, s in (layer or {}).items():
                out[f"{name}.{i}.{k}"] = s
    out["vae_scale"] = torch.Size([])
    out["vae_shift"] = torch.Size([])
    return out


# ---------------------------------------------------------------------------------------------- weights
_FIXED = {"logit_scale": 4.6052, "vae_scale": 1.0, "vae_shift": 0.0}  # scalars with a meaning, not noise


def _is_norm_scale(name: str, shape: torch.Size) -> bool:
    # Linear and conv weights are 2-D or more, so a 1-D "weight" is always a norm's scale.
    return len(shape) == 1 and name.endswith("weight")


def _random_tensors(shapes: dict[str, torch.Size], seed: int, std: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded fp16 noise per tensor, in key order; norm scales are 1 + noise, named scalars fixed."""
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        shape = shapes[name]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _FIXED:
            yield name, torch.tensor(_FIXED[leaf], dtype=torch.float16).reshape(shape)
            continue
        noise = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        if _is_norm_scale(name, shape):
            noise += 1.0
        yield name, noise.to(torch.float16)


def ldm_state_dict(cfg: TinySDXLConfig = TinySDXLConfig()) -> dict[str, torch.Tensor]:
    """The whole checkpoint (fp16), SDXL key layout."""
    sd: dict[str, torch.Tensor] = {}
    parts = (
        (UNET_PREFIX, unet_shapes(cfg), cfg.seed),
        (VAE_PREFIX, taesd_shapes(), cfg.seed + 1),
        (CLIP_L_PREFIX, clip_l_shapes(), cfg.seed + 2),
        (CLIP_G_PREFIX, clip_g_shapes(), cfg.seed + 3),
    )
    for prefix, shapes, seed in parts:
        for name, value in _random_tensors(shapes, seed, cfg.init_std):
            sd[prefix + name] = value
    return sd


# ---------------------------------------------------------------------------------------------- file
def read_fingerprint(path: str | Path) -> str | None:
    """The fingerprint recorded in an existing random SDXL checkpoint, or None when absent / unreadable / foreign."""
    return read_checkpoint_fingerprint(path, METADATA_KIND)


def write_random_sdxl_checkpoint(path: str | Path, cfg: TinySDXLConfig = TinySDXLConfig(), *, force: bool = False) -> Path:
    """Write the random SDXL-family checkpoint (~1.8 GB) to ``path`` (atomically) unless an identical one is there."""
    return write_random_checkpoint(
        path, kind=METADATA_KIND, fingerprint=cfg.fingerprint(), seed=cfg.seed, base_model="sdxl",
        note="random weights for tests (KOALA-like UNet, full CLIP-L/CLIP-G, TAESD); produces noise",
        state_dict=lambda: ldm_state_dict(cfg), force=force, format_version=FORMAT_VERSION,
    )
