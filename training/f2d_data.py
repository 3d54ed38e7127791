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

import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..pipelines.face2diffusion.expression import EXPRESSION_DIM
from ..utils.files import atomic_save_safetensors

log = logging.getLogger("FaceBooth")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_rgb(path: Path, size: int) -> torch.Tensor:
    """Image file -> (3, size, size) float in [-1, 1] (resized with bicubic when it is not already that size)."""
    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x * 2 - 1


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
            images = _list_images(folder)
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
        x = load_rgb(path, self.image_size)
        return (x.flip(-1) if flip else x), label

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> dict[str, torch.Tensor]:
        pairs = [self.get(i, f) for i, f in zip(indices, flips)]
        return {"pixels": torch.stack([p for p, _ in pairs]), "labels": torch.tensor([lab for _, lab in pairs])}


def _find_by_stem(folder: Optional[Path], stem: str, exts: Iterable[str]) -> Optional[Path]:
    if folder is None:
        return None
    for ext in exts:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


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
        self.images = _list_images(self.image_dir)
        if not self.images:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTS)}) in {self.image_dir}.")
        self.crops: list[Path] = []
        missing = []
        for img in self.images:
            crop = _find_by_stem(self.crop_dir, img.stem, IMAGE_EXTS)
            if crop is None:
                missing.append(img.stem)
            else:
                self.crops.append(crop)
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) have no 112x112 ArcFace-aligned crop with the same file name in {self.crop_dir} "
                f"(first: {missing[0]}). Make the crops with the face-analysis step, one per training image."
            )
        self.masks = [_find_by_stem(self.mask_dir, p.stem, IMAGE_EXTS + (".npy",)) for p in self.images]
        self.expressions = [_find_by_stem(self.expression_dir, p.stem, (".npy",)) for p in self.images]
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
            m = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
        if m.ndim != 2:
            raise ValueError(f"Mask {path} must be a single-channel image or a 2-D array.")
        m = (m >= 0.5).float()[None, None]
        return F.interpolate(m, size=(self.resolution, self.resolution), mode="nearest")[0]

    def _expression(self, index: int) -> tuple[torch.Tensor, bool]:
        path = self.expressions[index]
        if path is None:
            return torch.zeros(EXPRESSION_DIM), False
        e = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
        if e.shape[0] != EXPRESSION_DIM or not np.isfinite(e).all():
            raise ValueError(f"Expression file {path} must hold {EXPRESSION_DIM} finite coefficients, got shape {e.shape}.")
        return torch.from_numpy(e), True

    def get(self, index: int, flip: bool = False) -> dict[str, Any]:
        img = load_rgb(self.images[index], self.resolution)
        crop = load_rgb(self.crops[index], self.crop_size)
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


class StepBatches:
    """Deterministic batches: step -> (indices, flips) for this process, from a per-epoch permutation."""

    def __init__(self, n: int, batch_size: int, seed: int, flip: bool = True, rank: int = 0, world: int = 1):
        global_batch = batch_size * world
        if n < global_batch:
            raise ValueError(
                f"The dataset has {n} images, fewer than one batch ({batch_size} x {world} processes). Lower --batch-size."
            )
        self.n, self.batch_size, self.seed, self.flip, self.rank, self.world = n, batch_size, seed, flip, rank, world
        self.per_epoch = n // global_batch  # drop the last partial batch

    def __call__(self, step: int) -> tuple[list[int], list[bool]]:
        epoch, k = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        flips = torch.rand(self.n, generator=g) < 0.5
        gb = self.batch_size * self.world
        chunk = perm[k * gb : (k + 1) * gb][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return chunk.tolist(), [bool(flips[i]) and self.flip for i in chunk.tolist()]


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine to zero. A pure function of step, so resume needs no scheduler state."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, total - warmup)
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return base_lr


# --- run state ------------------------------------------------------------------------------------------------

_CKPT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _CKPT_RE.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(_CKPT_RE.match(p.name).group(1)), default=None)


def resolve_resume(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.info("No checkpoint in %s yet; starting from step 0.", output_dir / "checkpoints")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no state.json). Use --resume latest or a step-* folder.")
    return path


def _optimizer_to_flat(opt_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, state in opt_sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_run_state(
    folder: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    is_main: bool = True,
    scaler: Any = None,
    extra: Optional[dict] = None,
    keep: int = 2,
) -> None:
    """Write ``folder`` (weights + optimizer from the main process, RNG per process) and prune old checkpoints.

    ``state.json`` is written last: a folder without it is an interrupted save and is ignored by ``--resume latest``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng.cuda.{i}"] = s
    atomic_save_safetensors(rng, folder / f"rng_{rank}.safetensors")
    if not is_main:
        return
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_tensors, opt_info = _optimizer_to_flat(optimizer.state_dict())
    tensors.update(opt_tensors)
    atomic_save_safetensors(tensors, folder / "state.safetensors", {"optimizer": json.dumps(opt_info)})
    info = {"step": step, "scaler": scaler.state_dict() if scaler is not None else None, **(extra or {})}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(folder / "state.json")
    ckpts = sorted(
        (p for p in folder.parent.iterdir() if _CKPT_RE.match(p.name)), key=lambda p: int(_CKPT_RE.match(p.name).group(1))
    )
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_run_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    scaler: Any = None,
) -> dict:
    """Restore what :func:`save_run_state` wrote; returns the state.json contents (``step`` etc.)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    info = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    with safe_open(str(folder / "state.safetensors"), "pt") as f:
        opt_info = json.loads(f.metadata()["optimizer"])
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    optimizer.load_state_dict(_optimizer_from_flat(tensors, opt_info))
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    rng_file = folder / f"rng_{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["rng.torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    else:
        log.warning("%s has no RNG state for process %d; randomness after resume will differ.", folder, rank)
    return info


def append_log(output_dir: Path, record: dict) -> None:
    with open(output_dir / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(output_dir: Path, step: int) -> None:
    """Drop log records after ``step`` (steps an interrupted run did after its last checkpoint)."""
    records = [r for r in read_log(output_dir) if r.get("step", 0) <= step]
    path = Path(output_dir) / "train_log.jsonl"
    if path.is_file():
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
