"""Reference-image preprocessing (paper Sec. 3.2, eq. 1): crop the object, mask out its background, and in
training only, augment heavily. Also the CLIP pixel preprocessing, written once so that training (transformers
CLIP) feeds the backbone exactly what ComfyUI's CLIP_VISION ``encode_image`` does at inference.

Images follow the pack's convention: float RGB in [0, 1], (H, W, 3) or (N, H, W, 3); masks (H, W) in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..face.align import CROP_SIZES, crop_matrix, warp_affine
from ..face.types import FaceSet

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_SIZE = 224
FACE_CROP = "clip_224"  # the ArcFace-aligned 224 px crop: the face fills the frame, as an object crop should


class ReferenceError(ValueError):
    """The reference images or masks cannot be used as given."""


def _resize(img_chw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(img_chw.shape[-2:]) == tuple(size):
        return img_chw
    return F.interpolate(img_chw, size=size, mode="bicubic", antialias=True, align_corners=False)


def _mask_like(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    mask = mask.float()
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ReferenceError(f"A reference mask must be (H, W); got {tuple(mask.shape)}.")
    if mask.shape != (h, w):
        mask = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return mask.clamp(0, 1)


def square_box(mask: torch.Tensor, margin: float = 0.1) -> tuple[int, int, int]:
    """(x0, y0, side) of the square around the mask's object (mask > 0.5), grown by ``margin`` per side."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if ys.numel() == 0:
        raise ReferenceError(
            "A reference mask is empty (nothing above 0.5). Connect a mask that covers the subject, e.g. Detect Faces' "
            "face_mask; a Load Image mask of a picture without alpha is all zeros."
        )
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    side = max(x1 - x0, y1 - y0)
    side = max(1, int(round(side * (1 + 2 * margin))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2)), side


