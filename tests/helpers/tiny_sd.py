"""The random SD1.5 test checkpoint as independent reference models (diffusers / transformers).

The integration checkpoint (``facebooth.devmodels.sd15_checkpoint``) is built from exactly these models and
only renamed to the LDM layout, so a test can compare a ComfyUI-side result against diffusers or transformers
with the very same weights (``tests/integration/test_random_checkpoint.py`` shows that ComfyUI and these
models agree).

* ``unet()`` / ``vae()`` / ``text_encoder()``: fresh fp32 eval-mode copies (read once per process from the
  cached checkpoint file through the same key map; ``devmodels.sd15_checkpoint.build_*`` draws them anew).
* ``clip_tokenizer()``: CLIP-L BPE tokenizer. No download: it reads the copy ComfyUI ships in
  ``$COMFYUI_DIR/comfy/sd1_tokenizer`` (no pip package here ships CLIP's vocab); skips the test without it.
* ``scheduler(kind)``: SD1.x noise schedule as a diffusers scheduler.
* ``checkpoint_file()``: the .safetensors file itself (cached; generated on first use).

Tests import it as ``from helpers import tiny_sd``.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

from facebooth.devmodels.sd15_checkpoint import (
    CLIP_L_TEXT_CONFIG,
    SD15_SCHEDULER_CONFIG,
    SD_VAE_CONFIG,
    TinySD15Config,
    checkpoint_name,
    load_reference_models,
    unet_diffusers_config,
    write_random_sd15_checkpoint,
)

CONFIG = TinySD15Config()
UNET_CONFIG = unet_diffusers_config(CONFIG)
VAE_CONFIG = dict(SD_VAE_CONFIG)
TEXT_CONFIG = dict(CLIP_L_TEXT_CONFIG)
SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG)


@functools.lru_cache(maxsize=None)
def _models(seed: int) -> dict:
    # Read back from the cached file (2 s) rather than re-drawn (10+ s); the weights are the same.
    unet_, vae_, text_ = load_reference_models(checkpoint_file(seed))
    return {"unet": unet_, "vae": vae_, "text": text_}


def _built(kind: str, seed: int):
    return _models(seed)[kind]


def unet(seed: int = 0):
    """``diffusers.UNet2DConditionModel`` with the checkpoint's UNet weights."""
    return copy.deepcopy(_built("unet", seed))


def vae(seed: int = 0):
    """``diffusers.AutoencoderKL`` with the checkpoint's VAE weights (scaling_factor 0.18215)."""
    return copy.deepcopy(_built("vae", seed))


def text_encoder(seed: int = 0):
    """``transformers.CLIPTextModel`` (CLIP-L shape) with the checkpoint's text-encoder weights."""
    return copy.deepcopy(_built("text", seed))


def tokenizer_dir(comfyui_dir: str | os.PathLike | None = None) -> Path | None:
    root = comfyui_dir or os.environ.get("COMFYUI_DIR")
    if not root:
        return None
    folder = Path(root).expanduser() / "comfy" / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None


def clip_tokenizer(comfyui_dir: str | os.PathLike | None = None):
    """CLIP-L tokenizer (77 tokens, pads with the end token like SD1) from ComfyUI's bundled files."""
    folder = tokenizer_dir(comfyui_dir)
    if folder is None:
        import pytest

        pytest.skip("CLIP tokenizer files come from ComfyUI: set COMFYUI_DIR to a ComfyUI source tree")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def scheduler(kind: str = "ddpm"):
    """SD1.x schedule: "ddpm", "ddim" or "euler" (diffusers classes)."""
    import diffusers

    cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[kind]
    import inspect

    # keep only the options this scheduler class takes (DDPM has no set_alpha_to_one, Euler no clip_sample)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in SCHEDULER_CONFIG.items() if k in accepted})


def cache_dir() -> Path:
    return Path(os.environ.get("FACEBOOTH_TEST_CACHE") or Path.home() / ".cache" / "facebooth-test").expanduser()


def checkpoint_file(seed: int = 0) -> Path:
    """The random SD1.5 checkpoint on disk (LDM layout, fp16), generated once into the test cache."""
    return write_random_sd15_checkpoint(cache_dir() / "checkpoints" / checkpoint_name(seed), TinySD15Config(seed=seed))
