"""Reading training folders: image listing, same-stem lookup (crops, masks, references, expressions), RGB files."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def find_by_stem(folder: Path | None, stem: str, exts: Iterable[str] = IMAGE_EXTS) -> Path | None:
    """``folder/<stem><ext>`` for the first ``ext`` that exists (None without a folder or a match)."""
    if folder is None:
        return None
    for ext in exts:
        p = Path(folder) / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def read_rgb(path: Path, size: int | None = None) -> torch.Tensor:
    """Image file -> (H, W, 3) float in [0, 1]; resized (bicubic) to (size, size) when ``size`` is given."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)


def read_gray(path: Path) -> torch.Tensor:
    """Single-channel image file -> (H, W) float in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
