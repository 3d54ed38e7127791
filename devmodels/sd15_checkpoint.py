"""A small random Stable Diffusion 1.5 checkpoint that ComfyUI detects as SD15.

Why: no pretrained weights can be downloaded here, yet the nodes must run end to end in a real ComfyUI.
The checkpoint keeps everything ComfyUI uses to recognise SD1.5 and everything our methods touch at full
size, and shrinks only the UNet depth:

* UNet in the original LDM key layout (``model.diffusion_model.*``): ``model_channels`` 320,
  ``context_dim`` 768, 8 heads, conv ``proj_in`` (``use_linear_in_transformer`` False), but
  ``channel_mult`` [1, 2] and ``num_res_blocks`` [1, 1]. Those are SD1.5's first two levels, which both
  carry a cross-attention transformer in SD1.5, so attention sits at both levels and in the middle block.
* Full-size CLIP-L text encoder (``cond_stage_model.transformer.text_model.*``), 77 positions, 49408 tokens.
* Full-size SD VAE (``first_stage_model.*``).

The models are built with diffusers (UNet, VAE) and transformers (CLIP text model) and converted to the
LDM layout with the mapping below, so tests can get the *same* weights as independent reference models
(``build_unet`` / ``build_vae`` / ``build_text_encoder``). Weights are drawn from a seeded generator with a
small std (sampling stays numerically tame) and rounded to fp16, the on-disk dtype, so the in-memory fp32
reference models equal the file bit for bit.

The file records its seed and config in the safetensors metadata; ``write_random_sd15_checkpoint`` skips
generation when a file with the same fingerprint already exists.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..pipelines.ldm_keys import LDM_CLIP, LDM_UNET, LDM_VAE, clip_text_to_ldm, unet_diffusers_to_ldm, vae_diffusers_to_ldm
from ..utils.files import atomic_save_safetensors

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
DEFAULT_CHECKPOINT_NAME = "facebooth_random_sd15.safetensors"


def checkpoint_name(seed: int = 0) -> str:
    """File name for a given seed; seed 0 is the default that example runs and tests share."""
    return DEFAULT_CHECKPOINT_NAME if seed == 0 else f"facebooth_random_sd15_seed{seed}.safetensors"

METADATA_KIND = "facebooth.random_sd15"

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = LDM_UNET, LDM_VAE, LDM_CLIP

# CLIP ViT-L/14 text tower, as used by SD1.x.
CLIP_L_TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# The SD1.x VAE (kl-f8).
SD_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# SD1.x noise schedule (diffusers scheduler kwargs).
SD15_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class TinySD15Config:
    """Everything that decides the weights. Change a field and the cached file is regenerated."""

    seed: int = 0
    init_std: float = 0.02
    model_channels: int = 320  # SD15 detection needs 320
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (True, True)
    num_heads: int = 8  # ComfyUI's SD15 config: num_heads 8, num_head_channels -1
    context_dim: int = 768  # SD15 detection needs 768

    def fingerprint(self) -> str:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, sort_keys=True)


# ----------------------------------------------------------------------------------------------------
# Reference models (diffusers / transformers), deterministic from the seed
# ----------------------------------------------------------------------------------------------------


def unet_diffusers_config(cfg: TinySD15Config = TinySD15Config()) -> dict:
    """Kwargs for ``diffusers.UNet2DConditionModel`` matching the checkpoint's UNet."""
    if len(cfg.attention_levels) != len(cfg.channel_mult):
        raise ValueError("attention_levels needs one flag per channel_mult level")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": cfg.num_heads,  # diffusers' SD1 configs name the head *count* this way
        "norm_num_groups": 32,
        "use_linear_projection": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def _randomize_(module: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter with small seeded noise, rounded to fp16 precision.

    1-D ``weight`` tensors are normalisation scales: they get 1 + noise so activations keep their size.
    Biases and norm shifts are random too (not zero) so a dropped bias shows up in exactness tests.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if name.endswith("weight") and p.ndim == 1:
                noise += 1.0
            p.copy_(noise.half().float())


def build_unet(cfg: TinySD15Config = TinySD15Config()):
    """The checkpoint's UNet as a ``diffusers.UNet2DConditionModel`` (fp32, eval mode)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_diffusers_config(cfg))
    _randomize_(unet, cfg.seed, cfg.init_std)
    return unet.eval()


def build_vae(cfg: TinySD15Config = TinySD15Config()):
    """The checkpoint's VAE as a ``diffusers.AutoencoderKL`` (fp32, eval mode)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE_CONFIG)
    _randomize_(vae, cfg.seed + 1, cfg.init_std)
    return vae.eval()


def build_text_encoder(cfg: TinySD15Config = TinySD15Config()):
    """The checkpoint's text encoder as a ``transformers.CLIPTextModel`` (CLIP-L shape, fp32, eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    _randomize_(model, cfg.seed + 2, cfg.init_std)
    return model.eval()


def ldm_state_dict(cfg: TinySD15Config = TinySD15Config(), models: Iterable | None = None) -> dict[str, torch.Tensor]:
    """The full checkpoint in LDM layout (fp16). ``models`` = (unet, vae, text_encoder) to reuse built ones."""
    unet, vae, text = models if models is not None else (build_unet(cfg), build_vae(cfg), build_text_encoder(cfg))
    sd: dict[str, torch.Tensor] = {}
    for k, v in unet_diffusers_to_ldm(unet.state_dict()).items():
        sd[UNET_PREFIX + k] = v
    for k, v in vae_diffusers_to_ldm(vae.state_dict()).items():
        sd[VAE_PREFIX + k] = v
    for k, v in clip_text_to_ldm(text.state_dict()).items():
        sd[CLIP_PREFIX + k] = v
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def _load_into(model: torch.nn.Module, to_ldm, file_sd: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """Fill a meta-device ``model`` from LDM-layout tensors, using the forward key map (one key in, one out,
    order kept) so the names are exactly those the file was written with."""
    own = model.state_dict()
    ldm_names = list(to_ldm(own).keys())
    if len(ldm_names) != len(own):
        raise RuntimeError("key conversion is not one-to-one")
    state = {}
    for (name, ref), ldm in zip(own.items(), ldm_names):
        if prefix + ldm not in file_sd:
            raise KeyError(f"{prefix + ldm} missing from the checkpoint")
        state[name] = file_sd[prefix + ldm].to(torch.float32).reshape(ref.shape)
    model.load_state_dict(state, strict=True, assign=True)
    for name, buf in model.named_buffers():
        if buf.is_meta:  # non-persistent buffers are not in files; only CLIP's position ids exist here
            if not name.endswith("position_ids"):
                raise RuntimeError(f"cannot materialise buffer {name}")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval()


def load_reference_models(path: str | Path):
    """(unet, vae, text_encoder) as diffusers / transformers fp32 models, read from a checkpoint written by
    ``write_random_sd15_checkpoint``. Same weights as ``build_*`` for its config, without the slow random init."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    fingerprint = read_fingerprint(path)
    if fingerprint is None:
        raise ValueError(f"{path} was not written by write_random_sd15_checkpoint")
    data = json.loads(fingerprint)
    data.pop("format_version", None)
    cfg = TinySD15Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    file_sd = load_file(str(path))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_diffusers_config(cfg))
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    return (
        _load_into(unet, unet_diffusers_to_ldm, file_sd, UNET_PREFIX),
        _load_into(vae, vae_diffusers_to_ldm, file_sd, VAE_PREFIX),
        _load_into(text, clip_text_to_ldm, file_sd, CLIP_PREFIX),
    )


