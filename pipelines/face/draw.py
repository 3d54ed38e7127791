"""Debug and annotation images (PIL drawing on CPU; nothing here affects results)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

from .types import Face

LANDMARK_COLOURS = [(255, 64, 64), (64, 160, 255), (64, 255, 64), (255, 200, 0), (255, 0, 255)]
BOX_COLOUR = (0, 255, 120)
MISSING_COLOUR = (255, 60, 60)


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def from_pil(img: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(img.height, img.width, 3).float() / 255.0


def _line_width(img: Image.Image) -> int:
    return max(1, round(max(img.size) / 256))


def draw_faces(
    image: torch.Tensor, faces: Sequence[Face], labels: Optional[Sequence[str]] = None, missing: bool = False
) -> Image.Image:
    """Boxes, 5 landmarks and a label per face on a copy of ``image``."""
    img = to_pil(image)
    draw = ImageDraw.Draw(img)
    lw = _line_width(img)
    for k, face in enumerate(faces):
        x1, y1, x2, y2 = face.box
        draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=lw)
        r = max(1.5, lw * 1.5)
        for (x, y), colour in zip(face.landmarks.tolist(), LANDMARK_COLOURS):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        text = labels[k] if labels is not None else f"#{k} {face.score:.2f}"
        draw.text((x1 + 2, max(0, y1 - 12)), text, fill=BOX_COLOUR)
    if missing:
        draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=MISSING_COLOUR, width=lw * 2)
        draw.text((4, 4), "no face", fill=MISSING_COLOUR)
    return img


def debug_image(image: torch.Tensor, faces: Sequence[Face], crop_kind: str = "arcface_112", missing: bool = False) -> torch.Tensor:
    """The annotated image with a strip of the aligned crops underneath; (H + strip, W, 3)."""
    annotated = draw_faces(image, faces, missing=missing)
    crops = [f.crops[crop_kind] for f in faces if crop_kind in f.crops]
    if not crops:
        return from_pil(annotated)
    w = annotated.width
    tile = max(32, min(w // max(1, len(crops)), annotated.height // 3, 224))
    strip = Image.new("RGB", (w, tile), (0, 0, 0))
    for k, crop in enumerate(crops):
        if (k + 1) * tile > w:
            break
        strip.paste(to_pil(crop).resize((tile, tile), Image.BILINEAR), (k * tile, 0))
    canvas = Image.new("RGB", (w, annotated.height + tile))
    canvas.paste(annotated, (0, 0))
    canvas.paste(strip, (0, annotated.height))
    return from_pil(canvas)


def pad_to_same_size(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (H_i, W_i, 3) images into one batch, padding with black to the largest size."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    out = torch.zeros(len(images), h, w, 3)
    for k, img in enumerate(images):
        out[k, : img.shape[0], : img.shape[1]] = img
    return out
