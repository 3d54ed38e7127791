"""Train PortraitBooth: the STEA fuse MLP and the UNet (paper Sec. 4-5.1).

    accelerate launch -m facebooth.training.train_portraitbooth --pretrained-model sd15-diffusers/ \
        --arcface backbone.pth --data-dir prepared/ --output-dir runs/portraitbooth \
        --batch-size 2 --lr 1e-5 --max-steps 150000 --mixed-precision bf16

Data: a folder prepared by ``python -m facebooth.training.portraitbooth_data`` (images, reference faces, masks,
landmarks, captions). Per sample and step:

* 10 % unconditional (empty caption), 10 % text only (caption, no identity), otherwise the identity word's text
  output is replaced by STEA(text output, ArcFace features of the reference face) (``--arcface-layers``);
* L_noise: epsilon (or v) MSE, for half of the samples only inside the face mask;
* L_loc (ECAC): truncated localization of the identity token (beta 0.8, lambda 1e-3) and of the emotion word, when
  the caption has one (gamma 0.1, mu 1e-2), on the probed cross-attention layers;
* L_id (DIP): for t <= R_t = 250, x^_0 -> VAE decode -> ArcFace-aligned crop (differentiable) -> 1 - cos with the
  reference face's ArcFace embedding.

Trained: the STEA MLP and the whole UNet (``--freeze-unet`` trains the MLP only). The text encoder, VAE and ArcFace
are frozen. Outputs in ``--output-dir``: ``stea.safetensors`` (Load PortraitBooth STEA) and ``unet.safetensors`` (the
UNet in ComfyUI's LDM layout, for Load Diffusion Model), plus resumable checkpoints and ``train_log.jsonl``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from einops import rearrange
import torch
import torch.nn.functional as F

from ..pipelines.face.align import crop_matrix
from ..pipelines.face.arcface import load_arcface
from ..pipelines.ldm_keys import unet_diffusers_to_ldm
from ..pipelines.portraitbooth.fastcomposer_loading import save_stea
from ..pipelines.portraitbooth.losses import (
    BETA,
    GAMMA,
    LAMBDA_LOC,
    MASK_LOSS_PROB,
    MU_LOC,
    R_T,
    TEXT_ONLY_PROB,
    UNCOND_PROB,
    TokenAttention,
    dip_identity_loss,
    localization_loss,
    noise_loss,
    predict_x0,
)
from ..pipelines.portraitbooth.stea import (
    ARCFACE_LAYERS,
    DEFAULT_ARCFACE_LAYERS,
    STEAConfig,
    STEAModel,
    arcface_feature_dims,
    arcface_features,
    fuse_rows_per_sample,
)
from ..pipelines.portraitbooth.token_positions import (
    SubjectWordError,
    find_subject_positions,
)
from ..utils.files import atomic_save_safetensors
from .distributed import SampleRandom
from .loop import TrainingRun, add_run_arguments
from .portraitbooth_data import PortraitBoothDataset
from .run_state import load_diffusers_sd

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Cross-attention probe (diffusers attention processor)
# ----------------------------------------------------------------------------------------------------


class AttentionProbe:
    """Collects cross-attention probabilities at chosen token columns while the UNet runs."""

    def __init__(self) -> None:
        self.columns: torch.Tensor | None = None  # (B, K) token indices per sample
        self.latent_hw: tuple[int, int] = (0, 0)
        self.maps: list[TokenAttention] = []

    def reset(self, columns: torch.Tensor | None, latent_hw: tuple[int, int]) -> None:
        self.columns, self.latent_hw, self.maps = columns, latent_hw, []

    def record(self, probs: torch.Tensor, batch: int) -> None:
        """``probs`` (B, heads, HW, L) of one layer."""
        if self.columns is None:
            return
        h0, w0 = self.latent_hw
        hw = probs.shape[2]
        factor = round((h0 * w0 / hw) ** 0.5)
        cols = self.columns.to(probs.device)
        idx = cols[:, None, None, :].expand(batch, probs.shape[1], hw, cols.shape[1])
        self.maps.append(TokenAttention(probs.gather(-1, idx), h0 // factor, w0 // factor))


class ProbeAttnProcessor:
    """Cross-attention written out with an explicit softmax so its probabilities can be recorded; computes the same
    output as diffusers' default processor (tests check this)."""

    def __init__(self, probe: AttentionProbe) -> None:
        self.probe = probe

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attn.prepare_attention_mask(attention_mask, context.shape[1], batch).view(batch, heads, -1, context.shape[1])
        probs = scores.softmax(dim=-1)
        if encoder_hidden_states is not None:
            self.probe.record(probs, batch)
        out = rearrange(probs.to(v.dtype) @ v, "b h n d -> b n (h d)")
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def probed_layer_names(unet, which: str = "middle") -> list[str]:
    """attn2 modules to probe. ``middle``: all but the highest-resolution level (FastComposer's five middle groups
    on SD1.5: down_blocks.1-2, mid_block, up_blocks.1-2); ``all``: every cross-attention layer."""
    names = [n for n, _ in unet.attn_processors.items() if ".attn2." in n]
    if which == "all":
        return names
    levels = len(unet.config.block_out_channels)
    outer = ("down_blocks.0.", f"up_blocks.{levels - 1}.")
    middle = [n for n in names if not n.startswith(outer)]
    return middle or names


