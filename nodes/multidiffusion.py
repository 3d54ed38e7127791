"""MultiDiffusion region sampling nodes: regions (prompt + mask) fused every step through a model wrapper.

The fusion runs inside ComfyUI's APPLY_MODEL wrapper (``ModelPatcher.add_wrapper_with_key``), so it works
with every sampler and scheduler, composes with other packs' wrappers and patches, and patches nothing.

SDXL family: each region prompt carries its own ``y``, made by the model's own ``encode_adm`` from the
region's pooled output and the size/crop values of its conditioning (ComfyUI's defaults when absent: the
canvas size, crop 0, 0), computed once per canvas size at the first step. Views default to the model's
native size (window_size 0: 512 px SD1.x/SD2.x, 1024 px = 128 latents SDXL).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.patcher_extension

from ..pipelines.multidiffusion import (
    DEFAULT_BOOTSTRAP,
    MultiDiffusion,
    MultiDiffusionConfig,
    MultiDiffusionError,
    Region,
    RegionPrompt,
    centre_latents,
    constant_colour_images,
)

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/MultiDiffusion"
WRAPPER_KEY = "facebooth_multidiffusion"
LATENT_FACTOR = 8  # SD1.x / SD2.x / SDXL VAEs
NATIVE_SIZE = {768: 512, 1024: 512, 2048: 1024}  # px by text width: SD1.x, SD2.x(-base), SDXL family
BOX_RESOLUTION = 1024  # boxes are drawn at this size and resized with the mask rule
BOOTSTRAP_POOL = 20  # official: 20 constant-colour backgrounds
BOOTSTRAP_ENCODE_SIZE = 64  # px; the latent of a constant image is constant away from the border

RegionsType = io.Custom("FACEBOOTH_MD_REGIONS")


@dataclass
class RegionSpec:
    """A region as the socket carries it: ComfyUI conditioning and a mask (sigmas come at sampling)."""

    conditioning: list
    mask: torch.Tensor
    name: str


def box_mask(x0: float, y0: float, x1: float, y1: float, size: int = BOX_RESOLUTION) -> torch.Tensor:
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"The region box ({x0}, {y0}) - ({x1}, {y1}) must lie inside the canvas (0..1) with left < right and top < bottom.")
    mask = torch.zeros(size, size)
    mask[round(y0 * size) : round(y1 * size), round(x0 * size) : round(x1 * size)] = 1.0
    return mask


class MultiDiffusionRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothMultiDiffusionRegion",
            display_name="MultiDiffusion Region",
            category=CATEGORY,
            description="One foreground region for MultiDiffusion: its prompt and where it goes (a mask, or a box given as "
            "fractions of the canvas). Chain several regions; the sampler's positive prompt is the background.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The region's prompt, e.g. PortraitBooth Conditioning for one person. "
                                      "Start/end percent ranges (delayed conditioning) are honoured."),
                io.Float.Input("left", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Box left edge, as a fraction of the canvas width (used without a mask)."),
                io.Float.Input("top", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Box top edge, as a fraction of the canvas height (used without a mask)."),
                io.Float.Input("right", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Box right edge, as a fraction of the canvas width (used without a mask)."),
                io.Float.Input("bottom", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Box bottom edge, as a fraction of the canvas height (used without a mask)."),
                io.Mask.Input("mask", optional=True, tooltip="Where the region is (white). Resized to the latent and binarised at 0.5. Overrides the box."),
                RegionsType.Input("regions", optional=True, tooltip="Regions made so far; this one is appended."),
            ],
            outputs=[RegionsType.Output(display_name="regions", tooltip="Connect to another region or to MultiDiffusion Sampling.")],
        )

    @classmethod
    def execute(cls, conditioning: list, left: float, top: float, right: float, bottom: float,
                mask: Optional[torch.Tensor] = None, regions: Optional[list] = None) -> io.NodeOutput:
        if not conditioning:
            raise ValueError("The region's conditioning is empty; connect a prompt.")
        previous = list(regions or [])
        if mask is not None:
            region_mask = (mask[0] if mask.dim() == 3 else mask).float().cpu()
            if float(region_mask.max()) <= 0.5:
                raise ValueError("The region mask is empty (nothing above 0.5): paint the region white.")
        else:
            region_mask = box_mask(left, top, right, bottom)
        return io.NodeOutput(previous + [RegionSpec(conditioning, region_mask, f"region {len(previous) + 1}")])


def _region_prompts(conditioning: list, model_sampling: Any, options: Optional[list] = None) -> list[RegionPrompt]:
    """RegionPrompts of one region's conditioning; ``options`` collects (prompt, its conditioning dict) pairs."""
    prompts = []
    for cond, opts in conditioning:
        start, end = opts.get("start_percent", 0.0), opts.get("end_percent", 1.0)
        prompts.append(RegionPrompt(
            context=cond,
            sigma_start=None if start <= 0.0 else float(model_sampling.percent_to_sigma(start)),
            sigma_end=None if end >= 1.0 else float(model_sampling.percent_to_sigma(end)),
        ))
        if options is not None:
            options.append((prompts[-1], opts))
    return prompts


