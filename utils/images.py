"""Reading photos from disk the one way FaceBooth does it."""
from __future__ import annotations

import os

import numpy as np
import torch


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """(H, W, 3) float32 RGB in [0, 1] (ComfyUI's IMAGE layout without the batch axis), EXIF orientation applied.

    Grayscale, palette and RGBA files are converted to RGB (alpha is dropped). Unreadable files raise a ValueError
    that names the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{os.fspath(path)} is not a readable image ({exc}). Use a JPEG, PNG or WebP photo.") from exc
