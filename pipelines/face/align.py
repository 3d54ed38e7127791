"""5-point similarity alignment and the face crops the methods need.

All transforms are 2×3 matrices that map SOURCE pixel coordinates to CROP pixel coordinates, with pixel
centres at integer coordinates (the OpenCV convention, so crops agree with insightface's ``norm_crop``).
"""
from __future__ import annotations

import math

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


def warp_affine(image: torch.Tensor, m: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Warp an (H, W, C) image with source→crop matrix ``m`` into a (size, size, C) crop.

    Bilinear, zero border. When the crop shrinks the face by more than 2×, the image is first reduced with
    an antialiased resize so small crops of big photos do not alias.
    """
    img = image.permute(2, 0, 1)[None].to(torch.float32)
    m = m.to(torch.float64).clone()
    scale = math.sqrt(abs(float(torch.det(m[:, :2]))))
    if antialias and scale < 0.5:
        factor = scale * 2.0  # keep about 2 source pixels per crop pixel
        h, w = img.shape[-2:]
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        # source coords change by the actual per-axis factor (pixel centres: x' = (x + 0.5)·f − 0.5)
        fx, fy = nw / w, nh / h
        to_small = torch.tensor([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5]], dtype=torch.float64)
        m = m @ torch.linalg.inv(torch.cat([to_small, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))
    h, w = img.shape[-2:]
    inv = invert_affine(m)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    grid_pts = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    src = grid_pts @ inv[:, :2].T + inv[:, 2]
    # align_corners=True: -1 and +1 are the centres of the first and last pixels (integer coordinates)
    gx = src[:, 0] * 2 / max(w - 1, 1) - 1
    gy = src[:, 1] * 2 / max(h - 1, 1) - 1
    grid = torch.stack([gx, gy], dim=-1).reshape(1, size, size, 2).to(img.dtype).to(img.device)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).to(image.dtype)


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