def masked_object_crop(
    image: torch.Tensor, mask: Optional[torch.Tensor] = None, size: int = REFERENCE_SIZE, margin: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_s = crop(x) * crop(m) (eq. 1): the object's square crop with a black background, resized to ``size``.

    Without a mask the whole image is the object: its centre square. Returns (crop (size, size, 3), mask (size, size)).
    """
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ReferenceError(f"A reference image must be (H, W, 3); got {tuple(image.shape)}.")
    img = image[..., :3].float()
    h, w = img.shape[:2]
    if mask is None:
        m = torch.ones(h, w)
        side = min(h, w)
        x0, y0 = (w - side) // 2, (h - side) // 2
    else:
        m = _mask_like(mask.to(img.device), h, w)
        x0, y0, side = square_box(m, margin)
    # Zero padding where the square leaves the image: outside the picture is background too.
    pad = (max(0, -x0), max(0, x0 + side - w), max(0, -y0), max(0, y0 + side - h))
    chw = torch.cat([img.permute(2, 0, 1) * m.to(img.device), m.to(img.device)[None]], dim=0)[None]
    chw = F.pad(chw, (pad[0], pad[1], pad[2], pad[3]))
    x0p, y0p = x0 + pad[0], y0 + pad[2]
    chw = chw[..., y0p : y0p + side, x0p : x0p + side]
    chw = _resize(chw, (size, size)).clamp(0, 1)[0]
    crop, crop_mask = chw[:3], chw[3]
    # bicubic ringing leaves faint values around the object; the background must stay black
    keep = (crop_mask > 0.02).float()
    return (crop * keep).permute(1, 2, 0), crop_mask * keep


def references_from_images(
    images: torch.Tensor, masks: Optional[torch.Tensor] = None, size: int = REFERENCE_SIZE, margin: float = 0.1
) -> torch.Tensor:
    """A batch of reference photos (N, H, W, C) (+ masks (N or 1, h, w)) -> (N, size, size, 3) masked crops."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ReferenceError(f"Expected a batch of reference images (N, H, W, 3); got {tuple(images.shape)}.")
    if masks is not None:
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape[0] not in (1, images.shape[0]):
            raise ReferenceError(f"{masks.shape[0]} masks for {images.shape[0]} reference images: give one mask, or one per image.")
    out = []
    for i in range(images.shape[0]):
        m = None if masks is None else masks[i if masks.shape[0] > 1 else 0]
        out.append(masked_object_crop(images[i], m, size, margin)[0])
    return torch.stack(out)


def references_from_faces(faces: FaceSet, size: int = REFERENCE_SIZE, kind: str = FACE_CROP) -> torch.Tensor:
    """Every face of a FaceSet -> its aligned crop with the face mask applied, (N, size, size, 3)."""
    if not faces.faces:
        raise ReferenceError("The FaceSet has no faces. Check the Detect Faces debug output, or give reference images instead.")
    if kind not in CROP_SIZES:
        raise ReferenceError(f"Unknown crop kind {kind!r}; choose one of {sorted(CROP_SIZES)}.")
    s = CROP_SIZES[kind]
    out = []
    for f in faces.faces:
        m = crop_matrix(kind, f.landmarks)
        crop = f.crops.get(kind)
        if crop is None:
            crop = warp_affine(faces.images[f.image_index], m, s)
        mask = warp_affine(f.mask[..., None].float(), m, s)[..., 0].clamp(0, 1)
        masked = (crop.float() * mask[..., None]).permute(2, 0, 1)[None]
        out.append(_resize(masked, (size, size)).clamp(0, 1)[0].permute(1, 2, 0))
    return torch.stack(out)


def clip_preprocess(
    images: torch.Tensor, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, crop: bool = True
) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, size, size) normalised CLIP input, by ComfyUI's CLIP_VISION rule:
    bicubic antialiased resize of the short side to ``size`` and a centre crop (``crop``; else a plain resize to
    size x size), quantisation to 8-bit levels, then mean/std normalisation."""
    x = images[..., :3].float().movedim(-1, 1)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if crop:
            scale = size / min(h, w)
            x = F.interpolate(x, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True)
            top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
            x = x[:, :, top : top + size, left : left + size]
        else:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# --- training-time augmentation A (paper Sec. 3.3: "heavy augmentation"; none at inference) ---------------------


@dataclass(frozen=True)  # frozen: safe as a default argument
class AugmentConfig:
    flip_p: float = 0.5
    rotate_deg: float = 20.0
    scale: tuple[float, float] = (0.7, 1.15)
    translate: float = 0.12  # fraction of the side
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05  # fraction of a full turn
    grayscale_p: float = 0.1
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.5)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of :class:`AugmentConfig`: what :func:`apply_augment` does to one reference."""

    flip: bool
    angle_deg: float  # clockwise, about the centre (torchvision's affine)
    scale: float
    translate: tuple[float, float]  # (x, y) as fractions of the width and height
    brightness: float  # factors: 1 leaves the image unchanged
    contrast: float
    saturation: float
    hue: float  # fraction of a full turn
    grayscale: bool
    blur_sigma: Optional[float]  # None: no blur


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def draw_augment_params(generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> AugmentParams:
    """Every random number of one augmentation, from ``generator`` alone (a resumed run redraws the same ones)."""
    g = generator
    flip = float(torch.rand((), generator=g)) < cfg.flip_p
    angle = _u(g, -cfg.rotate_deg, cfg.rotate_deg)
    scale = _u(g, *cfg.scale)
    translate = (_u(g, -cfg.translate, cfg.translate), _u(g, -cfg.translate, cfg.translate))
    colour = [_u(g, 1 - r, 1 + r) for r in (cfg.brightness, cfg.contrast, cfg.saturation)]
    hue = _u(g, -cfg.hue, cfg.hue)
    grayscale = float(torch.rand((), generator=g)) < cfg.grayscale_p
    blur = _u(g, *cfg.blur_sigma) if float(torch.rand((), generator=g)) < cfg.blur_p else None
    return AugmentParams(flip, angle, scale, translate, *colour, hue, grayscale, blur)


def apply_augment(image: torch.Tensor, mask: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """One masked crop (S, S, 3) with its mask (S, S), augmented as ``p`` says (torchvision.transforms.v2):
    flip, affine (bilinear, zero fill; image and mask move together), brightness, contrast, saturation, hue,
    grayscale, Gaussian blur (kernel radius ceil(2 sigma), reflected border). Colour steps clamp to [0, 1] as
    torchvision's do. Contrast pivots on the object's mean, not the whole crop's (torchvision's
    ``adjust_contrast``), which the black background would pull down. The background stays black."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = torch.cat([image.permute(2, 0, 1).float(), mask[None].float()], dim=0)
    if p.flip:
        x = TF.horizontal_flip(x)
    h, w = x.shape[-2:]
    x = TF.affine(x, angle=p.angle_deg, translate=[p.translate[0] * w, p.translate[1] * h], scale=p.scale,
                  shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
    rgb, m = x[:3], x[3:].clamp(0, 1)
    rgb = TF.adjust_brightness(rgb, p.brightness)
    mean = (rgb * m).sum() / (3 * m.sum()).clamp_min(1e-6)
    rgb = ((rgb - mean) * p.contrast + mean).clamp(0, 1)
    rgb = TF.adjust_saturation(rgb, p.saturation)
    rgb = TF.adjust_hue(rgb, p.hue)
    if p.grayscale:
        rgb = TF.rgb_to_grayscale(rgb, num_output_channels=3)
    if p.blur_sigma is not None:
        k = 2 * max(1, math.ceil(2 * p.blur_sigma)) + 1
        rgb = TF.gaussian_blur(rgb, [k, k], [p.blur_sigma, p.blur_sigma])
    # colour changes lift the background; the object's support (not its soft edge, already applied) cuts it again
    return (rgb.clamp(0, 1) * (m > 0.02)).permute(1, 2, 0)


def augment_reference(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """One masked crop (S, S, 3) with its mask (S, S) -> a randomly flipped, rotated, scaled, shifted,
    colour-jittered, sometimes grey or blurred version; the background stays black."""
    return apply_augment(image, mask, draw_augment_params(generator, cfg))
