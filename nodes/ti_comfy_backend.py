"""The textual-inversion backend over ComfyUI's loaded MODEL / CLIP / VAE (host glue for the nodes).

What it maps (``pipelines/textual_inversion/backend.py`` says what a backend must give):

* **Schedule.** ``alphas_cumprod = 1 / (1 + σ²)`` from the model's ``model_sampling`` (object patches such as
  core's ModelSamplingDiscrete node included), so the engine's DDPM noising ``√ᾱ x0 + √(1−ᾱ) ε`` and
  ComfyUI's ``x = x0 + σ ε`` describe the same noisy latent: ``x_comfy = x_ddpm · √(1 + σ²)``.
* **Prediction type** from the ``model_sampling`` class: EPS → "epsilon", V_PREDICTION → "v_prediction";
  anything else (EDM, flow, x0) is refused.
* **predict** runs ``BaseModel.apply_model(x_comfy, σ, c_crossattn=cond)``, which applies the model's input
  scaling and returns its x0 estimate, and turns that back into what the UNet predicted:
  ε = (x_t − √ᾱ x0) / √(1−ᾱ) and v = (√ᾱ x_t − x0) / √(1−ᾱ), with x_t the DDPM-scaled input.
* **Gradients.** ComfyUI executes nodes under ``torch.inference_mode()``, so the UNet's weights are inference
  tensors, which autograd may not save. A clone of the MODEL gets an identity-plus-detach *weight wrapper* on every
  weight (ComfyUI's own ``ModelPatcher.add_weight_wrapper``, as core's LoRA trainer uses): each layer then
  computes with a fresh, detached copy of its weight, so gradients reach the cross-attention context (and the
  embeddings behind it) and never the weights. The original MODEL is untouched; ComfyUI drops the wrappers
  when it loads the original again.
* **Text towers** are rebuilt as ``pipelines.text_encoder.CLIPTextEncoder`` from ``clip.get_sd()`` (ComfyUI's
  CLIP adds residuals in place, so no gradient passes through it), with the layer ComfyUI would use for this
  CLIP (SD1: last; SD2: penultimate + final LayerNorm; a CLIPSetLastLayer choice is honoured) and ComfyUI's
  own tokenizer ids, including its pad token (SD1 pads with end-of-text, SD2 with "!" = 0).
* **SDXL** (clip_l + clip_g): both towers at the penultimate layer without final LayerNorm, concatenated
  CLIP-L then CLIP-G into the 2048-wide context; CLIP-G also gives the pooled output (last layer, final
  LayerNorm, end-of-text token, ``text_projection``). ``predict`` builds ``y`` with the model's own
  ``encode_adm`` from that pooled output and the size/crop values of a training crop (original size =
  target size = the training resolution, crop 0, 0), so gradients reach the embeddings through both the
  context and ``y``.
* **Images** go through ComfyUI's ``VAE.encode`` (the posterior mode; the engine then has no posterior std to
  sample from, a difference far below the diffusion noise) and the model's ``latent_format``.
* **Previews** use the latent format's ``latent_rgb_factors`` (no VAE decode per preview).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Optional

import torch
import torch.nn.functional as F

import comfy.clip_model
import comfy.model_management as mm
import comfy.model_sampling

from ..pipelines.text_encoder import CLIPTextEncoder, LayerChoice, PromptTokenizer
from ..pipelines.textual_inversion.backend import EncodedImages, TextTower, TIBackend
from .common import FAMILY_NAMES

log = logging.getLogger(__name__)

_TOWER_KEYS = ("clip_l", "clip_h", "clip_g")
_FAMILY_BY_TOWERS = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g", "clip_l"): "sdxl"}
_CONTEXT_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


class UnsupportedModelError(ValueError):
    """The MODEL / CLIP / VAE cannot be used for textual inversion here; the message says what to use."""


# ---------------------------------------------------------------------------------------------- text
def clip_tower_keys(clip) -> tuple[str, ...]:
    """The CLIP towers ("clip_l", "clip_h", "clip_g") a ComfyUI CLIP object holds, sorted."""
    model = clip.cond_stage_model
    return tuple(sorted(k for k in _TOWER_KEYS if hasattr(model, k) and hasattr(clip.tokenizer, k)))


def comfy_layer_choice(tower_model, layer_idx: Optional[int]) -> LayerChoice:
    """The output layer ComfyUI's ``SDClipModel`` uses with ``clip.layer_idx`` (CLIPSetLastLayer) applied.

    Mirrors ``reset_clip_options`` + ``set_clip_options``: an index beyond the depth means "last".
    """
    layer, idx = tower_model.options_default[0], tower_model.options_default[1]
    if layer_idx is not None:
        if abs(layer_idx) > tower_model.num_layers:
            layer, idx = "last", None
        else:
            layer, idx = "hidden", layer_idx
    if layer == "last":
        return "last"
    if layer == "hidden" and idx is not None:
        return int(idx)
    raise UnsupportedModelError(f"this CLIP uses output layer {layer!r}, which textual inversion does not support")


def comfy_prompt_tokenizer(sd_tokenizer) -> PromptTokenizer:
    """ComfyUI's ``SDTokenizer`` as a ``PromptTokenizer``: its BPE, start/end/pad ids and length."""
    hf = sd_tokenizer.tokenizer
    if sd_tokenizer.start_token is None or sd_tokenizer.end_token is None:
        raise UnsupportedModelError("this CLIP tokenizer has no start/end token; only CLIP-style text encoders work")
    return PromptTokenizer(
        encode=lambda text: hf(text, add_special_tokens=False)["input_ids"],
        bos_id=int(sd_tokenizer.start_token),
        eos_id=int(sd_tokenizer.end_token),
        pad_id=int(sd_tokenizer.pad_token),
        max_length=int(sd_tokenizer.max_length),
    )


