"""PortraitBooth training data: prepare an image + caption folder, then read it back in batches.

    python -m facebooth.training.portraitbooth_data --input raw/ --output prepared/ --mtcnn models/mtcnn \
        [--parser parsing_bisenet.pth] [--reference-dir refs/] [--resolution 512] [--aligned]

Input: ``raw/<name>.<png|jpg|...>`` with ``raw/<name>.txt`` holding its caption (e.g. "a woman smiling in a park").
The caption must name the subject with an identity word: "man" or "woman", the paper's class set (its Table 5: broader
class words do worse; ``--identity-words`` changes it); an emotion word ("happy", "sad", ...) is optional and feeds the
ECAC expression term. Per kept image the preparation writes:

* ``images/<name>.png``: the training image, centre-cropped to a square and resized to ``--resolution``;
* ``refs/<name>.png``: the reference face, ArcFace-aligned 112x112 (from ``--reference-dir/<name>.*`` when given,
  e.g. another frame of the same person as in the paper; otherwise from the training image itself);
* ``masks/<name>.png``: the face-region mask (BiSeNet parsing with ``--parser``, the landmark hull without);
* ``meta/<name>.json``: caption, identity word, expression word, the 5 landmarks in training-image pixels;
* ``index.json``: the kept names and the settings; skipped images are listed with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..pipelines.face.analyzer import FaceAnalyzer
from ..pipelines.portraitbooth.losses import EMOTION_WORDS, IDENTITY_WORDS
from ..pipelines.runtime import NO_HOOKS, RunHooks
from .datafiles import IMAGE_EXTS, find_by_stem, list_images, read_rgb

log = logging.getLogger(__name__)

FLIP_LANDMARKS = [1, 0, 2, 4, 3]  # mirrored image: left/right eye and mouth corners swap


def find_word(caption: str, words: Sequence[str]) -> str | None:
    """The word of ``words`` that occurs first in the caption (whole words, case-insensitive)."""
    best = None
    for w in words:
        m = re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", caption, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), w)
    return best[1] if best else None


def save_rgb(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def save_mask(mask: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, 3) -> centre square crop resized to (size, size, 3), antialiased."""
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = image[y0 : y0 + s, x0 : x0 + s].permute(2, 0, 1)[None]
    if s != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return crop[0].permute(1, 2, 0).clamp(0, 1)


def prepare_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    analyzer: FaceAnalyzer,
    *,
    resolution: int = 512,
    mode: str = "detect",
    reference_dir: str | Path | None = None,
    identity_words: Sequence[str] = IDENTITY_WORDS,
    emotion_words: Sequence[str] = EMOTION_WORDS,
    hooks: RunHooks = NO_HOOKS,
) -> dict[str, Any]:
    """Write the prepared dataset (see the module docstring); returns the index."""
    src, out = Path(input_dir), Path(output_dir)
    refs_src = Path(reference_dir) if reference_dir else None
    images = list_images(src) if src.is_dir() else []
    if not images:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) in {src}. Put <name>.png with <name>.txt captions there.")
    kept: list[str] = []
    skipped: dict[str, str] = {}
    for k, path in enumerate(images):
        hooks.check_interrupt()
        stem = path.stem
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            skipped[stem] = "no caption file"
            continue
        caption = caption_file.read_text(encoding="utf-8").strip()
        identity = find_word(caption, identity_words)
        if identity is None:
            skipped[stem] = f"caption names none of {list(identity_words)}"
            continue
        image = square_resize(read_rgb(path), resolution)
        faces = analyzer.analyze(image, mode=mode, select="largest", no_face="skip", crops=("arcface_112",), embed=False)
        if not faces.faces:
            skipped[stem] = "no face found"
            continue
        face = faces.faces[0]
        ref_crop = face.crops["arcface_112"]
        ref_path = find_by_stem(refs_src, stem)
        if ref_path is not None:
            ref_faces = analyzer.analyze(read_rgb(ref_path), mode=mode, select="largest", no_face="skip",
                                         crops=("arcface_112",), embed=False)
            if not ref_faces.faces:
                skipped[stem] = f"no face in the reference image {ref_path.name}"
                continue
            ref_crop = ref_faces.faces[0].crops["arcface_112"]
        save_rgb(image, out / "images" / f"{stem}.png")
        save_rgb(ref_crop, out / "refs" / f"{stem}.png")
        save_mask(face.mask, out / "masks" / f"{stem}.png")
        meta = {
            "caption": caption, "identity_word": identity, "expression_word": find_word(caption, emotion_words),
            "landmarks": [[round(float(v), 3) for v in p] for p in face.landmarks.tolist()],
        }
        (out / "meta").mkdir(parents=True, exist_ok=True)
        (out / "meta" / f"{stem}.json").write_text(json.dumps(meta, indent=1))
        kept.append(stem)
        hooks.progress(k + 1, len(images), None)
    if not kept:
        raise ValueError(f"No usable image in {src}: {json.dumps(skipped)[:500]}")
    index = {"format_version": 1, "resolution": resolution, "items": kept, "skipped": skipped,
             "identity_words": list(identity_words), "emotion_words": list(emotion_words)}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    log.info("PortraitBooth data: %d image(s) prepared in %s, %d skipped.", len(kept), out, len(skipped))
    return index