def region_adm(base_model: Any, options: list, height: int, width: int, device) -> None:
    """Set each SDXL region prompt's own ``y`` (pooled output + size/crop embedding) for a canvas of
    ``height`` x ``width`` pixels, as ComfyUI builds ``y`` for a prompt (same defaults)."""
    encode = getattr(base_model, "encode_adm", None)
    if encode is None or not getattr(base_model, "adm_channels", 0):
        return
    for prompt, opts in options:
        if opts.get("pooled_output") is None:
            continue
        params = {k: v for k, v in opts.items() if k != "pooled_output"}
        params.update(width=opts.get("width", width), height=opts.get("height", height))
        y = encode(pooled_output=opts["pooled_output"].to(device), device=device, prompt_type="positive",
                   **{k: v for k, v in params.items() if k not in ("device", "prompt_type")})
        if y is not None:
            prompt.extras["y"] = y.to(device)


def make_wrapper(md: MultiDiffusion, model_sampling: Any, base_model: Any, bootstrap_sigma: Optional[float],
                 options: Optional[list] = None):
    """The APPLY_MODEL wrapper: one host batch in, the region-fused prediction out."""
    adm_for: list = [None]  # the canvas size (and device) the regions' own y were made for

    def fits(n: int, shape: tuple) -> bool:
        try:
            need = base_model.memory_required(list(shape))
        except Exception:  # memory estimates are advisory
            return True
        return need * 1.5 < mm.get_free_memory(mm.get_torch_device())

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        flags = transformer_options.get("cond_or_uncond")
        if c_crossattn is None or not flags:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if control is not None:
            raise MultiDiffusionError(
                "MultiDiffusion regions cannot be combined with ControlNet / T2I-Adapter conditioning yet: remove the "
                "control from the prompts or sample without MultiDiffusion."
            )

        def apply(xb, tb, ctx, extras, fl, uu):
            opts = dict(transformer_options)
            opts["cond_or_uncond"] = list(fl)
            opts["uuids"] = list(uu)
            extras = dict(extras)
            concat = extras.pop("c_concat", None)
            return executor(xb, tb, concat, ctx, None, opts, **extras)

        extras = dict(kwargs)
        if c_concat is not None:
            extras["c_concat"] = c_concat
        key = (tuple(x.shape[-2:]), x.device)
        if options and "y" in extras and adm_for[0] != key:
            region_adm(base_model, options, x.shape[-2] * LATENT_FACTOR, x.shape[-1] * LATENT_FACTOR, x.device)
            adm_for[0] = key
            log.info("FaceBooth MultiDiffusion: %d region prompt(s) use their own pooled output and size conditioning (%dx%d px).",
                     sum("y" in p.extras for p, _ in options), x.shape[-1] * LATENT_FACTOR, x.shape[-2] * LATENT_FACTOR)
        mm.throw_exception_if_processing_interrupted()
        return md(
            apply, x, t, c_crossattn, flags,
            uuids=transformer_options.get("uuids"),
            extras=extras,
            sample_sigmas=transformer_options.get("sample_sigmas"),
            noise_scaling=model_sampling.noise_scaling,
            bootstrap_sigma=bootstrap_sigma,
            fits=fits,
        )

    return wrapper


class MultiDiffusionSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothMultiDiffusion",
            display_name="MultiDiffusion Sampling",
            category=CATEGORY,
            description="Patches the model so every denoising step predicts each region with its own prompt and fuses the "
            "predictions by mask-weighted averaging (MultiDiffusion), with constant-colour bootstrapping for the first steps "
            "and windows for canvases larger than the model's native size. Region predictions are batched into as few UNet "
            "calls as memory allows. Use the patched model in any sampler; its positive prompt is the background.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (e.g. from Load FastComposer Checkpoint)."),
                RegionsType.Input("regions", tooltip="From MultiDiffusion Region nodes."),
                io.Float.Input("bootstrap_fraction", default=DEFAULT_BOOTSTRAP, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the steps in which each region is denoised over a random constant-colour background "
                               "(the paper: 0.4). Sharpens region borders. 0 = off (no VAE needed)."),
                io.Int.Input("window_size", default=512, min=0, max=8192, step=8,
                             tooltip="View size in pixels: the model's native size (512 for SD1.5, 1024 for SDXL). 0 = that native size, "
                             "read from the model. Larger canvases are covered by overlapping views."),
                io.Int.Input("window_stride", default=64, min=8, max=8192, step=8,
                             tooltip="Distance between views in pixels (the paper: 64). Smaller = more views, smoother, slower."),
                io.Int.Input("max_batch", default=0, min=0, max=1024,
                             tooltip="Most samples per UNet call. 0 = as many as fit in free memory (fewest calls)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed for the bootstrapping colours and their fixed noise."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the constant-colour backgrounds for bootstrapping; needed when bootstrap_fraction > 0."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with region fusion; connect to a KSampler.")],
        )

    @classmethod
    def execute(cls, model, regions: list, bootstrap_fraction: float, window_size: int, window_stride: int,
                max_batch: int, seed: int, vae=None) -> io.NodeOutput:
        if not regions:
            raise ValueError("No regions: connect at least one MultiDiffusion Region.")
        patched = model.clone()
        model_sampling = patched.get_model_object("model_sampling")
        options: list = []
        specs = [Region(prompts=_region_prompts(r.conditioning, model_sampling, options), mask=r.mask, name=r.name) for r in regions]
        context_dim = patched.model.model_config.unet_config.get("context_dim")
        if window_size == 0:
            window_size = NATIVE_SIZE.get(context_dim, 512)
        elif context_dim == 2048 and window_size < 1024:
            log.info("FaceBooth MultiDiffusion: SDXL models are native at 1024 px; window_size %d gives smaller views.", window_size)
        latents = None
        if bootstrap_fraction > 0:
            if vae is None:
                raise ValueError("Bootstrapping needs the VAE to encode its constant-colour backgrounds: connect 'vae', or set bootstrap_fraction to 0.")
            images = constant_colour_images(BOOTSTRAP_POOL, BOOTSTRAP_ENCODE_SIZE, seed)
            encoded = vae.encode(images)
            latents = centre_latents(patched.get_model_object("latent_format").process_in(encoded.float())).cpu()
        config = MultiDiffusionConfig(
            window=max(1, window_size // LATENT_FACTOR), stride=max(1, window_stride // LATENT_FACTOR),
            bootstrap_fraction=bootstrap_fraction, max_batch=max_batch, seed=seed,
        )
        md = MultiDiffusion(specs, config, bootstrap_latents=latents)
        sigma_limit = float(model_sampling.percent_to_sigma(bootstrap_fraction)) if bootstrap_fraction > 0 else None
        wrapper = make_wrapper(md, model_sampling, patched.model, sigma_limit, options)
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
        log.info("FaceBooth MultiDiffusion: %d region(s), window %d px / stride %d px, bootstrapping %.0f%% of the steps.",
                 len(specs), window_size, window_stride, 100 * bootstrap_fraction)
        return io.NodeOutput(patched)


NODES = [MultiDiffusionRegion, MultiDiffusionSampling]
