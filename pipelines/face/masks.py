"""Face-region masks, built lazily at crop size and pasted into image coordinates only when asked for.

With a face-parsing model the mask is its segmentation of the FFHQ 512 crop. Without one, it is a face-shaped
hull: an ellipse in the ArcFace frame that covers forehead to chin, rasterised at ``HULL_SIZE`` in that frame.
Either way the mask lives in crop space with its crop->image placement; ``LazyMask.full`` (and ``Face.mask``)
warps it into a full image-size mask, reading only the image window the crop covers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .align import _source_window, arcface_matrix, ffhq_matrix, invert_affine, transform_points, warp_affine
from .types import FaceParser

# Face oval in the 112×112 ArcFace frame: centred between the eyes and the mouth, reaching the hairline
# and just below the chin.
_OVAL_CENTER = (56.0, 62.0)
_OVAL_AXES = (40.0, 54.0)
_OVAL_POINTS = 48
HULL_SIZE = 224  # the hull is drawn in the ArcFace frame scaled to this many pixels


def face_oval_112() -> torch.Tensor:
    angles = torch.arange(_OVAL_POINTS, dtype=torch.float64) * (2 * math.pi / _OVAL_POINTS)
    return torch.stack(
        [_OVAL_CENTER[0] + _OVAL_AXES[0] * torch.cos(angles), _OVAL_CENTER[1] + _OVAL_AXES[1] * torch.sin(angles)],
        dim=1,
    )


def _polygon_mask(polygon: torch.Tensor, height: int, width: int) -> torch.Tensor:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in polygon.tolist()], fill=255)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(height, width).float() / 255.0


def landmark_hull_mask(landmarks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) float mask of the face oval placed by the landmarks, drawn directly at image resolution."""
    to_image = invert_affine(arcface_matrix(landmarks, 112))
    return _polygon_mask(transform_points(to_image, face_oval_112()), height, width)


def hull_crop_mask(size: int = HULL_SIZE) -> torch.Tensor:
    """The face oval in the ArcFace frame of a ``size`` crop (the same for every face)."""
    return _polygon_mask(face_oval_112() * (size / 112.0), size, size)


def warp_mask_to_image(mask_crop: torch.Tensor, crop_to_image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Warp a (S, S) crop-space mask back into an (H, W) image-space mask (zeros outside the crop)."""
    out = torch.zeros(height, width)
    paste_mask(out, mask_crop, invert_affine(crop_to_image))
    return out


def paste_mask(canvas: torch.Tensor, mask_crop: torch.Tensor, image_to_crop: torch.Tensor) -> torch.Tensor:
    """Max-combine a (S, S) crop-space mask into an (H, W) image-space ``canvas`` in place.

    Only the canvas window the crop covers is computed (bilinear, one sample per image pixel).
    """
    height, width = canvas.shape
    s = mask_crop.shape[0]
    # the crop's footprint in the image: the crop-window helper with the crop->image matrix
    window = _source_window(invert_affine(image_to_crop), s, height, width)
    if window is None:
        return canvas
    x0, y0, x1, y1 = window
    a = image_to_crop.to(torch.float32)
    xs = torch.arange(x0, x1, dtype=torch.float32)
    ys = torch.arange(y0, y1, dtype=torch.float32)
    gx = (xs[None, :] * a[0, 0] + ys[:, None] * a[0, 1] + a[0, 2]) * (2.0 / max(s - 1, 1)) - 1
    gy = (xs[None, :] * a[1, 0] + ys[:, None] * a[1, 1] + a[1, 2]) * (2.0 / max(s - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)[None]
    part = F.grid_sample(mask_crop[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    region = canvas[y0:y1, x0:x1]
    torch.maximum(region, part.clamp(0, 1).to(canvas.dtype), out=region)
    return canvas


class LazyMask:
    """One face's mask: computed in crop space on first use, pasted into image space on request."""

    def __init__(
        self,
        image: torch.Tensor,
        landmarks: torch.Tensor,
        parser: Optional[FaceParser] = None,
        ffhq_crop: Optional[torch.Tensor | Mapping[str, torch.Tensor]] = None,
    ) -> None:
        """``ffhq_crop``: the face's FFHQ 512 crop, or its crops by kind (read only if the mask is built)."""
        self.height, self.width = int(image.shape[0]), int(image.shape[1])
        self._image = image if parser is not None and not torch.is_tensor(ffhq_crop) else None  # kept when needed later
        self._landmarks = landmarks
        self._parser = parser
        self._ffhq_crop = ffhq_crop if parser is not None else None
        self._crop: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def crop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask at crop size, image->crop matrix)."""
        if self._crop is None:
            if self._parser is None:
                self._crop = (hull_crop_mask(), arcface_matrix(self._landmarks, HULL_SIZE))
            else:
                m = ffhq_matrix(self._landmarks, 512)
                source = self._ffhq_crop
                crop = source.get("ffhq_512") if isinstance(source, Mapping) else source
                if crop is None:
                    crop = warp_affine(self._image, m, 512)
                self._crop = (self._parser.face_mask(crop).float().cpu(), m)
                self._image = self._ffhq_crop = None
        return self._crop

    def paste(self, canvas: torch.Tensor) -> torch.Tensor:
        mask, m = self.crop()
        return paste_mask(canvas, mask, m)

    def full(self) -> torch.Tensor:
        return self.paste(torch.zeros(self.height, self.width))


def face_mask(
    image: torch.Tensor, landmarks: torch.Tensor, parser: Optional[FaceParser] = None, ffhq_crop: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mask of one face in ``image`` (H, W, 3): parsing model when given, landmark hull otherwise."""
    return LazyMask(image, landmarks, parser, ffhq_crop).full()
