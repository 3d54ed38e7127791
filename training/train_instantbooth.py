"""Train InstantBooth's FC heads and adapters (paper Sec. 3.3) on text-image pairs with object masks.

    accelerate launch -m facebooth.training.train_instantbooth --pretrained-model sd-v1-5-diffusers/ \
        --clip-vision clip-vit-large-patch14/ --data-dir people/ --mask-dir people_masks/ \
        --output-dir runs/instantbooth --batch-size 16 --max-steps 320000

Data: ``--data-dir`` holds the images; per file stem an optional caption ``<stem>.txt`` (default "a photo of a
person") and a mask ``<stem>.png`` in ``--mask-dir`` (white = the subject; whole image when absent, which the
paper advises against). One image per concept (N = 1), as in the paper.

Per step: the image (resized/cropped to ``--resolution``) is the ground truth x_t. Its subject is cropped to a
square, its background blacked out, and the crop heavily augmented (flip, rotation, scale, shift, colour,
greyscale, blur); the frozen CLIP vision tower gives the global feature and the 257 tokens. The caption gets the
identifier before its class noun ("a photo of a sks woman ..."); the frozen text encoder encodes it and its
output at the identifier is replaced by E_c's FC of the global feature (alpha = 1 in training). E_p's FC of the
tokens feeds every adapter (beta = 1). Loss: || eps - eps_theta(z_t, t, c, X_s) ||^2 (eq. 5). Only the two FC
heads (lr 1e-4) and the adapters (lr 1e-6) train; SD and CLIP stay frozen.

The CLIP vision tower must be the one used at inference (ComfyUI's CLIP_VISION): a transformers folder, or a
ComfyUI ``clip_vision`` .safetensors file (architecture inferred from its shapes, or ``--clip-vision-config``).

Output: ``<output-dir>/<output-name>.safetensors`` (layout in ``pipelines/instantbooth/files.py``); copy it into
``models/facebooth/instantbooth`` for the Load InstantBooth node. Run state for ``--resume`` under
``<output-dir>/checkpoints`` (safetensors only).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..pipelines.clip_vision import clip_vision_sizes
from ..pipelines.instantbooth import (
    AugmentConfig,
    DiffusersAdapterHooks,
    IdentifierError,
    InstantBoothConfig,
    InstantBoothModel,
    augment_reference,
    clip_preprocess,
    diffusers_layout,
    identifier_rows,
    inject_concept,
    insert_identifier,
    load_instantbooth,
    masked_object_crop,
    save_instantbooth,
)
from ..pipelines.instantbooth.prompt import DEFAULT_IDENTIFIER, PERSON_NOUNS
from ..utils.files import sanitize_name
from .datafiles import IMAGE_EXTS, find_by_stem, list_images, read_gray, read_rgb
from .distributed import SampleRandom
from .loop import TrainingRun, add_run_arguments
from .run_state import load_diffusers_sd

log = logging.getLogger(__name__)
# ComfyUI's full-size CLIP vision towers, by width: (heads, activation)
_KNOWN_TOWERS = {1024: (16, "quick_gelu"), 1280: (16, "gelu"), 1664: (16, "gelu")}


# --- data ---------------------------------------------------------------------------------------------------


def _centre_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, 3) in [0, 1] -> (3, size, size): the centred square, resized (bicubic, antialiased)."""
    h, w = image.shape[:2]
    s = min(h, w)
    x = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s].permute(2, 0, 1)[None]
    if s != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].clamp(0, 1)


