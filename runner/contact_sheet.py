"""One PNG that shows every output of a run: a grid of labelled tiles."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (32, 32, 32)
LABEL_COLOR = (235, 235, 235)
TILE_BACKGROUND = (0, 0, 0)


def _fit(image: Image.Image, tile: int) -> Image.Image:
    """Scale to fit a tile x tile square, keeping the aspect ratio; small images are enlarged (nearest, so
    64x64 test outputs stay crisp)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = tile / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    return image.resize(size, resample)


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def make_contact_sheet(
    items: Sequence[tuple[str, Image.Image]],
    *,
    tile: int = 256,
    columns: int | None = None,
    padding: int = 8,
    label_height: int = 22,
    title: str | None = None,
) -> Image.Image:
    """A grid of ``tile``-sized cells, each an image centred on black with its label below.

    ``columns`` defaults to a near-square grid (at most 6 wide). A ``title`` adds a header line.
    """
    if not items:
        raise ValueError("make_contact_sheet needs at least one image")
    n = len(items)
    cols = columns or min(6, math.ceil(math.sqrt(n)))
    rows = (n + cols - 1) // cols
    header = label_height + padding if title else 0
    cell_w, cell_h = tile, tile + label_height
    width = padding + cols * (cell_w + padding)
    height = header + padding + rows * (cell_h + padding)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((padding, padding), _ellipsize(draw, title, font, width - 2 * padding), fill=LABEL_COLOR, font=font)
    for k, (label, image) in enumerate(items):
        r, c = divmod(k, cols)
        x0 = padding + c * (cell_w + padding)
        y0 = header + padding + r * (cell_h + padding)
        draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], fill=TILE_BACKGROUND)
        fitted = _fit(image, tile)
        sheet.paste(fitted, (x0 + (tile - fitted.width) // 2, y0 + (tile - fitted.height) // 2))
        draw.text((x0 + 2, y0 + tile + 4), _ellipsize(draw, str(label), font, tile - 4), fill=LABEL_COLOR, font=font)
    return sheet


def save_contact_sheet(items: Sequence[tuple[str, Image.Image]], path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_contact_sheet(items, **kwargs).save(path, format="PNG")
    return path