def _activation_name(tower_model) -> Optional[str]:
    try:
        fn = tower_model.transformer.text_model.encoder.layers[0].mlp.activation
    except (AttributeError, IndexError):
        return None
    return next((name for name, f in comfy.clip_model.ACTIVATIONS.items() if f is fn), None)


def _num_heads(tower_model) -> Optional[int]:
    try:
        return int(tower_model.transformer.text_model.encoder.layers[0].self_attn.heads)
    except (AttributeError, IndexError):
        return None


def text_tower_from_clip(
    clip, key: str, state_dict: Optional[dict] = None, *, device=None, dtype: Optional[torch.dtype] = None,
    pooled: bool = False,
) -> TextTower:
    """An autograd-safe copy of one tower of a ComfyUI CLIP, encoding exactly as ComfyUI's CLIP does."""
    tower_model = getattr(clip.cond_stage_model, key)
    sd = state_dict if state_dict is not None else clip.get_sd()
    layer = comfy_layer_choice(tower_model, clip.layer_idx)
    # ComfyUI applies the final LayerNorm to a hidden layer only when the tower says so (SDXL's clip_g does not).
    final_ln = layer == "last" or bool(getattr(tower_model, "layer_norm_hidden_state", True))
    with torch.inference_mode(False):  # nodes run in inference mode; our copy must be usable by autograd
        encoder = CLIPTextEncoder.from_state_dict(
            sd, prefix=f"{key}.", layer=layer, final_layer_norm=final_ln, hidden_act=_activation_name(tower_model),
            num_heads=_num_heads(tower_model), dtype=dtype, device=device, pooled=pooled,
        )
    return TextTower(key=key, encoder=encoder, tokenizer=comfy_prompt_tokenizer(getattr(clip.tokenizer, key)))


# ---------------------------------------------------------------------------------------------- UNet
def _detached(weight: torch.Tensor) -> torch.Tensor:
    # Called by ComfyUI's cast_bias_weight on its fresh copy of the weight: cut it from autograd.
    return weight.detach()


def trainable_clone(model):
    """A clone of a ComfyUI MODEL whose layers compute with detached copies of their weights (see module doc)."""
    clone = model.clone()
    count = 0
    for name, module in clone.model.named_modules():
        if not hasattr(module, "weight_function"):  # ComfyUI's cast-capable ops (comfy.ops)
            continue
        for part in ("weight", "bias"):
            if getattr(module, part, None) is not None:
                clone.add_weight_wrapper(f"{name}.{part}", _detached)
                count += 1
    if count == 0:
        raise UnsupportedModelError("this MODEL has no ComfyUI weight layers to run; it cannot be trained through")
    return clone


