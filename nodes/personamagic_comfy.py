"""ComfyUI glue for PersonaMagic (the math is in ``pipelines/personamagic``).

* ``ComfyPersonaMagicBackend``: the textual-inversion ComfyUI backend (``ti_comfy_backend.ComfyTIBackend``)
  taught to give cross-attention a separate V context during training (an ``attn2_patch`` in the
  per-call transformer options), to probe the placeholder's attention maps (``attn2_replace`` on every
  transformer block, only while measuring IoU) and to decode x̂0 with gradients (identity loss).
* ``conditioning_from_entries``: one CONDITIONING entry per stage / timestep bin, with start/end percents
  from the MODEL's own ``model_sampling`` and, on SDXL, the entry's pooled CLIP-G output (ComfyUI's SDXL model
  builds ``y`` from it and the size/crop values with its own ``encode_adm``, as for a CLIPTextEncode).
* ``text_towers``: autograd-safe copies of the CLIP's towers in context order (SDXL: CLIP-L, then CLIP-G with
  its pooled output).
* ``with_value_patch``: a clone of the MODEL with the V-path patch appended to its ``attn2_patch`` list, so
  patches already on it (other identity packs) keep running.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Sequence

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as mm

from ..pipelines.personamagic.apply import ScheduleEntry
from ..pipelines.personamagic.attention import KVCond
from ..pipelines.personamagic.stages import ScheduleRange, timestep_ranges_to_percents
from ..pipelines.personamagic.vpath import ValuePathPatch
from ..pipelines.textual_inversion.backend import FAMILY_KEYS, TextTower
from .common import clip_family, require_family
from .ti_comfy_backend import ComfyTIBackend, UnsupportedModelError, text_tower_from_clip

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- helpers
def autograd_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy with ordinary (non-inference) weights: ComfyUI loads models under inference mode, and
    autograd cannot save inference tensors for backward, even frozen ones that gradients only pass through."""
    with torch.inference_mode(False):
        return copy.deepcopy(module).requires_grad_(False).eval()


FAMILIES = ("sd1", "sd2", "sdxl")


def text_towers(clip, dtype: torch.dtype = torch.float32, device=None) -> list[TextTower]:
    """Autograd-safe copies of the CLIP's text towers in the order of the UNet's context (SD1.x: CLIP-L; SD2.x:
    OpenCLIP-H; SDXL: CLIP-L, then CLIP-G with its pooled output)."""
    require_family("PersonaMagic", FAMILIES, clip=clip)
    family = clip_family(clip)
    if family is None:
        raise ValueError("PersonaMagic needs the CLIP of an SD1.x, SD2.x or SDXL checkpoint; this CLIP holds none of their text encoders.")
    mm.load_models_gpu([clip.load_model()], force_patch_weights=True)  # LoRA patches on the CLIP are in its weights
    sd = clip.get_sd()
    with torch.inference_mode(False):
        return [text_tower_from_clip(clip, k, sd, dtype=dtype, device=device, pooled=(k == "clip_g"))
                for k in FAMILY_KEYS[family]]