def install_probe(unet, probe: AttentionProbe, which: str = "middle") -> list[str]:
    names = probed_layer_names(unet, which)
    procs = dict(unet.attn_processors)
    for n in names:
        procs[n] = ProbeAttnProcessor(probe)
    unet.set_attn_processor(procs)
    return names


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facebooth.training.train_portraitbooth", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained-model", required=True, help="diffusers folder of SD1.5 (unet, vae, text_encoder, tokenizer, scheduler)")
    p.add_argument("--arcface", required=True, help="arcface_torch IResNet backbone (.pth or our .safetensors): the face recognizer")
    p.add_argument("--data-dir", required=True, help="a folder prepared by facebooth.training.portraitbooth_data")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--arcface-layers", nargs="+", default=list(DEFAULT_ARCFACE_LAYERS), choices=list(ARCFACE_LAYERS),
                   help="recognizer layers that feed the STEA (shallow layer1-4 pooled and/or the deep embedding); default "
                   "shallow only, as the paper; 'layer3 embedding' adds the deep identity embedding (see pipelines/portraitbooth/stea.py)")
    p.add_argument("--init-stea", default=None, help="continue from this STEA file")
    p.add_argument("--freeze-unet", action="store_true", help="train the STEA MLP only")
    p.add_argument("--resolution", type=int, default=None, help="training size (default: the prepared size)")
    p.add_argument("--lr", type=float, default=1e-5, help="constant learning rate (paper: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--rt", type=int, default=R_T, help="DIP: identity loss for timesteps t <= R_t")
    p.add_argument("--id-weight", type=float, default=1.0, help="weight of the DIP identity loss")
    p.add_argument("--beta", type=float, default=BETA)
    p.add_argument("--gamma", type=float, default=GAMMA)
    p.add_argument("--lambda-loc", type=float, default=LAMBDA_LOC)
    p.add_argument("--mu-loc", type=float, default=MU_LOC)
    p.add_argument("--loc-layers", choices=["middle", "all"], default="middle")
    p.add_argument("--mask-prob", type=float, default=MASK_LOSS_PROB, help="share of samples with the noise loss on the face only")
    p.add_argument("--text-only-prob", type=float, default=TEXT_ONLY_PROB)
    p.add_argument("--uncond-prob", type=float, default=UNCOND_PROB)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the written unet.safetensors")
    add_run_arguments(p, batch_size=2, max_steps=150_000, save_every=1000, max_grad_norm=1.0, batch_help=" (paper: 2)")
    return p


class CaptionEncoder:
    """Tokenizes captions (77 tokens) and finds the identity / expression word slots with the same rule as the nodes."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.length = int(getattr(tokenizer, "model_max_length", 77) or 77)
        self.specials = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
        self._word_ids: dict[str, list[int]] = {}

    def ids(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tok(list(captions), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt").input_ids

    def word_ids(self, word: str) -> list[int]:
        if word not in self._word_ids:
            self._word_ids[word] = list(self.tok(word, add_special_tokens=False).input_ids)
        return self._word_ids[word]

    def slot(self, ids: torch.Tensor, word: str | None) -> int:
        """Row of ``word``'s last BPE piece in one caption's ids, or -1."""
        if not word:
            return -1
        try:
            (m,) = find_subject_positions([ids.tolist()], [word], [self.word_ids(word)], special_ids=self.specials,
                                          is_word_end=lambda i: self.tok.convert_ids_to_tokens(int(i)).endswith("</w>"))
        except SubjectWordError:
            return -1
        return m.position


def _sample_modes(r: torch.Tensor, uncond_prob: float, text_only_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniform draws ``r`` (B,) -> (unconditional, text-only) flags."""
    uncond = r < uncond_prob
    text_only = (r >= uncond_prob) & (r < uncond_prob + text_only_prob)
    return uncond, text_only


# ----------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------