# ----------------------------------------------------------------------------------------------------
# File
# ----------------------------------------------------------------------------------------------------


def read_fingerprint(path: str | Path, kind: str = METADATA_KIND) -> str | None:
    """The fingerprint recorded in an existing checkpoint of ``kind``, or None when absent / unreadable / foreign."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # truncated or foreign file: regenerate
        return None
    if meta.get("facebooth.kind") != kind:
        return None
    return meta.get("facebooth.fingerprint")


def write_random_checkpoint(path: str | Path, *, kind: str, fingerprint: str, seed: int, base_model: str, note: str,
                            state_dict: Callable[[], dict[str, torch.Tensor]], force: bool = False,
                            format_version: str = FORMAT_VERSION) -> Path:
    """Write a random test checkpoint (``state_dict()`` built only when needed) to ``path`` atomically, unless one
    with the same ``kind`` and ``fingerprint`` is already there. Shared by the SD1.5 and SDXL test checkpoints."""
    path = Path(path)
    if not force and read_fingerprint(path, kind) == fingerprint:
        log.info("Random %s checkpoint already present: %s", base_model, path)
        return path
    log.info("Writing random %s checkpoint (seed %d) to %s", base_model, seed, path)
    metadata = {
        "facebooth.kind": kind,
        "facebooth.fingerprint": fingerprint,
        "facebooth.seed": str(seed),
        "facebooth.format_version": format_version,
        "facebooth.base_model": base_model,
        "facebooth.note": note,
    }
    return atomic_save_safetensors(state_dict(), path, metadata=metadata)


def write_random_sd15_checkpoint(path: str | Path, cfg: TinySD15Config = TinySD15Config(), *, force: bool = False) -> Path:
    """Write the random SD1.5 checkpoint to ``path`` (atomically) unless an identical one is already there."""
    return write_random_checkpoint(
        path, kind=METADATA_KIND, fingerprint=cfg.fingerprint(), seed=cfg.seed, base_model="sd15",
        note="random weights for tests; produces noise, not pictures", state_dict=lambda: ldm_state_dict(cfg), force=force,
    )