class InstantBoothDataset:
    """Images + optional masks + optional captions, per file stem. Items are (target, reference crop, mask, prompt)."""

    def __init__(self, data_dir: str | Path, mask_dir: str | Path | None = None, resolution: int = 512,
                 reference_size: int = 224, identifier: str = DEFAULT_IDENTIFIER, class_nouns: Sequence[str] = PERSON_NOUNS,
                 default_caption: str = "a photo of a person", augment: AugmentConfig | None = None) -> None:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-dir {root} is not a folder.")
        self.paths = list_images(root)
        if not self.paths:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTS)}) in {root}.")
        self.mask_dir = Path(mask_dir) if mask_dir else None
        self.resolution, self.reference_size = resolution, reference_size
        self.augment = augment if augment is not None else AugmentConfig()
        fallback = insert_identifier(default_caption, identifier, class_nouns)
        self.prompts = []
        without_noun = 0
        for p in self.paths:
            cap = p.with_suffix(".txt")
            text = cap.read_text(encoding="utf-8").strip() if cap.is_file() else default_caption
            try:
                self.prompts.append(insert_identifier(text or default_caption, identifier, class_nouns))
            except IdentifierError:
                without_noun += 1
                self.prompts.append(f"{text}, {fallback}")
        if without_noun:
            log.warning("%d caption(s) have no class noun; '%s' was appended to them.", without_noun, fallback)
        missing = [p.name for p in self.paths if self._mask_path(p) is None]
        if missing:
            log.warning("%d image(s) have no mask (e.g. %s): their whole image is the reference.", len(missing), missing[0])

    def __len__(self) -> int:
        return len(self.paths)

    def _mask_path(self, p: Path) -> Path | None:
        return find_by_stem(self.mask_dir, p.stem)

    def get(self, index: int, flip: bool, generator: torch.Generator | None) -> dict:

        p = self.paths[index]
        image = read_rgb(p)
        mp = self._mask_path(p)
        mask = read_gray(mp) if mp is not None else None
        target = _centre_square(image, self.resolution) * 2 - 1  # (3, R, R) in [-1, 1]
        if flip:
            target = target.flip(-1)
        crop, cmask = masked_object_crop(image, mask, self.reference_size)
        if generator is not None:
            crop = augment_reference(crop, cmask, generator, self.augment)
        return {"pixel_values": target, "reference": crop, "prompt": self.prompts[index]}

    def batch(self, indices: Sequence[int], flips: Sequence[bool], generators: Sequence[torch.Generator] | None) -> dict:
        """``generators``: one per sample for the reference augmentation (None: no augmentation)."""
        gens = list(generators) if generators is not None else [None] * len(indices)
        items = [self.get(i, f, g) for i, f, g in zip(indices, flips, gens)]
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "reference": torch.stack([it["reference"] for it in items]),
            "prompts": [it["prompt"] for it in items],
        }


# --- models -------------------------------------------------------------------------------------------------


def clip_vision_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """transformers CLIPVisionConfig kwargs for a ComfyUI clip_vision file, from its shapes."""
    sizes = clip_vision_sizes(sd)
    hidden = sizes["hidden_size"]
    if hidden not in _KNOWN_TOWERS:
        raise ValueError(f"Unknown CLIP vision width {hidden}: pass --clip-vision-config with its heads and activation.")
    heads, act = _KNOWN_TOWERS[hidden]
    return {**sizes, "num_attention_heads": heads, "hidden_act": act, "layer_norm_eps": 1e-5}


def load_clip_vision(path: str, config_json: str | None, dtype: torch.dtype, device: torch.device):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    p = Path(path)
    if p.is_dir():
        model = CLIPVisionModelWithProjection.from_pretrained(str(p), torch_dtype=dtype)
    else:
        from ..utils.files import load_state_dict_file

        sd, _ = load_state_dict_file(p)
        cfg = json.loads(Path(config_json).read_text()) if config_json else clip_vision_config_from_state_dict(sd)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{p.name} does not match a CLIP vision tower: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        model = model.to(dtype)
    return model.eval().requires_grad_(False).to(device)


class InstantBoothDenoiser(nn.Module):
    """The trainable computation of one step in a single forward (so DDP sees every trainable parameter used):
    FC heads -> concept token + patch tokens -> frozen UNet with the adapters hooked in -> eps."""

    def __init__(self, ib: InstantBoothModel, unet: nn.Module, beta: float = 1.0) -> None:
        super().__init__()
        self.ib = ib
        self.__dict__["unet"] = unet  # frozen, not a submodule: DDP and the state dict see only InstantBooth
        self.__dict__["hooks"] = DiffusersAdapterHooks(unet, ib, beta=beta)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_cond: torch.Tensor, rows: Sequence[Sequence[int]],
                image_embeds: torch.Tensor, hidden_states: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        concept = self.ib.concept_encoder(image_embeds) * alpha  # (B, text_dim): N = 1 per sample
        cond = torch.cat([inject_concept(text_cond[b : b + 1], rows[b], concept[b]) for b in range(text_cond.shape[0])])
        self.hooks.set_patch_tokens(self.ib.patch_encoder(hidden_states))  # (B, T, patch_dim)
        try:
            return self.unet(noisy, timesteps, cond).sample
        finally:
            self.hooks.set_patch_tokens(None)