def prediction_type_of(model_sampling) -> str:
    """ "epsilon" / "v_prediction" for ComfyUI's discrete EPS / V_PREDICTION samplings; refuses the rest."""
    ms = comfy.model_sampling
    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or not hasattr(model_sampling, "sigmas"):
        raise UnsupportedModelError(
            f"the model's sampling ({type(model_sampling).__mro__[1].__name__}) is not a discrete DDPM schedule; "
            "textual inversion here needs an SD1.x, SD2.x or SDXL model (epsilon or v-prediction)."
        )
    if isinstance(model_sampling, (ms.EDM, ms.X0)):
        raise UnsupportedModelError("EDM / x0-prediction models are not supported; use an SD1.x, SD2.x or SDXL model")
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "epsilon"
    raise UnsupportedModelError("only epsilon and v-prediction models are supported (SD1.x, SD2.x, SDXL)")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------- backend
class ComfyTIBackend(TIBackend):
    """TIBackend over a ComfyUI MODEL (ModelPatcher), CLIP and VAE; SD1.x, SD2.x and SDXL."""

    def __init__(self, model, clip, vae, *, text_dtype: torch.dtype = torch.float32):
        keys = clip_tower_keys(clip)
        family = _FAMILY_BY_TOWERS.get(keys)
        if family is None:
            raise UnsupportedModelError(
                f"This CLIP holds the text encoders {list(keys) or 'none of clip_l/clip_h/clip_g'}: textual inversion "
                "needs an SD1.x (clip_l), SD2.x (clip_h) or SDXL (clip_l + clip_g) checkpoint's CLIP."
            )
        self.family = family
        context = model.model.model_config.unet_config.get("context_dim")
        if context is not None and context != _CONTEXT_WIDTH[family]:  # cheap check before anything is built
            model_family = next((FAMILY_NAMES[f] for f, w in _CONTEXT_WIDTH.items() if w == context), f"{context}-wide")
            raise UnsupportedModelError(
                f"The MODEL is {model_family} but the CLIP is {FAMILY_NAMES[family]}: they come from different "
                "checkpoints. Use the MODEL and CLIP of the same checkpoint."
            )
        self.patcher = trainable_clone(model)
        self.model = self.patcher.model  # comfy.model_base.BaseModel
        self.vae = vae
        self.device = torch.device(self.patcher.load_device)
        self.model_sampling = self.patcher.get_model_object("model_sampling")
        self.prediction_type = prediction_type_of(self.model_sampling)
        with torch.inference_mode(False):  # plain tensors: the engine uses them outside inference mode
            sigmas = self.model_sampling.sigmas.detach().to("cpu", torch.float64, copy=True)
            self.sigmas = sigmas.float()
            self.alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()

        # The CLIP's weights with any LoRA patches applied (as core's checkpoint saver reads them).
        mm.load_models_gpu([clip.patcher], force_patch_weights=True)
        sd = clip.get_sd()
        # float32 like ComfyUI's own CLIP computes (it stores fp16 but runs in fp32); autocast speeds it up on GPU.
        self.text_encoders = [
            text_tower_from_clip(clip, k, sd, device=self.device, dtype=text_dtype, pooled=(family == "sdxl" and k == "clip_g"))
            for k in keys
        ]
        del sd
        self._check_widths()
        self._needs_load = True

    def _check_widths(self) -> None:
        width = sum(t.dim for t in self.text_encoders)
        context = self.model.model_config.unet_config.get("context_dim")
        if context is not None and context != width:
            raise UnsupportedModelError(
                f"The MODEL expects {context}-wide text conditioning but the {FAMILY_NAMES[self.family]} CLIP gives "
                f"{width}: they come from different model families. Use the MODEL and CLIP of the same checkpoint."
            )
        adm = self.model.model_config.unet_config.get("adm_in_channels")
        if (self.family == "sdxl") != bool(adm) or (self.family == "sdxl" and not hasattr(self.model, "encode_adm")):
            raise UnsupportedModelError(
                f"The MODEL {'takes' if adm else 'takes no'} pooled/size conditioning but the CLIP is "
                f"{FAMILY_NAMES[self.family]}'s: use the MODEL and CLIP of the same checkpoint."
            )
        channels = getattr(self.model.latent_format, "latent_channels", 4)
        if getattr(self.vae, "latent_channels", channels) != channels:
            raise UnsupportedModelError(
                f"The VAE makes {self.vae.latent_channels}-channel latents but the MODEL works on {channels}: use the "
                "checkpoint's own VAE."
            )

    def _ensure_loaded(self, batch_shape: tuple[int, ...]) -> None:
        """(Re)load our UNet clone when it is not the one ComfyUI has in place (another clone of the same model,
        with other object patches, may have been loaded since) or VAE encoding may have pushed it out of VRAM."""
        if not self._needs_load and getattr(self.model, "current_patcher", self.patcher) is self.patcher:
            return
        # Training keeps activations for the backward pass: ask for about three inference batches of room.
        need = 3 * self.patcher.memory_required(list(batch_shape))
        mm.load_models_gpu([self.patcher], memory_required=need)
        self._needs_load = False

    # ------------------------------------------------------------------ TIBackend
    def encode_prompts(self, prompts, placeholders, vectors) -> Any:
        if self.family != "sdxl":
            return super().encode_prompts(prompts, placeholders, vectors)
        towers = {t.key: t for t in self.text_encoders}
        l_out = towers["clip_l"].encode(prompts, placeholders, vectors["clip_l"])
        g_out = towers["clip_g"].encode(prompts, placeholders, vectors["clip_g"])
        context = torch.cat([l_out.last_hidden_state, g_out.last_hidden_state], dim=-1)  # ComfyUI's order: L then G
        return {"c_crossattn": context, "pooled_output": g_out.pooled}

    def sdxl_y(self, pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The UNet's ``y`` from the model's own ``encode_adm``: pooled CLIP-G + (size, crop, target size) embeddings
        of an uncropped training image of ``height`` x ``width`` pixels."""
        y = self.model.encode_adm(
            pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0, target_width=width,
            target_height=height, device=pooled.device,
        )
        return y.to(pooled.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> EncodedImages:
        pixels = ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()  # ComfyUI IMAGE: (N, H, W, 3) in [0, 1]
        latents = self.vae.encode(pixels)
        latents = self.model.process_latent_in(latents.float()).to(self.device)
        self._needs_load = True
        return EncodedImages(mean=latents.clone(), std=None)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        self._ensure_loaded(tuple(noisy_latents.shape))
        t = timesteps.to(self.sigmas.device).long()
        sigma = self.sigmas[t].to(noisy_latents.device)
        scale = _per_sample((1 + sigma**2).sqrt(), noisy_latents)  # x_comfy = x_ddpm · √(1+σ²)
        sqrt_ab = 1 / scale
        sqrt_1mab = _per_sample(sigma, noisy_latents) / scale
        with torch.inference_mode(False):
            extra = {}
            if isinstance(cond, dict):  # SDXL: context + pooled output
                h, w = (s * 8 for s in noisy_latents.shape[-2:])
                extra["y"] = self.sdxl_y(cond["pooled_output"], h, w)
                cond = cond["c_crossattn"]
            x0 = self.model.apply_model(
                noisy_latents * scale, sigma, c_crossattn=cond,
                transformer_options=self._transformer_options(sigma), **extra,
            ).float()
        x_t = noisy_latents.float()
        if self.prediction_type == "epsilon":
            return (x_t - sqrt_ab * x0) / sqrt_1mab
        return (sqrt_ab * x_t - x0) / sqrt_1mab

    def _transformer_options(self, sigma: torch.Tensor) -> dict:
        # The MODEL's own patches and wrappers apply, as when it samples; the whole batch is one "cond" chunk.
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
        return options

    @torch.no_grad()
    def decode_preview(self, latents: torch.Tensor) -> Optional[torch.Tensor]:
        fmt = self.model.latent_format
        factors = getattr(fmt, "latent_rgb_factors", None)
        if factors is None:
            return None
        weight = torch.tensor(factors, dtype=torch.float32, device=latents.device).t()  # (3, C)
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        bias = None if bias is None else torch.tensor(bias, dtype=torch.float32, device=latents.device)
        rgb = F.linear(latents.float().movedim(1, -1), weight, bias)  # (N, h, w, 3) in about [-1, 1]
        rgb = F.interpolate(rgb.movedim(-1, 1), scale_factor=8, mode="bilinear", align_corners=False).movedim(1, -1)
        return ((rgb + 1) / 2).clamp(0, 1).cpu()

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.model.diffusion_model, self.vae.first_stage_model] + super().frozen_modules()