class PortraitBoothDataset:
    """Reads a prepared folder. Items: pixel_values (3, R, R) in [-1, 1], ref (112, 112, 3) in [0, 1],
    mask (R, R) in [0, 1], landmarks (5, 2) at resolution R, caption / identity_word / expression_word."""

    def __init__(self, root: str | Path, resolution: int | None = None) -> None:
        self.root = Path(root)
        index_file = self.root / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a prepared PortraitBooth dataset (no index.json). "
                                    "Run python -m facebooth.training.portraitbooth_data first.")
        self.index = json.loads(index_file.read_text())
        self.items: list[str] = list(self.index["items"])
        self.stored = int(self.index["resolution"])
        self.resolution = int(resolution or self.stored)
        self.meta = [json.loads((self.root / "meta" / f"{s}.json").read_text()) for s in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int, flip: bool = False) -> dict[str, Any]:
        stem, meta = self.items[i], self.meta[i]
        image = read_rgb(self.root / "images" / f"{stem}.png")
        mask = read_rgb(self.root / "masks" / f"{stem}.png")[..., 0]
        ref = read_rgb(self.root / "refs" / f"{stem}.png")
        landmarks = torch.tensor(meta["landmarks"], dtype=torch.float32)
        r = self.resolution
        if r != image.shape[0]:
            scale = r / image.shape[0]
            image = square_resize(image, r)
            mask = F.interpolate(mask[None, None], size=(r, r), mode="bilinear", antialias=True, align_corners=False)[0, 0]
            landmarks = (landmarks + 0.5) * scale - 0.5  # pixel centres at integers
        if flip:
            image, mask, ref = image.flip(1), mask.flip(1), ref.flip(1)
            landmarks = landmarks[FLIP_LANDMARKS].clone()
            landmarks[:, 0] = r - 1 - landmarks[:, 0]
        return {
            "pixel_values": image.permute(2, 0, 1) * 2 - 1, "ref": ref, "mask": mask.clamp(0, 1), "landmarks": landmarks,
            "caption": meta["caption"], "identity_word": meta["identity_word"], "expression_word": meta.get("expression_word"),
        }

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> dict[str, Any]:
        items = [self.get(i, f) for i, f in zip(indices, flips)]
        out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in ("pixel_values", "ref", "mask", "landmarks")}
        for k in ("caption", "identity_word", "expression_word"):
            out[k] = [it[k] for it in items]
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facebooth.training.portraitbooth_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder of images with same-name .txt captions")
    p.add_argument("--output", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mtcnn", default=None, help="folder with MTCNN pnet/rnet/onet weights (needed unless --aligned)")
    p.add_argument("--parser", default=None, help="BiSeNet face-parsing weights for precise face masks (landmark hull without)")
    p.add_argument("--reference-dir", default=None, help="reference faces <name>.* (e.g. another frame of the person)")
    p.add_argument("--aligned", action="store_true", help="the images are already aligned face crops: no detection")
    p.add_argument("--identity-words", nargs="+", default=list(IDENTITY_WORDS),
                   help="class words a caption must name the subject with (paper: man woman; broader sets do worse)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    detector = parser = None
    if not args.aligned:
        if not args.mtcnn:
            raise SystemExit("Give --mtcnn (a folder with pnet/rnet/onet weights), or --aligned for pre-aligned face crops.")
        from ..pipelines.face.mtcnn import load_mtcnn

        detector = load_mtcnn(args.mtcnn)
    if args.parser:
        from ..pipelines.face.parsing import load_bisenet

        parser = load_bisenet(args.parser)
    analyzer = FaceAnalyzer(detector=detector, recognizer=None, parser=parser, name="prepare")
    prepare_dataset(args.input, args.output, analyzer, resolution=args.resolution,
                    mode="aligned" if args.aligned else "detect", reference_dir=args.reference_dir,
                    identity_words=tuple(args.identity_words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