# --- training -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facebooth.training.train_instantbooth", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained-model", required=True, help="diffusers folder of an SD1.x model (unet, vae, text_encoder, tokenizer, scheduler)")
    p.add_argument("--clip-vision", required=True, help="CLIP vision tower: transformers folder or ComfyUI clip_vision .safetensors")
    p.add_argument("--clip-vision-config", default=None, help="JSON with CLIPVisionConfig kwargs for a .safetensors tower of unknown width")
    p.add_argument("--init", default=None, help="continue from this InstantBooth file instead of a fresh init")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--mask-dir", default=None, help="subject masks with the same file stems (white = subject)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--output-name", default="instantbooth")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--identifier", default=DEFAULT_IDENTIFIER)
    p.add_argument("--class-nouns", default=",".join(PERSON_NOUNS), help="comma-separated nouns the identifier goes before")
    p.add_argument("--default-caption", default="a photo of a person")
    p.add_argument("--patch-dim", type=int, default=768, help="patch-encoder output width of a fresh model")
    p.add_argument("--num-heads", type=int, default=8, help="adapter heads of a fresh model")
    p.add_argument("--no-augment", action="store_true", help="no reference augmentation (debugging only)")
    p.add_argument("--lr-adapter", type=float, default=1e-6, help="paper: 1e-6")
    p.add_argument("--lr-heads", type=float, default=1e-4, help="FC layers of both encoders; paper: 1e-4")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int, default=0, help="log the loss on a fixed batch (fixed noise, no augmentation) every N steps; 0: off")
    add_run_arguments(p, batch_size=16, max_steps=320_000, save_every=5000, max_grad_norm=1.0, max_steps_help="paper: 320k (person), 200k (cat) at batch 16")
    return p


def _ids_and_rows(tokenizer, prompts: Sequence[str], identifier_id: int, length: int) -> tuple[torch.Tensor, list[list[int]]]:
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    rows = []
    for prompt, row in zip(prompts, ids.tolist()):
        try:
            rows.append(identifier_rows([row], identifier_id))
        except IdentifierError:
            raise IdentifierError(f"The identifier fell outside the {length}-token window in: {prompt!r}. Shorten the caption.") from None
    return ids, rows