def training_losses(batch: dict[str, Any], *, stea: STEAModel, unet, vae, text_encoder, captions: CaptionEncoder,
                    backbone, scheduler, probe: AttentionProbe, args, device: torch.device,
                    rng: SampleRandom | None = None, global_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    world: int = 1, fixed_noise: torch.Tensor | None = None, fixed_timesteps: torch.Tensor | None = None,
                    fixed_modes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All PortraitBooth losses for one batch.

    ``rng``: the per-sample draws (VAE sample, noise, timestep, sample modes); None draws from the global torch RNG.
    ``fixed_*`` pin the randomness (evaluation in tests). ``global_sum`` (sum over processes) and ``world``: the
    localisation and identity losses are means over the *global* batch's active samples, so each process returns
    ``world * (its sum) / (global count)``; averaged over processes (DDP, the log) that is the global mean.
    """
    pixels = batch["pixel_values"].to(device)
    b = pixels.shape[0]
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        if fixed_noise is not None:
            latents = dist.mode() * scaling
        else:
            latents = (dist.sample(rng.generators("vae")) if rng is not None else dist.sample()) * scaling
        ref = batch["ref"].to(device)
        feats = arcface_features(backbone, ref, stea.config.arcface_layers)
        ref_emb = F.normalize(arcface_features(backbone, ref, ("embedding",)), dim=-1)
    t_max = scheduler.config.num_train_timesteps
    if fixed_noise is not None:
        noise = fixed_noise.to(device)
    else:
        noise = (rng.randn("noise", latents.shape[1:]) if rng is not None else torch.randn(latents.shape)).to(device, latents.dtype)
    if fixed_timesteps is not None:
        t = fixed_timesteps.to(device)
    else:
        t = (rng.randint("timestep", t_max) if rng is not None else torch.randint(0, t_max, (b,))).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    if fixed_modes is not None:
        uncond, text_only, use_mask = fixed_modes
    else:
        uncond, text_only = _sample_modes(rng.rand("mode") if rng is not None else torch.rand(b),
                                          args.uncond_prob, args.text_only_prob)
        use_mask = (rng.rand("mask") if rng is not None else torch.rand(b)) < args.mask_prob

    texts = ["" if u else c for u, c in zip(uncond.tolist(), batch["caption"])]
    ids = captions.ids(texts)
    id_slot = torch.tensor([captions.slot(ids[i], None if uncond[i] else batch["identity_word"][i]) for i in range(b)])
    exp_slot = torch.tensor([captions.slot(ids[i], None if uncond[i] else batch["expression_word"][i]) for i in range(b)])
    fused = (~uncond) & (~text_only) & (id_slot >= 0)
    with torch.no_grad():
        text = text_encoder(input_ids=ids.to(device))[0]
    cond = fuse_rows_per_sample(text, id_slot.clamp(min=0), feats, stea.fuse, fused.to(device))

    columns = torch.stack([id_slot.clamp(min=0), exp_slot.clamp(min=0)], dim=1)
    probe.reset(columns, tuple(latents.shape[-2:]))
    pred = unet(noisy, t, cond).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    face = batch["mask"].to(device)
    lat_mask = F.interpolate(face[:, None].float(), size=latents.shape[-2:], mode="area")
    l_noise = noise_loss(pred, target, lat_mask, use_mask.to(device))
    l_loc = localization_loss(
        probe.maps, face, torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long),
        active=fused, has_expression=(exp_slot >= 0) & fused,
        beta=args.beta, gamma=args.gamma, lam=args.lambda_loc, mu=args.mu_loc,
    ) if probe.maps else pred.sum() * 0.0
    probe.reset(None, (0, 0))

    def global_mean(local_mean: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
        """A mean over this process's active samples -> its share of the mean over all processes' active samples."""
        if global_sum is None:
            return local_mean
        total = float(global_sum(local_count.float()))
        return local_mean * (world * float(local_count) / total) if total > 0 else local_mean * 0.0

    l_loc = global_mean(l_loc, fused.sum())

    dip_active = fused.to(device) & (t <= args.rt)
    if bool(dip_active.any()):
        idx = torch.nonzero(dip_active).flatten()
        x0 = predict_x0(noisy[idx], pred[idx], scheduler.alphas_cumprod, t[idx], scheduler.config.prediction_type)
        decoded = ((vae.decode(x0 / scaling).sample.float() + 1) / 2).clamp(0, 1)
        res = pixels.shape[-1]
        scale = decoded.shape[-1] / res
        mats = torch.stack([crop_matrix("arcface_112", (batch["landmarks"][i] + 0.5) * scale - 0.5).float() for i in idx.tolist()])
        l_id = dip_identity_loss(decoded, mats, backbone, ref_emb[idx], torch.ones(len(idx), dtype=torch.bool, device=device))
    else:
        l_id = pred.sum() * 0.0
    l_id = global_mean(l_id, dip_active.sum())
    total = l_noise + l_loc + args.id_weight * l_id
    return {"loss": total, "noise": l_noise.detach(), "loc": l_loc.detach(), "id": l_id.detach(),
            "fused": fused.float().mean(), "dip_samples": dip_active.float().sum()}


def save_outputs(out: Path, stea: STEAModel, unet, arcface_name: str, step: int, save_dtype: str, frozen_unet: bool) -> None:
    save_stea(stea, out / "stea.safetensors", {"trained_steps": step, "recognizer": arcface_name, "unet_trained": not frozen_unet})
    if frozen_unet:
        return
    dtype = torch.float16 if save_dtype == "fp16" else torch.float32
    ldm = {k: v.detach().to(dtype) for k, v in unet_diffusers_to_ldm(unet.state_dict()).items()}
    atomic_save_safetensors(ldm, out / "unet.safetensors", {"method": "portraitbooth", "component": "unet",
                                                             "layout": "ldm", "trained_steps": str(step)})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args, "PortraitBooth training", args.gradient_accumulation_steps)
    device = run.device

    # fp32 weights: the UNet is trained (--mixed-precision runs the forward under autocast)
    tokenizer, text_encoder, vae, unet, scheduler = load_diffusers_sd(args.pretrained_model, torch.float32, device)
    recognizer = load_arcface(args.arcface, device=device)
    backbone = recognizer.backbone.eval().requires_grad_(False)
    layers = tuple(args.arcface_layers)
    text_dim = text_encoder.config.hidden_size
    if args.init_stea:
        from ..pipelines.portraitbooth.fastcomposer_loading import load_stea

        stea = load_stea(args.init_stea)
        if stea.config.feature_source != "arcface" or stea.config.text_dim != text_dim:
            raise ValueError(f"--init-stea {args.init_stea} is not an ArcFace STEA for {text_dim}-wide text.")
        layers = stea.config.arcface_layers
    else:
        feature_dim = arcface_feature_dims(backbone.config, layers)
        stea = STEAModel(STEAConfig(text_dim=text_dim, feature_dim=feature_dim, hidden_dim=text_dim,
                                    feature_source="arcface", arcface_layers=layers))
    stea = stea.to(device).train().requires_grad_(True)
    if not args.freeze_unet:
        unet.train().requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    probe = AttentionProbe()
    probed = install_probe(unet, probe, args.loc_layers)
    log.info("PortraitBooth training: ArcFace layers %s, %d probed cross-attention layers, UNet %s.", list(layers),
             len(probed), "frozen" if args.freeze_unet else "trained")

    data = PortraitBoothDataset(args.data_dir, args.resolution)
    run.step_batches(len(data))
    params = [{"params": list(stea.fuse.parameters())}]
    if not args.freeze_unet:
        params.append({"params": [p for p in unet.parameters() if p.requires_grad]})
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    run.restore({"stea": stea.fuse, "unet": unet}, optimizer)
    lr_scheduler = run.scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.max_steps, [args.lr] * len(params))
    acc = run.accelerator
    if args.freeze_unet:  # a module without trainable parameters must not be wrapped for DDP
        fuse, optimizer = acc.prepare(stea.fuse, optimizer)
        trained_models = (fuse,)
    else:
        fuse, unet, optimizer = acc.prepare(stea.fuse, unet, optimizer)
        trained_models = (fuse, unet)
    stea.fuse = fuse
    captions = CaptionEncoder(tokenizer)
    arcface_name = Path(args.arcface).name
    trained = [p for g in params for p in g["params"]]

    def compute(indices, flips, rng: SampleRandom) -> dict:
        batch = data.batch(indices, flips)
        with acc.autocast():
            return training_losses(batch, stea=stea, unet=unet, vae=vae, text_encoder=text_encoder, captions=captions,
                                   backbone=backbone, scheduler=scheduler, probe=probe, args=args, device=device, rng=rng,
                                   global_sum=run.global_sum, world=run.world)

    def save(at: int) -> None:
        plain = {"stea": acc.unwrap_model(stea.fuse), "unet": acc.unwrap_model(unet)}

        def write_outputs(step: int) -> None:
            stea.fuse = plain["stea"]
            try:
                save_outputs(run.out, stea, plain["unet"], arcface_name, step, args.save_dtype, args.freeze_unet)
            finally:
                stea.fuse = fuse

        run.save(at, plain, optimizer, write_outputs)

    return run.train(max_steps=args.max_steps, compute=compute, models=trained_models, optimizer=optimizer,
                     scheduler=lr_scheduler, clip_params=trained, save=save, sums=("dip_samples",), hint="lower --lr.")


if __name__ == "__main__":
    sys.exit(main())
