"""Pretrain Face2Diffusion's MSID encoder with the multi-scale ArcFace loss (paper Sec. 3.2, eq. 3).

    python -m facebooth.training.train_f2d_msid --data-dir faces_by_identity/ --output-dir runs/msid \
        --batch-size 1024 --lr 1e-3 --max-steps 200000 --save-every 2000

Paper recipe: ViT with 12 blocks on MS1M, 30 epochs, batch 1024, lr 1e-3, feature blocks {3, 6, 9, 12}
(0-based 2, 5, 8, 11). Eq. 3 is the ArcFace loss on the concatenated multi-scale vector v_id (1536-d) — one
margin head over the concatenation, which already makes every level carry identity because each level's
BN+LN-normalised CLS token is a quarter of v_id. ``--level-heads`` adds one ArcFace head per level (384-d) on
top of it, averaged with the concat loss: a stronger, explicit version of "encourage the shallower layers to
discriminate identities", not what eq. 3 writes.

Output: ``<output-dir>/msid.safetensors`` (official key layout + metadata), loadable by
``facebooth.pipelines.face2diffusion.load_msid``. Resumable with ``--resume latest``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..pipelines.face2diffusion.loading import load_msid, save_msid
from ..pipelines.face2diffusion.msid import MSIDConfig, MSIDEncoder, level_slices
from .distributed import sync_batchnorm
from .f2d_data import IdentityFolderDataset
from .loop import TrainingRun, add_run_arguments

log = logging.getLogger(__name__)


class ArcFaceHead(nn.Module):
    """Additive angular margin softmax (ArcFace): logits s*cos(theta + m) for the true class, s*cos(theta) else."""

    def __init__(self, dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin
        # Beyond theta = pi - m, cos(theta + m) stops decreasing; fall back to a linear penalty there (standard).
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(feats.float()), F.normalize(self.weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels[:, None])
        sin = (1 - target.square()).clamp_min(0).sqrt()
        with_margin = target * math.cos(self.margin) - sin * math.sin(self.margin)
        with_margin = torch.where(target > self.th, with_margin, target - self.mm)
        logits = cos.scatter(1, labels[:, None], with_margin) * self.scale
        return F.cross_entropy(logits, labels)


class MultiScaleArcFace(nn.Module):
    """Eq. 3 on the concatenated v_id, plus optional per-level heads."""

    def __init__(self, config: MSIDConfig, num_classes: int, scale: float, margin: float, level_heads: bool):
        super().__init__()
        self.concat = ArcFaceHead(config.feature_dim, num_classes, scale, margin)
        self.slices = list(level_slices(config)) if level_heads else []
        self.levels = nn.ModuleList(ArcFaceHead(config.embed_dim, num_classes, scale, margin) for _ in self.slices)

    def forward(self, v_id: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.concat(v_id, labels)
        parts = {"loss_concat": float(loss.detach())}
        if self.levels:
            level_losses = [head(v_id[:, s], labels) for head, s in zip(self.levels, self.slices)]
            for k, l in enumerate(level_losses):
                parts[f"loss_level{k}"] = float(l.detach())
            loss = (loss + torch.stack(level_losses).sum()) / (1 + len(level_losses))
        return loss, parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facebooth.training.train_f2d_msid", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="one sub-folder per identity with ArcFace-aligned 112x112 crops")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--init", default=None, help="start from this MSID file (official msid.pt or ours) instead of random")
    # encoder shape (defaults: the official msid_base_patch8_112)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--feature-blocks", type=int, nargs="+", default=[2, 5, 8, 11], help="0-based block indices")
    # loss
    p.add_argument("--scale", type=float, default=64.0, help="ArcFace s")
    p.add_argument("--margin", type=float, default=0.5, help="ArcFace m")
    p.add_argument("--level-heads", action="store_true", help="also one ArcFace head per level (beyond eq. 3)")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=30)
    # run state
    add_run_arguments(p, batch_size=1024, max_steps=None, save_every=1000, max_grad_norm=5.0, lr_schedule="cosine", accumulation=False, max_steps_help="default: --epochs worth of steps")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args, "MSID pretraining")
    if args.init:
        model = load_msid(args.init).train()
        cfg = model.config
    else:
        cfg = MSIDConfig(
            img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
            num_heads=args.num_heads, feature_blocks=tuple(args.feature_blocks),
        )
        model = MSIDEncoder(cfg)
    data = IdentityFolderDataset(args.data_dir, image_size=cfg.img_size)
    heads = MultiScaleArcFace(cfg, data.num_classes, args.scale, args.margin, args.level_heads)
    batches = run.step_batches(len(data))
    max_steps = args.max_steps or args.epochs * batches.per_epoch
    # The final `norm` (and any block after the last feature block) is not on the feature path: freeze it, so it
    # stays as loaded and DDP sees no parameters without gradients. The last feature block's MLP output bias adds
    # the same vector to every sample's CLS token, which the level BatchNorm removes: its gradient is zero in exact
    # arithmetic, and Adam would turn rounding noise into lr-sized steps. Freeze it too.
    last = max(cfg.feature_blocks)
    for name, p in model.named_parameters():
        if name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) > last) \
                or name == f"blocks.{last}.mlp.fc2.bias":
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    run.restore({"model": model, "heads": heads}, optimizer)
    scheduler = run.scheduler(optimizer, args.lr_schedule, args.warmup_steps, max_steps, [args.lr])
    # The level BatchNorms normalise over the global batch on any number of processes (same model as 1 process).
    model = sync_batchnorm(model, run.device.type)
    model, heads, optimizer = run.accelerator.prepare(model, heads, optimizer)
    model.train()
    heads.train()
    log.info("MSID pretraining: %d images, %d identities, %d steps/epoch, to step %d.", len(data), data.num_classes,
             batches.per_epoch, max_steps)
    unwrap = run.accelerator.unwrap_model

    def compute(indices, flips, rng) -> dict:
        batch = data.batch(indices, flips)
        with run.accelerator.autocast():
            v_id = model(batch["pixels"].to(run.device))
            loss, parts = heads(v_id, batch["labels"].to(run.device))
        return {"loss": loss, **parts}

    def write_outputs(at: int) -> None:
        save_msid(unwrap(model), run.out / "msid.safetensors", {"trained_steps": at, "num_identities": data.num_classes})

    def save(at: int) -> None:
        run.save(at, {"model": unwrap(model), "heads": unwrap(heads)}, optimizer, write_outputs,
                 {"num_classes": data.num_classes, "identities": data.identities[:1000]})

    return run.train(max_steps=max_steps, compute=compute, models=(model, heads), optimizer=optimizer,
                     scheduler=scheduler, clip_params=params, save=save,
                     hint="lower --lr or use --mixed-precision no.")


if __name__ == "__main__":
    sys.exit(main())
