"""Data and run-state plumbing shared by the two Face2Diffusion trainers.

Data:
- :class:`IdentityFolderDataset`: MSID pretraining, one folder per identity of ArcFace-aligned 112x112 crops.
- :class:`FaceMappingDataset`: mapping training, SD-resolution face images (FFHQ-aligned) with, per file stem,
  a 112x112 ArcFace crop (``--crop-dir``), an optional face-parsing mask (``--mask-dir``, whole image when
  absent) and optional 64 expression coefficients (``--expression-dir``, ``<stem>.npy``; null vector when absent).
- :class:`StepBatches`: the batch of every global step is a pure function of (seed, step), so a resumed run
  sees exactly the data an uninterrupted one would.

Run state: checkpoints are safetensors only (weights, optimizer tensors, torch RNG states; the rest as JSON
metadata), written atomically; nothing is pickled, so resuming never unpickles anything.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..pipelines.face2diffusion.expression import EXPRESSION_DIM, load_expression
from ..pipelines.face2diffusion.msid import preprocess_aligned
from .datafiles import IMAGE_EXTS, find_by_stem, list_images, read_gray, read_rgb

# Shared run scaffolding, re-exported for the scripts and tests that import it from here.
from .run_state import (  # noqa: F401
    StepBatches,
    append_log,
    checkpoint_dir,
    latest_checkpoint,
    load_run_state,
    read_log,
    resolve_resume,
    save_run_state,
    truncate_log,
)

log = logging.getLogger(__name__)


def load_rgb(path: Path, size: int) -> torch.Tensor:
    """Image file -> (3, size, size) float in [-1, 1] (resized with bicubic when it is not already that size)."""
    return read_rgb(path, size).permute(2, 0, 1) * 2 - 1


def load_crop(path: Path, size: int) -> torch.Tensor:
    """Aligned face crop file -> (3, size, size), scaled as the MSID encoder reads crops at inference."""
    return preprocess_aligned(read_rgb(path, size), size)[0]


class IdentityFolderDataset:
    """``root/<identity>/<image>``: aligned face crops with the identity index as label."""

    def __init__(self, root: str | Path, image_size: int = 112):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Identity dataset folder not found: {self.root}")
        self.image_size = image_size
        self.identities: list[str] = []
        self.items: list[tuple[Path, int]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = list_images(folder)
            if not images:
                continue
            label = len(self.identities)
            self.identities.append(folder.name)
            self.items.extend((img, label) for img in images)
        if len(self.identities) < 2:
            raise ValueError(
                f"{self.root} needs at least two identity sub-folders with images (one folder per person, "
                f"aligned 112x112 face crops inside); found {len(self.identities)}."
            )

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, flip: bool = False) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        x = load_crop(path, self.image_size)
        return (x.flip(-1) if flip else x), label

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> dict[str, torch.Tensor]:
        pairs = [self.get(i, f) for i, f in zip(indices, flips)]
        return {"pixels": torch.stack([p for p, _ in pairs]), "labels": torch.tensor([lab for _, lab in pairs])}


class FaceMappingDataset:
    """Face images for mapping training with their identity crops, masks and expression coefficients."""

    def __init__(
        self,
        image_dir: str | Path,
        crop_dir: str | Path,
        resolution: int = 512,
        mask_dir: str | Path | None = None,
        expression_dir: str | Path | None = None,
        crop_size: int = 112,
    ):
        self.image_dir = Path(image_dir)
        self.crop_dir = Path(crop_dir)
        self.mask_dir = Path(mask_dir) if mask_dir else None
        self.expression_dir = Path(expression_dir) if expression_dir else None
        for name, folder in (("image", self.image_dir), ("crop", self.crop_dir), ("mask", self.mask_dir), ("expression", self.expression_dir)):
            if folder is not None and not folder.is_dir():
                raise FileNotFoundError(f"The {name} folder {folder} does not exist.")
        self.resolution = resolution
        self.crop_size = crop_size
        self.images = list_images(self.image_dir)
        if not self.images:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTS)}) in {self.image_dir}.")
        self.crops: list[Path] = []
        missing = []
        for img in self.images:
            crop = find_by_stem(self.crop_dir, img.stem, IMAGE_EXTS)
            if crop is None:
                missing.append(img.stem)
            else:
                self.crops.append(crop)
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) have no 112x112 ArcFace-aligned crop with the same file name in {self.crop_dir} "
                f"(first: {missing[0]}). Make the crops with the face-analysis step, one per training image."
            )
        self.masks = [find_by_stem(self.mask_dir, p.stem, IMAGE_EXTS + (".npy",)) for p in self.images]
        self.expressions = [find_by_stem(self.expression_dir, p.stem, (".npy",)) for p in self.images]
        if self.mask_dir is not None:
            n = sum(m is None for m in self.masks)
            if n:
                log.warning("Face2Diffusion data: %d of %d images have no mask in %s; the whole image counts as face for them.", n, len(self.images), self.mask_dir)
        if self.mask_dir is None:
            log.info("Face2Diffusion data: no mask folder, the whole image counts as face (CGDR reduces to plain denoising).")

    def __len__(self) -> int:
        return len(self.images)

    def _mask(self, index: int) -> torch.Tensor:
        path = self.masks[index]
        if path is None:
            return torch.ones(1, self.resolution, self.resolution)
        if path.suffix == ".npy":
            m = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        else:
            m = read_gray(path)
        if m.ndim != 2:
            raise ValueError(f"Mask {path} must be a single-channel image or a 2-D array.")
        m = (m >= 0.5).float()[None, None]
        return F.interpolate(m, size=(self.resolution, self.resolution), mode="nearest")[0]

    def _expression(self, index: int) -> tuple[torch.Tensor, bool]:
        path = self.expressions[index]
        if path is None:
            return torch.zeros(EXPRESSION_DIM), False
        return load_expression(path), True

    def get(self, index: int, flip: bool = False) -> dict[str, Any]:
        img = load_rgb(self.images[index], self.resolution)
        crop = load_crop(self.crops[index], self.crop_size)
        mask = self._mask(index)
        if flip:  # the only augmentation in the paper
            img, crop, mask = img.flip(-1), crop.flip(-1), mask.flip(-1)
        exp, has = self._expression(index)
        return {"pixel_values": img, "id_pixels": crop, "mask": mask, "expression": exp, "has_expression": has}

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> dict[str, torch.Tensor]:
        rows = [self.get(i, f) for i, f in zip(indices, flips)]
        out = {k: torch.stack([r[k] for r in rows]) for k in ("pixel_values", "id_pixels", "mask", "expression")}
        out["has_expression"] = torch.tensor([r["has_expression"] for r in rows])
        return out
