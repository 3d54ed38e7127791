"""5-point similarity alignment and the face crops the methods need.

All transforms are 2×3 matrices that map SOURCE pixel coordinates to CROP pixel coordinates, with pixel
centres at integer coordinates (the OpenCV convention, so crops agree with insightface's ``norm_crop``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

# The standard ArcFace 112×112 template (insightface ``arcface_dst``), landmark order as in types.py.
ARCFACE_TEMPLATE_112 = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float64,
)


def estimate_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping src→dst.

    Umeyama's closed form; src, dst are (N, 2). Returns a float64 (2, 3) matrix.
    """
    src = src.to(torch.float64)
    dst = dst.to(torch.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_s, dst - mu_d
    cov = dst_c.T @ src_c / src.shape[0]
    u, s, vt = torch.linalg.svd(cov)
    d = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:  # reflection: flip the weakest axis
        d[1] = -1.0
    rot = u @ torch.diag(d) @ vt
    var_s = (src_c**2).sum(1).mean()
    scale = (s * d).sum() / var_s
    trans = mu_d - scale * rot @ mu_s
    return torch.cat([scale * rot, trans[:, None]], dim=1)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    full = torch.eye(3, dtype=torch.float64)
    full[:2] = m.to(torch.float64)
    return torch.linalg.inv(full)[:2]


def transform_points(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    m = m.to(torch.float64)
    return (pts.to(torch.float64) @ m[:, :2].T + m[:, 2]).to(pts.dtype)


def template_for(size: int) -> torch.Tensor:
    """The ArcFace template scaled to a square crop of ``size`` (insightface's ``norm_crop`` rule)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 112.0)
    # insightface's rule for 128-multiples: scale by size/128 and shift x by 8·ratio
    ratio = size / 128.0
    return ARCFACE_TEMPLATE_112 * ratio + torch.tensor([8.0 * ratio, 0.0], dtype=torch.float64)


def arcface_matrix(landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    return estimate_similarity(landmarks, template_for(size))


def ffhq_matrix(landmarks: torch.Tensor, size: int = 512) -> torch.Tensor:
    """FFHQ-style crop (the dataset's eye/mouth quad rule) from 5 points.

    The quad is centred slightly below the eyes, oriented by the eye line and eye-to-mouth vector, and
    sized to the larger of 2× eye distance and 1.8× eye-to-mouth distance.
    """
    lm = landmarks.to(torch.float64)
    eye_l, eye_r = lm[0], lm[1]
    mouth = (lm[3] + lm[4]) / 2
    eye_avg = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = mouth - eye_avg
    x = eye_to_eye - torch.stack([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / torch.linalg.norm(x)
    x = x * max(float(torch.linalg.norm(eye_to_eye)) * 2.0, float(torch.linalg.norm(eye_to_mouth)) * 1.8)
    y = torch.stack([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    quad = torch.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    s = float(size)
    corners = torch.tensor([[0.0, 0.0], [0.0, s], [s, s], [s, 0.0]], dtype=torch.float64) - 0.5
    return estimate_similarity(quad, corners)


def _source_window(inv: torch.Tensor, size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixel window (x0, y0, x1, y1), end-exclusive, of the source that a crop of ``size`` reads, plus a 1-px
    margin for the bilinear taps; None when the crop lies wholly outside the image."""
    corners = torch.tensor([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]], dtype=torch.float64)
    src = corners @ inv[:, :2].T + inv[:, 2]
    x0 = max(0, math.floor(float(src[:, 0].min())) - 1)
    y0 = max(0, math.floor(float(src[:, 1].min())) - 1)
    x1 = min(width, math.ceil(float(src[:, 0].max())) + 2)
    y1 = min(height, math.ceil(float(src[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def warp_affine(image: torch.Tensor, m: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Warp an (H, W, C) image with source->crop matrix ``m`` into a (size, size, C) crop, values clamped to [0, 1].

    Bilinear, zero border (as cv2.warpAffine with BORDER_CONSTANT). One affine sample per crop, read straight from
    the source without copying it: the cost follows the crop, not the photo. When the
    crop shrinks the face by more than 2x, each crop pixel averages k x k bilinear samples (k = ceil(0.5 / scale),
    at most 2 source pixels apart) so small crops of big photos do not alias.
    """
    m = m.to(torch.float64)
    h, w, c = image.shape
    inv = invert_affine(m)  # 2x3 crop -> source; only the matrix is float64, the sampling grid is float32
    window = _source_window(inv, size, h, w)
    if window is None:
        return image.new_zeros(size, size, c)
    # grid_sample reads the (H, W, C) image through an NCHW view: no copy, only the sampled pixels are touched
    src = image.permute(2, 0, 1)[None]
    if src.dtype != torch.float32:
        x0, y0, x1, y1 = window  # other dtypes: convert only the window the crop covers
        src = src[:, :, y0:y1, x0:x1].to(torch.float32)
    else:
        x0, y0 = 0, 0
    rh, rw = src.shape[-2:]
    scale = math.sqrt(abs(float(torch.det(m[:, :2]))))
    k = max(1, math.ceil(0.5 / scale)) if antialias and scale < 0.5 else 1
    # sample positions in crop pixels: k per pixel, centred in the pixel's cell
    t = (torch.arange(size * k, dtype=torch.float32, device=image.device) + 0.5) / k - 0.5
    a = inv.to(torch.float32).to(image.device)
    # align_corners=True: -1 and +1 are the centres of the first and last pixels
    gx = (t[None, :] * a[0, 0] + t[:, None] * a[0, 1] + (a[0, 2] - x0)) * (2.0 / max(rw - 1, 1)) - 1
    gy = (t[None, :] * a[1, 0] + t[:, None] * a[1, 1] + (a[1, 2] - y0)) * (2.0 / max(rh - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if k > 1:
        out = F.avg_pool2d(out, k)
    return out[0].permute(1, 2, 0).clamp(0, 1).to(image.dtype if image.is_floating_point() else torch.float32)


CROP_SIZES = {"arcface_112": 112, "clip_224": 224, "ffhq_512": 512}


def crop_matrix(kind: str, landmarks: torch.Tensor) -> torch.Tensor:
    if kind == "arcface_112":
        return arcface_matrix(landmarks, 112)
    if kind == "clip_224":
        return arcface_matrix(landmarks, 224)
    if kind == "ffhq_512":
        return ffhq_matrix(landmarks, 512)
    raise ValueError(f"Unknown crop kind {kind!r}; choose one of {sorted(CROP_SIZES)}.")


def crop_face(image: torch.Tensor, landmarks: torch.Tensor, kind: str) -> torch.Tensor:
    return warp_affine(image, crop_matrix(kind, landmarks), CROP_SIZES[kind])


class LazyCrops(Mapping[str, torch.Tensor]):
    """One face's aligned crops by kind, each sampled from the photo the first time it is read, then kept.

    Detect Faces offers every kind, but a graph reads one or two of them (ArcFace for identity, FFHQ for parsing
    masks, CLIP for InstantBooth); the FFHQ 512 crop alone is most of the alignment cost on a group photo. The
    photo is the FaceSet's own image tensor, so holding it costs nothing extra.
    """

    def __init__(self, image: torch.Tensor, landmarks: torch.Tensor, kinds: Sequence[str]) -> None:
        unknown = [k for k in kinds if k not in CROP_SIZES]
        if unknown:
            raise ValueError(f"Unknown crop kind(s) {unknown}; choose from {sorted(CROP_SIZES)}.")
        self._image: torch.Tensor | None = image
        self._landmarks = landmarks
        self._kinds = tuple(kinds)
        self._sampled: dict[str, torch.Tensor] = {}

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in self._kinds:
            raise KeyError(kind)
        crop = self._sampled.get(kind)
        if crop is None:
            crop = warp_affine(self._image, crop_matrix(kind, self._landmarks), CROP_SIZES[kind])
            self._sampled[kind] = crop
            if len(self._sampled) == len(self._kinds):
                self._image = None  # every kind sampled: the photo is no longer needed here
        return crop

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def __repr__(self) -> str:
        return f"LazyCrops({list(self._kinds)}, sampled={list(self._sampled)})"
