"""Face detector / recognizer weight files in the official layouts, for tests and demo runs.

* ``write_random_arcface``: an arcface_torch IResNet ``backbone.pth`` (plain state-dict pickle, as the
  official files are) or ``.safetensors`` with seeded random weights.
* ``copy_or_write_mtcnn``: facenet-pytorch's real ``pnet.pt``/``rnet.pt``/``onet.pt`` when that package is
  installed (a test aid; the files ship inside its wheel), otherwise random P/R/O-Net weights with the
  same keys.

Random weights mean nothing: they exercise loading, shapes and plumbing. Convolutions get He-scaled
weights and BatchNorm layers random affine parameters and running statistics, so eval-mode BatchNorm
matters in every comparison.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from . import save_official_pickle
from ..pipelines.face.arcface import IResNet, IResNetConfig
from ..pipelines.face.mtcnn import NET_NAMES, WEIGHT_SUFFIXES, ONet, PNet, RNet
from ..utils.files import atomic_save_safetensors

PathLike = Union[str, os.PathLike]


def _randomize(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        if not ref.is_floating_point():  # num_batches_tracked
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype)
        elif ref.dim() in (2, 4):  # conv / linear: He normal keeps activations in range through depth
            fan_in = ref[0].numel()
            out[key] = torch.randn(ref.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(ref.shape, generator=gen)
        elif "prelu" in key:
            out[key] = 0.25 * torch.rand(ref.shape, generator=gen)
        elif key.endswith(".weight"):  # BatchNorm scale
            out[key] = 0.5 + 0.5 * torch.rand(ref.shape, generator=gen)
        else:  # biases, BatchNorm shift and running mean
            out[key] = 0.1 * torch.randn(ref.shape, generator=gen)
    return out


def _write(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return atomic_save_safetensors(state, path, metadata)
    if suffix not in (".pth", ".pt"):
        raise ValueError(f"Give the file a .pth, .pt or .safetensors suffix, not {path.name!r}.")
    return save_official_pickle(state, path)


# ----------------------------------------------------------------------------------------------
# ArcFace
# ----------------------------------------------------------------------------------------------


def random_arcface_state_dict(
    depth: int = 18,
    seed: int = 0,
    widths: Optional[Sequence[int]] = None,
    num_features: int = 512,
) -> dict[str, torch.Tensor]:
    """arcface_torch IResNet state dict (official key names) with seeded random values.

    ``widths`` other than the official (64, 128, 256, 512) give tiny models with the same key layout,
    for fast tests; the stem width follows widths[0].
    """
    kwargs = {"num_features": num_features}
    if widths is not None:
        kwargs.update(widths=tuple(int(w) for w in widths), stem_width=int(widths[0]))
    model = IResNet(IResNetConfig.for_depth(depth, **kwargs))
    return _randomize(model.state_dict(), torch.Generator().manual_seed(seed))


def write_random_arcface(
    path: PathLike,
    depth: int = 18,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    widths: Optional[Sequence[int]] = None,
    num_features: int = 512,
) -> Path:
    """Write a random IResNet backbone to ``path`` (.pth/.pt: torch.save of a plain state dict, the
    official format; .safetensors: atomic safetensors). fp16 by default to halve the size (r18: about
    48 MB instead of 96 MB); the loader computes in float32 either way."""
    state = random_arcface_state_dict(depth, seed, widths, num_features)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    meta = {"model": f"arcface_iresnet{depth}", "random_seed": str(seed), "weights": "random"}
    return _write(state, Path(path), meta)


# ----------------------------------------------------------------------------------------------
# MTCNN
# ----------------------------------------------------------------------------------------------


def facenet_pytorch_data_dir() -> Optional[Path]:
    """Folder holding facenet-pytorch's pnet/rnet/onet.pt, found without importing the package."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if all((data / f"{n}.pt").is_file() for n in NET_NAMES):
            return data
    return None


def write_random_mtcnn(folder: PathLike, seed: int = 0) -> dict[str, Path]:
    """Random-weight pnet/rnet/onet.safetensors with facenet-pytorch's keys."""
    folder = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    paths = {}
    for name, cls in zip(NET_NAMES, (PNet, RNet, ONet)):
        _remove_other_formats(folder, name, keep=".safetensors")
        state = _randomize(cls().state_dict(), gen)
        paths[name] = atomic_save_safetensors(
            state, folder / f"{name}.safetensors", {"model": f"mtcnn_{name}", "random_seed": str(seed), "weights": "random"}
        )
    return paths


def _remove_other_formats(folder: Path, name: str, keep: str) -> None:
    # The loader refuses a folder with two versions of one net, so replace rather than add.
    for suffix in WEIGHT_SUFFIXES:
        if suffix != keep and (folder / f"{name}{suffix}").is_file():
            (folder / f"{name}{suffix}").unlink()


def copy_or_write_mtcnn(folder: PathLike, seed: int = 0, prefer_real: bool = True) -> dict[str, Path]:
    """Put MTCNN weights into ``folder``: the real facenet-pytorch files when that package is installed
    (and ``prefer_real``), random ones otherwise. Returns {"pnet": path, "rnet": path, "onet": path}."""
    folder = Path(folder)
    data = facenet_pytorch_data_dir() if prefer_real else None
    if data is None:
        return write_random_mtcnn(folder, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in NET_NAMES:
        _remove_other_formats(folder, name, keep=".pt")
        target = folder / f"{name}.pt"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            shutil.copyfile(data / f"{name}.pt", tmp)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        paths[name] = target
    return paths


# ----------------------------------------------------------------------------------------------
# RetinaFace (facexlib)
# ----------------------------------------------------------------------------------------------


def random_retinaface_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """facexlib RetinaFace-ResNet50 state dict (the keys of ``detection_Resnet50_Final.pth``), seeded random values."""
    from ..pipelines.face.retinaface import build_retinaface

    state = _randomize(build_retinaface(meta=True).state_dict(), torch.Generator().manual_seed(seed))
    # Box and landmark heads regress log-sizes that go through exp(): at He scale a random ResNet-50 + FPN would
    # give boxes of 1e30 px, and every score would saturate at 1.0. Small heads keep boxes near their priors and
    # scores spread around 0.5 (no ties), like a trained detector's outputs in range.
    for key in state:
        if key.startswith(("BboxHead", "LandmarkHead", "ClassHead")):
            state[key] = state[key] * 0.01
    return state


def write_random_retinaface(path: PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random RetinaFace-ResNet50 in facexlib's layout (.pth pickle as the official file, or .safetensors)."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in random_retinaface_state_dict(seed).items()}
    return _write(state, Path(path), {"model": "retinaface_resnet50", "random_seed": str(seed), "weights": "random"})
