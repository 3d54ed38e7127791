"""Face-region masks in source-image coordinates.

With a face-parsing model the mask comes from its segmentation of the FFHQ crop, warped back. Without one,
a face-shaped hull is placed with the 5-point alignment: an ellipse in the ArcFace crop frame that covers
forehead to chin, mapped back to the image. The hull is coarser but needs no extra model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .align import arcface_matrix, ffhq_matrix, invert_affine, transform_points
from .types import FaceParser

# Face oval in the 112×112 ArcFace frame: centred between the eyes and the mouth, reaching the hairline
# and just below the chin.
_OVAL_CENTER = (56.0, 62.0)
_OVAL_AXES = (40.0, 54.0)
_OVAL_POINTS = 48


def face_oval_112() -> torch.Tensor:
    angles = torch.arange(_OVAL_POINTS, dtype=torch.float64) * (2 * math.pi / _OVAL_POINTS)
    return torch.stack(
        [_OVAL_CENTER[0] + _OVAL_AXES[0] * torch.cos(angles), _OVAL_CENTER[1] + _OVAL_AXES[1] * torch.sin(angles)],
        dim=1,
    )


def landmark_hull_mask(landmarks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) float mask of the face oval placed by the landmarks."""
    to_image = invert_affine(arcface_matrix(landmarks, 112))
    polygon = transform_points(to_image, face_oval_112())
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in polygon.tolist()], fill=255)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(height, width).float() / 255.0


def warp_mask_to_image(mask_crop: torch.Tensor, crop_to_image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Warp a (S, S) crop-space mask back into an (H, W) image-space mask (zeros outside the crop)."""
    s = mask_crop.shape[0]
    image_to_crop = invert_affine(crop_to_image)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    pts = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    src = pts @ image_to_crop[:, :2].T + image_to_crop[:, 2]
    grid = (src * 2 / max(s - 1, 1) - 1).reshape(1, height, width, 2).to(torch.float32)
    out = F.grid_sample(mask_crop[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].clamp(0, 1)


def face_mask(
    image: torch.Tensor, landmarks: torch.Tensor, parser: Optional[FaceParser] = None, ffhq_crop: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mask of one face in ``image`` (H, W, 3): parsing model when given, landmark hull otherwise."""
    h, w = image.shape[:2]
    if parser is None:
        return landmark_hull_mask(landmarks, h, w)
    if ffhq_crop is None:
        from .align import warp_affine

        ffhq_crop = warp_affine(image, ffhq_matrix(landmarks, 512), 512)
    crop_mask = parser.face_mask(ffhq_crop)
    return warp_mask_to_image(crop_mask, invert_affine(ffhq_matrix(landmarks, 512)), h, w)
