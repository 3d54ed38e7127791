"""Train Face2Diffusion's mapping networks with class-guided denoising regularization (paper Sec. 3.3-3.4).

    python -m facebooth.training.train_f2d_mapping --pretrained-model sd-v1-4-diffusers/ \
        --msid msid.pt --data-dir ffhq512/ --crop-dir ffhq_arcface112/ --mask-dir ffhq_facemasks/ \
        --output-dir runs/f2d_mapping --batch-size 32 --lr 1e-5 --max-steps 100000

Per step: the MSID encoder (frozen) turns the 112x112 crop into v_id; the mapping networks (the only trained
weights) turn [v_id, v_exp or null_exp] (expression dropped with p = 0.2, eq. 4) into S* = [S1*, S2*], which
replaces the placeholder pair of "a photo of f l" before the frozen CLIP text encoder. With the same noisy
latent z_t, the frozen UNet predicts eps_hat for that prompt and eps_c for "a photo of a person", and

    L = || eps_hat - (eps * M + eps_c * (1 - M)) ||^2        (eq. 7)

with M the face-parsing mask at latent resolution (whole image when no mask is given). Output:
``<output-dir>/mapping.safetensors`` (official keys + metadata), loadable by ``load_mapping``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..pipelines.face2diffusion.expression import (
    TRAIN_EXPRESSION_DROPOUT,
    expression_dropout_mask,
)
from ..pipelines.face2diffusion.injection import (
    DEFAULT_PLACEHOLDER,
    IdentityTokens,
    encode_with_identities,
    find_identity_slots,
    placeholder_token_id,
)
from ..pipelines.face2diffusion.identity import check_pair
from ..pipelines.face2diffusion.loading import load_mapping, load_msid, save_mapping
from ..pipelines.face2diffusion.mapping import F2DMapping, F2DMappingConfig
from .distributed import RandomSlot, SampleRandom, per_sample_dropout
from .f2d_data import FaceMappingDataset
from .loop import TrainingRun, add_run_arguments
from .run_state import load_diffusers_sd

log = logging.getLogger(__name__)


def cgdr_target(eps: torch.Tensor, eps_class: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7's target: the true noise on the face, the class prompt's prediction elsewhere.

    ``mask`` (B, 1, h, w) at latent resolution, 1 = face region.
    """
    return eps * mask + eps_class * (1 - mask)


