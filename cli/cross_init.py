"""``python -m facebooth cross-init``: learn a Cross Initialization face embedding from photos, offline.

    python -m facebooth cross-init --pretrained ./stable-diffusion-2-1-base --image me1.jpg me2.jpg \\
        --name anna --preset fast --out ComfyUI/models/embeddings

writes ``<out>/anna.safetensors`` (a ComfyUI embedding: use ``embedding:anna`` in a prompt).
``--from-official learned_embeds.bin`` converts an official Cross Initialization result instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)  # under the CLI's "facebooth" stderr handler

COMMAND = "cross-init"
HELP = "learn a Cross Initialization face embedding (ComfyUI embedding file) from photos"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(COMMAND, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", metavar="DIFFUSERS_DIR", help="local diffusers SD1.x/SD2.x folder (model_index.json)")
    p.add_argument("--image", nargs="+", metavar="PHOTO", help="one or more face photos of the same person")
    p.add_argument("--name", help="embedding name; the file is <out>/<name>.safetensors")
    p.add_argument("--preset", choices=["fast", "full", "custom"], default="full",
                   help="full: 320 steps, batch 8, lr 0.005 (paper); fast: 25 steps, lr 0.08; custom: full + overrides")
    p.add_argument("--steps", type=int, help="optimisation steps (overrides the preset)")
    p.add_argument("--lr", type=float, help="learning rate (overrides the preset)")
    p.add_argument("--batch-size", type=int, help="samples per step (overrides the preset)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (512 for SD1.5 / SD2.1-base)")
    p.add_argument("--crop", choices=["center", "none"], default="center",
                   help="center: square centre crop; none: stretch to a square (the official code on square photos)")
    p.add_argument("--out", default=".", help="output folder (default: current folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <name>.safetensors")
    p.add_argument("--from-official", metavar="BIN",
                   help="convert an official learned_embeds.bin instead of training (needs only --name)")
    p.set_defaults(func=run)
    return p


def _load_image(path: Path):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    if not path.is_file():
        raise SystemExit(f"error: image not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    except OSError as exc:
        raise SystemExit(f"error: {path} is not a readable image ({exc})") from exc


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return name


def _target(args) -> Path:
    from ..utils.files import BadNameError, sanitize_name

    if not args.name:
        raise SystemExit("error: --name is required (a short name such as 'anna')")
    try:
        name = sanitize_name(args.name, what="embedding name")
    except BadNameError as exc:
        raise SystemExit(f"error: {exc}") from exc
    name = name.replace(" ", "_")  # ComfyUI splits prompts at spaces, so "embedding:my face" could not work
    target = Path(args.out) / f"{name}.safetensors"
    if target.exists() and not args.overwrite:
        raise SystemExit(f"error: {target} already exists; pass --overwrite to replace it or choose another --name")
    return target


def run(args: argparse.Namespace) -> int:
    from ..pipelines import cross_init as ci
    from ..pipelines.runtime import RunHooks

    target = _target(args)
    if args.from_official:
        try:
            ci.convert_official(args.from_official, target)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from exc
        log.info("converted %s", args.from_official)
        sys.stdout.write(f"{target}\n")
        return 0
    if not args.pretrained or not args.image:
        raise SystemExit("error: --pretrained DIFFUSERS_DIR and --image PHOTO... are required to train")

    from ..pipelines.textual_inversion.diffusers_backend import DiffusersBackend

    images = [_load_image(Path(p)) for p in args.image]
    try:
        settings = ci.make_settings(
            args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            resolution=args.resolution, crop=args.crop,
        )
        backend = DiffusersBackend.from_pretrained(args.pretrained, device=_device(args.device))
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        raise SystemExit(f"error: {exc}") from exc

    every = max(1, settings.steps // 20)
    job: Optional[ci.CrossInitRun] = None

    def progress(done: int, total: int, preview=None) -> None:
        if job is not None and (done % every == 0 or done == total):
            log.info("step %d/%d  loss %.4f", done, total, job.engine.result.loss_history[-1])

    try:
        job = ci.CrossInitRun(backend, images, settings, RunHooks(progress=progress))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    log.info("Cross Initialization: %s preset, %d steps, batch %d, lr %g on %s (%s)", settings.preset,
             settings.steps, settings.batch_size, settings.lr, backend.device, backend.family)
    result = job.run()
    ci.save_embedding(target, result.embedding, result.metadata)
    log.info("use embedding:%s in a prompt (file in ComfyUI's models/embeddings)", target.stem)
    sys.stdout.write(f"{target}\n")  # the result on stdout, logs on stderr
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry: ``python -m facebooth.cli.cross_init ...`` (``python -m facebooth cross-init`` is the usual one)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="facebooth")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv if argv[:1] == [COMMAND] else [COMMAND, *argv])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