def image_embeddings(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """(N, proj_dim) CLIP image embeddings (ComfyUI's ``encode_image``: 224 px, centre crop, CLIP mean/std)."""
    out = clip_vision.encode_image(images[..., :3])
    emb = getattr(out, "image_embeds", None)
    if emb is None or emb.dim() != 2:
        raise UnsupportedModelError("this CLIP_VISION model gives no projected image embedding; use a CLIP ViT-L/14 or ViT-H/14")
    with torch.inference_mode(False):
        return emb.detach().float().cpu().clone()


def model_sampling_of(model):
    return model.get_model_object("model_sampling")


def visited_timesteps(model, sigmas: torch.Tensor) -> list[int]:
    """The model's integer timesteps for a sampler's sigma schedule (the final 0 is never evaluated)."""
    ms = model_sampling_of(model)
    s = sigmas.detach().float().flatten().cpu()
    s = s[s > 0]
    return [int(t) for t in ms.timestep(s).float().round().long().tolist()]


def percent_ranges(model, entries: Sequence[ScheduleEntry]) -> list[ScheduleRange]:
    ms = model_sampling_of(model)
    n = int(getattr(ms, "num_timesteps", len(getattr(ms, "sigmas", [])) or 1000))

    def sigma_of(t: float) -> float:
        return float(ms.sigma(torch.tensor(float(t))))

    return timestep_ranges_to_percents([(e.t_min, e.t_max) for e in entries], sigma_of, ms.percent_to_sigma, n)


def conditioning_entry(key: torch.Tensor, pooled: Optional[torch.Tensor] = None, **options) -> list:
    """One CONDITIONING entry: the context, and on SDXL its pooled output (ComfyUI's key for it)."""
    if pooled is not None:
        options["pooled_output"] = pooled.clone()
    return [key.clone(), options]


def conditioning_from_entries(model, entries: Sequence[ScheduleEntry]) -> list:
    """CONDITIONING: one [key context, {start_percent, end_percent(, pooled_output)}] per entry, noisy to clean."""
    return [conditioning_entry(e.key, e.pooled, start_percent=r.start_percent, end_percent=r.end_percent)
            for e, r in zip(entries, percent_ranges(model, entries))]


def with_value_patch(model, patch: ValuePathPatch):
    clone = model.clone()  # model_options are copied: earlier attn2 patches stay in the list, ours runs after them
    clone.set_model_attn2_patch(patch)
    return clone


def transformer_blocks(diffusion_model) -> list[tuple[str, int]]:
    """ComfyUI's ``transformer_options['block']`` names of the UNet blocks that hold cross-attention."""
    def has_transformer(block) -> bool:  # None: KOALA-style SDXL UNets have no middle block
        return block is not None and any(isinstance(m, comfy_attention.SpatialTransformer) for m in block.modules())

    names = [("input", i) for i, b in enumerate(diffusion_model.input_blocks) if has_transformer(b)]
    if has_transformer(getattr(diffusion_model, "middle_block", None)):
        names.append(("middle", 0))
    names += [("output", i) for i, b in enumerate(diffusion_model.output_blocks) if has_transformer(b)]
    return names


# ---------------------------------------------------------------------------------------------- training backend
class _TrainValue:
    """attn2_patch for one training call: the whole batch is ours, so V is the given context."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __call__(self, n, context, value, extra_options):
        if context is None or tuple(context.shape) != tuple(self.value.shape):
            raise RuntimeError(
                f"PersonaMagic training: the cross-attention context {None if context is None else tuple(context.shape)} "
                f"is not the one passed in {tuple(self.value.shape)}; another patch on the MODEL changes it"
            )
        return n, context, self.value.to(context.dtype)


class ComfyPersonaMagicBackend(ComfyTIBackend):
    supports_kv = True

    def __init__(self, model, clip, vae, **kwargs):
        require_family("PersonaMagic", FAMILIES, model=model, clip=clip)  # before any tower is built
        super().__init__(model, clip, vae, **kwargs)
        self._kv: Optional[KVCond] = None
        self._decoder: Optional[torch.nn.Module] = None
        self._blocks = transformer_blocks(self.model.diffusion_model)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, KVCond):
            return super().predict(noisy_latents, timesteps, cond)
        self._kv = cond
        context = cond.key if cond.pooled is None else {"c_crossattn": cond.key, "pooled_output": cond.pooled}
        try:
            return super().predict(noisy_latents, timesteps, context)
        finally:
            self._kv = None

    def _transformer_options(self, sigma: torch.Tensor) -> dict:
        options = super()._transformer_options(sigma)
        if self._kv is None:
            return options
        patches = dict(options.get("patches", {}))
        patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [_TrainValue(self._kv.value)]
        options["patches"] = patches
        if self._kv.probe is not None:
            replace = {k: dict(v) for k, v in options.get("patches_replace", {}).items()}
            replace["attn2"] = {**replace.get("attn2", {}), **{b: self._kv.probe for b in self._blocks}}
            options["patches_replace"] = replace
        return options

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [−1, 1] with gradients to ``latents`` (a float32 autograd-safe copy of the VAE)."""
        if self._decoder is None:
            self._decoder = autograd_copy(self.vae.first_stage_model).to(self.device, torch.float32)
        z = self.model.process_latent_out(latents.float())
        return self._decoder.decode(z).float()