def cgdr_loss(eps_hat: torch.Tensor, eps: torch.Tensor, eps_class: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(eps_hat.float(), cgdr_target(eps.float(), eps_class.detach().float(), mask.float()))


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) -> latent grid by area averaging (soft at the face boundary)."""
    return F.interpolate(mask.float(), size=size, mode="area")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facebooth.training.train_f2d_mapping", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained-model", required=True, help="diffusers folder of an SD1.x model (unet, vae, text_encoder, tokenizer, scheduler)")
    p.add_argument("--msid", required=True, help="MSID encoder weights: official msid.pt or ours")
    p.add_argument("--init-mapping", default=None, help="fine-tune from this mapping file instead of a fresh init")
    p.add_argument("--data-dir", required=True, help="face images (FFHQ-aligned), resized to --resolution")
    p.add_argument("--crop-dir", required=True, help="ArcFace-aligned 112x112 crops with the same file names")
    p.add_argument("--mask-dir", default=None, help="face-parsing masks with the same file names (white = face); whole image if absent")
    p.add_argument("--expression-dir", default=None, help="<name>.npy with 64 expression coefficients; null vector if absent")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--prompt", default="a photo of f l", help="training prompt with the placeholder pair")
    p.add_argument("--class-prompt", default="a photo of a person", help="super-class prompt for CGDR")
    p.add_argument("--placeholder", default=DEFAULT_PLACEHOLDER)
    p.add_argument("--exp-dropout", type=float, default=TRAIN_EXPRESSION_DROPOUT)
    p.add_argument("--mapping-hidden", type=int, default=None, help="hidden width of a fresh mapping (default: the identity width)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--gradient-checkpointing", action="store_true", help="UNet gradient checkpointing (less memory)")
    add_run_arguments(p, batch_size=32, max_steps=100_000, save_every=1000, max_grad_norm=1.0)
    return p


def _prompt_ids(tokenizer, prompt: str, length: int = 77) -> torch.Tensor:
    """Padded to the text encoder's window (77 for CLIP), as the official pipeline does."""
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args, "F2D mapping training", args.gradient_accumulation_steps)
    device = run.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_diffusers_sd(args.pretrained_model, weight_dtype, device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    msid = load_msid(args.msid, device=device, dtype=weight_dtype).eval().requires_grad_(False)
    text_width = text_encoder.config.hidden_size
    if args.init_mapping:
        mapping = load_mapping(args.init_mapping)
        check_pair(msid, mapping, os.path.basename(args.msid), f"--init-mapping {os.path.basename(args.init_mapping)}")
        if mapping.config.out_dim != text_width:
            raise ValueError(
                f"--init-mapping makes {mapping.config.out_dim}-d word vectors, but the text encoder is {text_width} wide."
            )
    else:
        mapping = F2DMapping(F2DMappingConfig(
            id_dim=msid.feature_dim, hidden_dim=args.mapping_hidden or msid.feature_dim, out_dim=text_width, dropout=args.dropout,
        ))
    mapping.train()
    slot = RandomSlot()  # the mapping's dropout masks are drawn per sample (same on any number of processes)
    per_sample_dropout(mapping, slot)

    pid = placeholder_token_id(tokenizer, args.placeholder)
    window = text_encoder.config.max_position_embeddings
    ids = _prompt_ids(tokenizer, args.prompt, window)
    find_identity_slots(ids[0].tolist(), [pid])  # fail now, with the message, if the prompt lacks the placeholder
    class_ids = _prompt_ids(tokenizer, args.class_prompt, window).to(device)
    with torch.no_grad():
        class_cond = text_encoder(input_ids=class_ids)[0]
    ids = ids.to(device)

    data = FaceMappingDataset(args.data_dir, args.crop_dir, resolution=args.resolution, mask_dir=args.mask_dir,
                              expression_dir=args.expression_dir, crop_size=msid.config.img_size)
    run.step_batches(len(data))
    optimizer = torch.optim.AdamW(mapping.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run.restore({"mapping": mapping}, optimizer)
    scheduler = run.scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.max_steps, [args.lr])
    mapping, optimizer = run.accelerator.prepare(mapping, optimizer)
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"Unsupported prediction type {prediction!r}; Face2Diffusion targets SD1.x (epsilon).")
    scaling = getattr(vae.config, "scaling_factor", 0.18215)
    unwrap = run.accelerator.unwrap_model

    def compute(indices, flips, rng: SampleRandom) -> dict:
        slot.current = rng
        try:
            loss = _cgdr_step(data.batch(indices, flips), mapping, msid, vae, unet, text_encoder, noise_scheduler, ids,
                              class_cond, pid, args.exp_dropout, scaling, prediction, device, weight_dtype, run.accelerator,
                              rng)
        finally:
            slot.current = None
        return {"loss": loss}

    def write_outputs(at: int) -> None:
        save_mapping(unwrap(mapping), run.out / "mapping.safetensors",
                     {"trained_steps": at, "prompt": args.prompt, "class_prompt": args.class_prompt})

    def save(at: int) -> None:
        run.save(at, {"mapping": unwrap(mapping)}, optimizer, write_outputs)

    log.info("F2D mapping training: %d images, to step %d.", len(data), args.max_steps)
    return run.train(max_steps=args.max_steps, compute=compute, models=(mapping,), optimizer=optimizer,
                     scheduler=scheduler, clip_params=list(mapping.parameters()), save=save,
                     hint="lower --lr or use --mixed-precision no.")


def _cgdr_step(batch, mapping, msid, vae, unet, text_encoder, noise_scheduler, ids, class_cond, pid, exp_dropout,
               scaling, prediction, device, weight_dtype, accelerator, rng: SampleRandom | None = None) -> torch.Tensor:
    """Eq. 7 on one batch. ``rng``: per-sample draws (VAE sample, noise, timestep, expression dropout); None draws
    from the global torch RNG (evaluation)."""
    pixels = batch["pixel_values"].to(device=device, dtype=weight_dtype)
    bsz = pixels.shape[0]
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        latents = (dist.sample(rng.generators("vae")) if rng is not None else dist.sample()) * scaling
        id_vec = msid(batch["id_pixels"].to(device=device, dtype=weight_dtype)).float()
    t_max = noise_scheduler.config.num_train_timesteps
    if rng is not None:
        noise = rng.randn("noise", latents.shape[1:]).to(device=device, dtype=latents.dtype)
        timesteps = rng.randint("timestep", t_max).to(device)
        keep = rng.rand("expression") >= exp_dropout  # eq. 4, per sample
        exp_mask = (keep.to(device) & batch["has_expression"].to(device).bool()).float()
    else:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, t_max, (bsz,), device=device).long()
        exp_mask = expression_dropout_mask(batch["has_expression"].to(device), exp_dropout)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with accelerator.autocast():
        tokens = mapping(id_vec, batch["expression"].to(device), exp_mask)  # (B, 2, D)
        cond = encode_with_identities(text_encoder, ids.expand(bsz, -1), [IdentityTokens(pid, tokens.to(weight_dtype))])[0]
        eps_hat = unet(noisy, timesteps, cond).sample
        with torch.no_grad():
            eps_class = unet(noisy, timesteps, class_cond.expand(bsz, -1, -1)).sample
    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    mask = latent_mask(batch["mask"].to(device), latents.shape[-2:])
    loss = cgdr_loss(eps_hat, target, eps_class, mask)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Mapping loss became {loss.item()}; lower --lr or use --mixed-precision no.")
    return loss


if __name__ == "__main__":
    sys.exit(main())
