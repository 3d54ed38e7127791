"""The textual-inversion backend over a local diffusers Stable Diffusion folder (CLI and training scripts).

Offline only: every load uses ``local_files_only``. The text encoder is rebuilt as our autograd-safe
``CLIPTextEncoder`` from the folder's weights ("last" layer: diffusers already ships SD2's tower cut at
the penultimate layer), so the same injection code serves diffusers and ComfyUI.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..text_encoder import CLIPTextEncoder, PromptTokenizer
from .backend import EncodedImages, TextTower, TIBackend

log = logging.getLogger(__name__)

_FAMILY_BY_WIDTH = {768: ("sd1", "clip_l"), 1024: ("sd2", "clip_h")}


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and freeze; cast only when needed (diffusers warns on a no-op dtype cast)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).requires_grad_(False).eval()


class DiffusersBackend(TIBackend):
    def __init__(
        self,
        unet,
        vae,
        text_encoder: CLIPTextEncoder,
        tokenizer: PromptTokenizer,
        scheduler,
        *,
        family: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        width = text_encoder.hidden_size
        guessed, key = _FAMILY_BY_WIDTH.get(width, ("sd1", "clip_l"))
        self.family = family or guessed
        key = {"sd1": "clip_l", "sd2": "clip_h"}.get(self.family, key)
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _place(unet, self.device, dtype)
        self.vae = _place(vae, self.device, dtype)
        encoder = _place(text_encoder, self.device, dtype)
        self.text_encoders = [TextTower(key=key, encoder=encoder, tokenizer=tokenizer)]
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.prediction_type
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        context_dim = getattr(unet.config, "cross_attention_dim", width)
        if context_dim != width:
            raise ValueError(
                f"The UNet expects {context_dim}-wide text context but the text encoder gives {width}: "
                "the folder mixes model families."
            )

    @classmethod
    def from_pretrained(
        cls, folder: Union[str, Path], *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32
    ) -> "DiffusersBackend":
        """Load unet / vae / text_encoder / tokenizer / scheduler from a local diffusers folder."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        missing = [n for n in needed if not (folder / n).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a diffusers Stable Diffusion folder: it lacks {', '.join(missing)}. "
                "Point --pretrained at the folder that holds model_index.json (e.g. a saved stable-diffusion-2-1-base)."
            )
        if (folder / "text_encoder_2").is_dir():
            raise NotImplementedError("SDXL diffusers folders are not supported yet; use an SD1.x or SD2.x folder.")
        kw = {"local_files_only": True}
        hf_text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)
        encoder = CLIPTextEncoder.from_state_dict(
            hf_text.state_dict(),
            hidden_act=hf_text.config.hidden_act,
            num_heads=hf_text.config.num_attention_heads,
            layer_norm_eps=hf_text.config.layer_norm_eps,
            dtype=torch.float32,
        )
        del hf_text
        tokenizer = PromptTokenizer.from_hf(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw))
        return cls(
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
            AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw),
            encoder,
            tokenizer,
            DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw),
            device=device,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ TIBackend
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> EncodedImages:
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return EncodedImages(mean=dist.mean * self.scaling_factor, std=dist.std * self.scaling_factor)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond).sample

    @torch.no_grad()
    def decode_preview(self, latents: torch.Tensor) -> Optional[torch.Tensor]:
        images = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae] + super().frozen_modules()


class DiffusersSDXLBackend(DiffusersBackend):
    """SDXL over diffusers modules: CLIP-L + CLIP-G towers (CLIP-G built with ``pooled=True``), the UNet's
    ``text_time`` added conditioning from the pooled output and (original size, crop 0 0, target size)."""

    def __init__(self, unet, vae, clip_l: TextTower, clip_g: TextTower, scheduler, *,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
        if not clip_g.encoder.config.projection_dim:
            raise ValueError("the CLIP-G tower needs its text projection (build it with pooled=True)")
        self.family = "sdxl"
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _place(unet, self.device, dtype)
        self.vae = _place(vae, self.device, dtype)
        for tower in (clip_l, clip_g):
            tower.encoder = _place(tower.encoder, self.device, dtype)
        self.text_encoders = [clip_g, clip_l]  # sorted keys, as the ComfyUI backend lists them
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.prediction_type
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.13025))
        width = clip_l.dim + clip_g.dim
        if getattr(unet.config, "cross_attention_dim", width) != width:
            raise ValueError(f"The UNet expects {unet.config.cross_attention_dim}-wide context, the towers give {width}.")

    def encode_prompts(self, prompts, placeholders, vectors) -> Any:
        towers = {t.key: t for t in self.text_encoders}
        l_out = towers["clip_l"].encode(prompts, placeholders, vectors["clip_l"])
        g_out = towers["clip_g"].encode(prompts, placeholders, vectors["clip_g"])
        return {"context": torch.cat([l_out.last_hidden_state, g_out.last_hidden_state], dim=-1), "pooled": g_out.pooled}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        h, w = (s * 8 for s in noisy_latents.shape[-2:])
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond["pooled"].dtype, device=noisy_latents.device)
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.expand(noisy_latents.shape[0], -1)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond["context"], added_cond_kwargs=added).sample