class _Step:
    """Everything frozen that turns a data batch into the denoiser's inputs."""

    def __init__(self, tokenizer, text_encoder, vae, clip_vision, scheduler, identifier_id, device, dtype):
        self.tokenizer, self.text_encoder, self.vae, self.clip_vision = tokenizer, text_encoder, vae, clip_vision
        self.scheduler, self.identifier_id, self.device, self.dtype = scheduler, identifier_id, device, dtype
        self.scaling = getattr(vae.config, "scaling_factor", 0.18215)
        self.window = text_encoder.config.max_position_embeddings
        self.clip_size = clip_vision.config.image_size

    @torch.no_grad()
    def inputs(self, batch: dict, rng: SampleRandom) -> dict:
        """Per-sample draws from ``rng`` (VAE sample, noise, timestep): the same on any number of processes."""
        dev, dt = self.device, self.dtype
        latents = self.vae.encode(batch["pixel_values"].to(dev, dt)).latent_dist.sample(rng.generators("vae")) * self.scaling
        pixels = clip_preprocess(batch["reference"], self.clip_size).to(dev, dt)
        out = self.clip_vision(pixel_values=pixels)
        ids, rows = _ids_and_rows(self.tokenizer, batch["prompts"], self.identifier_id, self.window)
        text = self.text_encoder(input_ids=ids.to(dev))[0]
        noise = rng.randn("noise", latents.shape[1:]).to(dev, latents.dtype)
        timesteps = rng.randint("timestep", self.scheduler.config.num_train_timesteps).to(dev)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = self.scheduler.config.prediction_type
        target = noise if pred == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        return {"noisy": noisy, "timesteps": timesteps, "text_cond": text, "rows": rows,
                "image_embeds": out.image_embeds, "hidden_states": out.last_hidden_state, "target": target}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args, "InstantBooth training", args.gradient_accumulation_steps)
    out_file = run.out / f"{sanitize_name(args.output_name, what='output name')}.safetensors"
    device = run.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    tokenizer, text_encoder, vae, unet, scheduler = load_diffusers_sd(args.pretrained_model, dtype, device)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"Unsupported prediction type {scheduler.config.prediction_type!r}.")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    clip_vision = load_clip_vision(args.clip_vision, args.clip_vision_config, dtype, device)
    nouns = tuple(n.strip() for n in args.class_nouns.split(",") if n.strip())
    ident_ids = tokenizer(args.identifier, add_special_tokens=False).input_ids
    if len(ident_ids) != 1:
        raise IdentifierError(f"The identifier {args.identifier!r} is {len(ident_ids)} tokens; pick a single-token word such as 'sks'.")

    if args.init:
        ib = load_instantbooth(args.init).requires_grad_(True)
    else:
        ib = InstantBoothModel(InstantBoothConfig(
            clip_hidden_dim=clip_vision.config.hidden_size, clip_global_dim=clip_vision.config.projection_dim,
            text_dim=text_encoder.config.hidden_size, patch_dim=args.patch_dim, num_heads=args.num_heads,
            identifier=args.identifier, class_nouns=nouns, adapters=diffusers_layout(unet)))
    ib.train()
    denoiser = InstantBoothDenoiser(ib, unet)
    step_inputs = _Step(tokenizer, text_encoder, vae, clip_vision, scheduler, ident_ids[0], device, dtype)

    data = InstantBoothDataset(args.data_dir, args.mask_dir, args.resolution, clip_vision.config.image_size,
                               ib.config.identifier, ib.config.class_nouns, args.default_caption)
    run.step_batches(len(data))
    groups = [{"params": ib.adapter_parameters()}, {"params": ib.head_parameters()}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr_heads, weight_decay=args.weight_decay)
    run.restore({"instantbooth": ib}, optimizer)
    lr_scheduler = run.scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.max_steps, [args.lr_adapter, args.lr_heads])
    denoiser, optimizer = run.accelerator.prepare(denoiser, optimizer)
    plain = run.accelerator.unwrap_model(denoiser)

    eval_batch = None
    if args.eval_every > 0:
        n = min(len(data), max(args.batch_size, 4))
        eval_batch = data.batch(range(n), [False] * n, None)

    def evaluate() -> float:
        """Main process only: the unwrapped model (a DDP forward on one process would wait for the others)."""
        inputs = step_inputs.inputs(eval_batch, SampleRandom(12345, 0, range(len(eval_batch["prompts"]))))
        target = inputs.pop("target")
        plain.eval()
        with torch.no_grad(), run.accelerator.autocast():
            pred = plain(**inputs)
        plain.train()
        return float(F.mse_loss(pred.float(), target.float()))

    def compute(indices, flips, rng: SampleRandom) -> dict:
        batch = data.batch(indices, flips, None if args.no_augment else rng.generators("augment"))
        inputs = step_inputs.inputs(batch, rng)
        target = inputs.pop("target")
        with run.accelerator.autocast():
            pred = denoiser(**inputs)
        return {"loss": F.mse_loss(pred.float(), target.float())}

    def write_outputs(at: int) -> None:
        save_instantbooth(plain.ib, out_file, {"trained_steps": at, "lr_adapter": args.lr_adapter, "lr_heads": args.lr_heads})

    def save(at: int) -> None:
        run.save(at, {"instantbooth": plain.ib}, optimizer, write_outputs)

    log.info("InstantBooth training: %d images, %d adapters, to step %d.", len(data), len(ib.config.adapters), args.max_steps)
    return run.train(max_steps=args.max_steps, compute=compute, models=(denoiser,), optimizer=optimizer,
                     scheduler=lr_scheduler, clip_params=list(ib.parameters()), save=save,
                     lr_keys=("lr_adapter", "lr_heads"), evaluate=evaluate if eval_batch is not None else None,
                     eval_every=args.eval_every, hint="lower the learning rates or use --mixed-precision no.")


if __name__ == "__main__":
    sys.exit(main())
