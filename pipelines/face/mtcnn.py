"""MTCNN face detector (P-Net, R-Net, O-Net) in plain torch: boxes, scores and 5 landmarks.

The three networks keep the parameter names of facenet-pytorch's ``pnet.pt`` / ``rnet.pt`` /
``onet.pt`` (which are the original Caffe MTCNN weights), so those files load unchanged. The
cascade follows the same numeric conventions as facenet-pytorch so that results agree to a
fraction of a pixel:

1. P-Net runs fully convolutionally on an image pyramid (scale 12/min_face_size, then x0.709 while
   the short side is still >= 12 px). Every 12x12 window (stride 2) above threshold 1 becomes a box;
   NMS (IoU 0.5) per scale, then NMS (IoU 0.7) over all scales, box regression, square boxes.
2. R-Net rescores 24x24 crops of those boxes: threshold 2, NMS (IoU 0.7), regression, square boxes.
3. O-Net rescores 48x48 crops: threshold 3, 5 landmarks, regression, NMS with the "Min" overlap
   (intersection over the smaller box, 0.7).

Crops are taken from the part of the box inside the image and stretched to the network size with
area ("adaptive average") resampling, as facenet-pytorch does; the image is fed as (x*255-127.5)/128.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...utils.files import load_state_dict_file
from ...utils.state_dict import load_strict
from .types import DetectedFace

logger = logging.getLogger(__name__)

NET_NAMES = ("pnet", "rnet", "onet")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


def _flatten_caffe(x: torch.Tensor) -> torch.Tensor:
    """Flatten (B, C, H, W) in (W, H, C) order: the converted Caffe dense weights expect it."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)  # face / not-face logits
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)  # box regression

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised -> regression (B, 4, h, w), face probability (B, h, w)."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        prob = torch.softmax(self.conv4_1(x), dim=1)[:, 1]
        return self.conv4_2(x), prob


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 24, 24) -> regression (N, 4), face probability (N,)."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_caffe(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output network on 48x48 crops: score, box regression and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)  # 5 x coordinates, then 5 y, relative to the box

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, 48, 48) -> regression (N, 4), landmarks (N, 10), face probability (N,)."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_caffe(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


# ----------------------------------------------------------------------------------------------
# Box helpers (boxes are (N, 4) float x1, y1, x2, y2 in pixels)
# ----------------------------------------------------------------------------------------------


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    threshold: float,
    mode: str = "union",
    block: int = 1024,
) -> torch.Tensor:
    """Greedy non-maximum suppression within each group (image); returns kept indices, best first.

    ``mode="union"``: IoU with widths x2-x1 (torchvision's convention). ``mode="min"``: intersection
    over the smaller box with widths x2-x1+1 (the MTCNN "Min" rule used after O-Net).
    Overlaps are computed a block of rows at a time (memory block x N) in numpy float32 (same
    arithmetic as torchvision); only the greedy pass is sequential. Runs on CPU: a GPU would pay a
    sync per kept box, and small torch ops cost far more per call than numpy ones.
    """
    device = boxes.device
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if mode not in ("union", "min"):
        raise ValueError(f"nms mode must be 'union' or 'min', got {mode!r}")
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    b = boxes.detach().float().cpu()[order].numpy()
    g = groups.cpu()[order].numpy()
    off = np.float32(1.0 if mode == "min" else 0.0)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + off) * (y2 - y1 + off)
    n = b.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        r, c = slice(start, stop), slice(start, n)
        w = np.maximum(np.minimum(x2[r, None], x2[None, c]) - np.maximum(x1[r, None], x1[None, c]) + off, 0)
        h = np.maximum(np.minimum(y2[r, None], y2[None, c]) - np.maximum(y1[r, None], y1[None, c]) + off, 0)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate boxes: NaN never suppresses
            if mode == "min":
                overlap = inter / np.minimum(area[r, None], area[None, c])
            else:
                overlap = inter / (area[r, None] + area[None, c] - inter)
        suppress = (overlap > threshold) & (g[r, None] == g[None, c])
        tail = removed[start:]  # a view: updates land in ``removed``
        for k in range(stop - start):
            if tail[k]:
                continue
            keep.append(start + k)
            tail |= suppress[k]
    return order[torch.tensor(keep, dtype=torch.long)].to(device)


def _regress(boxes: torch.Tensor, reg: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Shift box edges by regression offsets given in units of box width/height."""
    off = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + off
    h = boxes[:, 3] - boxes[:, 1] + off
    return boxes + reg * torch.stack([w, h, w, h], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (side = the longer edge)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _crop_windows(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Integer crop windows (x0, y0, x1, y1), end-exclusive, of the box part inside the image.

    MTCNN's 1-based heritage: the window starts one pixel before the truncated box corner.
    """
    t = boxes.trunc().long()
    x0 = t[:, 0].clamp(min=1) - 1
    y0 = t[:, 1].clamp(min=1) - 1
    x1 = t[:, 2].clamp(max=width)
    y1 = t[:, 3].clamp(max=height)
    return torch.stack([x0, y0, x1, y1], dim=1)


def crop_resize_area(images: torch.Tensor, image_index: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resample crops of (B, C, H, W) ``images`` to (N, C, size, size) float32.

    Each crop is ``F.interpolate(crop, (size, size), mode="area")`` (adaptive average pooling), as facenet-pytorch
    does; only the windows are read, never the whole image.
    """
    windows = windows.tolist()
    owners = image_index.tolist()
    # channels-last, as the nets run (see MTCNNDetector): the copy into it is then the only layout change
    out = torch.empty(len(windows), size, size, images.shape[1], dtype=torch.float32, device=images.device).permute(0, 3, 1, 2)
    for k, ((x0, y0, x1, y1), b) in enumerate(zip(windows, owners)):
        out[k] = F.adaptive_avg_pool2d(images[b, :, y0:y1, x0:x1].float(), size)
    return out


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which a 12-px P-Net window sees faces from min_face_size up to the short side."""
    m = 12.0 / min_face_size
    short = min(height, width) * m
    scales = []
    scale = m
    while short >= 12:  # repeated multiplication (not pow) keeps the exact float values
        scales.append(scale)
        scale *= factor
        short *= factor
    return scales


# ----------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------


@dataclass
class MTCNNConfig:
    min_face_size: float = 20.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    max_batch: int = 512  # crops per R-Net / O-Net forward, bounds peak memory
    # True (default): every pyramid level is resampled from the (detection-size) image, as facenet-pytorch does.
    # False: later levels from the first level, cheaper on big images, but the extra blur loses small faces
    # (1 of the 8 in insightface's t1.jpg); the analyzer's detection size cap bounds the image instead.
    exact_pyramid: bool = True

    def validate(self) -> None:
        if not self.min_face_size > 0:
            raise ValueError(f"min_face_size must be > 0 pixels, got {self.min_face_size}.")
        if len(self.thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be three probabilities in [0, 1], got {self.thresholds}.")
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}.")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}.")


def _as_rgb(image: torch.Tensor) -> torch.Tensor:
    """Accept (H, W), (H, W, 1|3|4) float in [0, 1] (or uint8) and return (H, W, 3) float."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"MTCNN expects a torch tensor (H, W, 3) in [0, 1], got {type(image).__name__}.")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() == 2:
        image = image[..., None]
    if image.dim() != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"MTCNN expects one image shaped (H, W, 3) with RGB channels last, got {tuple(image.shape)}. "
            "Pass images of a batch one at a time or use detect_batch."
        )
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise TypeError(f"MTCNN expects a float image in [0, 1] or uint8, got dtype {image.dtype}.")
    if image.shape[-1] == 1:  # grayscale
        image = image.expand(*image.shape[:2], 3)
    elif image.shape[-1] == 4:  # RGBA: alpha says nothing about faces
        image = image[..., :3]
    return image


class MTCNNDetector:
    """Face detector with the ``FaceDetector`` protocol of ``pipelines/face/types.py``."""

    name = "mtcnn"

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        *,
        min_face_size: float = 20.0,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        max_batch: int = 512,
        exact_pyramid: bool = True,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        self.config = MTCNNConfig(
            float(min_face_size), tuple(float(t) for t in thresholds), float(factor), int(max_batch), bool(exact_pyramid)
        )
        self.config.validate()
        target = torch.device(device) if device is not None else next(pnet.parameters()).device
        # One module holding the three nets, so a host (ComfyUI's ModelPatcher) can move them together.
        self.module = nn.ModuleDict({"pnet": pnet, "rnet": rnet, "onet": onet}).to(target).float().eval().requires_grad_(False)
        # Channels-last weights and inputs: on CPU, max pooling runs several times faster on NHWC than on NCHW
        # (R-Net and O-Net spent most of their time there) and the convs are faster too; same results to float rounding.
        self.module.to(memory_format=torch.channels_last)
        self.pnet, self.rnet, self.onet = self.module["pnet"], self.module["rnet"], self.module["onet"]

    @property
    def device(self) -> torch.device:
        """Where the nets are now (a host may have moved them since loading)."""
        return next(self.pnet.parameters()).device

    # -- protocol ----------------------------------------------------------------------------

    def detect(self, image: torch.Tensor) -> list[DetectedFace]:
        """All faces in one (H, W, 3) float RGB image in [0, 1], best score first.

        Also accepts (H, W), (H, W, 1) grayscale, (H, W, 4) RGBA (alpha ignored) and uint8. Boxes are
        the regressed O-Net boxes and may reach past the image border, as in facenet-pytorch.
        """
        return self.detect_batch(_as_rgb(image)[None])[0]

    # -- batched -----------------------------------------------------------------------------

    @torch.no_grad()
    def detect_batch(self, images: torch.Tensor) -> list[list[DetectedFace]]:
        """Faces in each image of a (B, H, W, 3) batch of equal-sized images."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"detect_batch expects (B, H, W, 3) images, got {tuple(images.shape)}.")
        if not images.is_floating_point():
            raise TypeError(f"detect_batch expects float images in [0, 1], got dtype {images.dtype}.")
        # An NCHW view of the [0, 1] images: no whole-image copy. The x255 scaling happens on the small pyramid
        # levels and crops; the NaN check on the first level (area pooling carries a NaN into it).
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2)
        boxes, scores, points, owner = self._cascade(x)
        result: list[list[DetectedFace]] = [[] for _ in range(x.shape[0])]
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        boxes, scores, points, owner = boxes.cpu(), scores.cpu(), points.cpu(), owner.cpu()
        for k in order:
            result[int(owner[k])].append(
                DetectedFace(
                    box=tuple(float(v) for v in boxes[k]),
                    score=float(scores[k]),
                    landmarks=points[k].clone(),
                )
            )
        return result

    # -- the three stages ----------------------------------------------------------------------

    def _cascade(self, x: torch.Tensor):
        """x: (B, 3, H, W) in 0..1. Returns boxes (N, 4), scores (N,), points (N, 5, 2), image index (N,)."""
        cfg = self.config
        _, _, height, width = x.shape
        empty = (
            torch.zeros(0, 4, device=x.device),
            torch.zeros(0, device=x.device),
            torch.zeros(0, 5, 2, device=x.device),
            torch.zeros(0, dtype=torch.long, device=x.device),
        )

        boxes, scores, owner = self._stage_pnet(x)
        if boxes.shape[0] == 0:
            return empty

        # R-Net
        boxes, owner = self._drop_empty(boxes, owner, width, height)
        if boxes.shape[0] == 0:
            return empty
        reg, scores = self._run_batched(self.rnet, x, owner, _crop_windows(boxes, width, height), 24)
        keep = scores > cfg.thresholds[1]
        boxes, scores, owner, reg = boxes[keep], scores[keep], owner[keep], reg[keep]
        pick = nms(boxes, scores, owner, 0.7)
        boxes, scores, owner, reg = boxes[pick], scores[pick], owner[pick], reg[pick]
        boxes = _square(_regress(boxes, reg, plus_one=True))

        # O-Net
        boxes, owner = self._drop_empty(boxes, owner, width, height)
        if boxes.shape[0] == 0:
            return empty
        reg, marks, scores = self._run_batched(self.onet, x, owner, _crop_windows(boxes, width, height), 48)
        keep = scores > cfg.thresholds[2]
        boxes, scores, owner, reg, marks = boxes[keep], scores[keep], owner[keep], reg[keep], marks[keep]
        # Landmarks are relative to the (squared, pre-regression) O-Net input box.
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        px = w * marks[:, :5] + boxes[:, :1] - 1
        py = h * marks[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack([px, py], dim=2)
        boxes = _regress(boxes, reg, plus_one=True)
        pick = nms(boxes, scores, owner, 0.7, mode="min")
        return boxes[pick], scores[pick], points[pick], owner[pick]

    def _stage_pnet(self, x: torch.Tensor):
        cfg = self.config
        _, _, height, width = x.shape
        all_boxes, all_scores, all_owner = [], [], []
        source = x
        for level, scale in enumerate(pyramid_scales(height, width, cfg.min_face_size, cfg.factor)):
            size = (int(height * scale + 1), int(width * scale + 1))
            if cfg.exact_pyramid:  # every level from the full image, as facenet-pytorch
                level_img = F.interpolate(x, size=size, mode="area")
            else:  # later levels from the first one (at most 0.36x the image's area), not from the full image
                level_img = F.interpolate(source, size=size, mode="area").contiguous(memory_format=torch.channels_last)
                if level == 0:
                    source = level_img
            if level == 0 and not torch.isfinite(level_img).all():
                raise ValueError("The image contains NaN or infinite values; fix the upstream node that produced it.")
            data = (level_img.contiguous(memory_format=torch.channels_last) * 255.0 - 127.5) * 0.0078125
            reg, prob = self.pnet(data)
            hit = prob >= cfg.thresholds[0]
            idx = hit.nonzero()  # (n, 3): image, row, col
            if idx.shape[0] == 0:
                continue
            score = prob[hit]
            offsets = reg.permute(0, 2, 3, 1)[hit]
            cell = idx[:, [2, 1]].to(prob.dtype)  # x, y of the window's output cell
            # Each output cell is a 12x12 window at stride 2 in the scaled image.
            q1 = ((2 * cell + 1) / scale).floor()
            q2 = ((2 * cell + 12) / scale).floor()
            boxes = torch.cat([q1, q2], dim=1)
            pick = nms(boxes, score, idx[:, 0], 0.5)
            all_boxes.append(torch.cat([boxes[pick], offsets[pick]], dim=1))
            all_scores.append(score[pick])
            all_owner.append(idx[pick, 0])
        if not all_boxes:
            return torch.zeros(0, 4, device=x.device), torch.zeros(0, device=x.device), torch.zeros(0, dtype=torch.long)
        boxes, scores, owner = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_owner)
        pick = nms(boxes[:, :4], scores, owner, 0.7)
        boxes, scores, owner = boxes[pick], scores[pick], owner[pick]
        boxes = _square(_regress(boxes[:, :4], boxes[:, 4:], plus_one=False))
        return boxes, scores, owner

    @staticmethod
    def _drop_empty(boxes: torch.Tensor, owner: torch.Tensor, width: int, height: int):
        """Boxes wholly outside the image give empty crops; they cannot be faces."""
        win = _crop_windows(boxes, width, height)
        ok = (win[:, 2] > win[:, 0]) & (win[:, 3] > win[:, 1])
        return boxes[ok], owner[ok]

    def _run_batched(self, net: nn.Module, images: torch.Tensor, owner: torch.Tensor, windows: torch.Tensor, size: int):
        outs = []
        for start in range(0, windows.shape[0], self.config.max_batch):
            sl = slice(start, start + self.config.max_batch)
            crops = crop_resize_area(images, owner[sl], windows[sl], size).to(self.device)
            outs.append(net((crops * 255.0 - 127.5) * 0.0078125))
        return tuple(torch.cat(parts) for parts in zip(*outs))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

PathLike = Union[str, os.PathLike]


def _find_weight_file(folder: Path, net: str) -> Path:
    found = [folder / f"{net}{s}" for s in WEIGHT_SUFFIXES if (folder / f"{net}{s}").is_file()]
    if len(found) > 1:
        raise ValueError(
            f"Folder {folder} holds several versions of the MTCNN {net}: {', '.join(p.name for p in found)}. "
            "Keep one of them so it is clear which weights are used."
        )
    if not found:
        expected = " or ".join(f"{net}{s}" for s in WEIGHT_SUFFIXES)
        raise FileNotFoundError(
            f"MTCNN weight file {expected} is missing in folder {folder}. The folder must hold pnet, rnet and onet "
            "(.pt as shipped in facenet-pytorch's data/ folder, or .safetensors)."
        )
    return found[0]


def _load_net(cls: type, path: Path) -> nn.Module:
    state, _ = load_state_dict_file(path)
    return load_strict(
        cls(), state, source=str(path), network=f"facenet-pytorch {cls.__name__}",
        hint=f"Use the {path.stem}.pt file from facenet-pytorch's data/ folder, and check that pnet/rnet/onet are not swapped.",
    )


def load_mtcnn(
    folder_or_paths: Union[PathLike, Mapping[str, PathLike]],
    device: Union[str, torch.device] = "cpu",
    **detector_kwargs,
) -> MTCNNDetector:
    """Build an ``MTCNNDetector`` from a folder holding pnet/rnet/onet (.safetensors, .pt or .pth),
    or from a mapping {"pnet": path, "rnet": path, "onet": path}. Extra keyword arguments
    (min_face_size, thresholds, factor, max_batch) go to the detector."""
    if isinstance(folder_or_paths, Mapping):
        missing = [n for n in NET_NAMES if n not in folder_or_paths]
        if missing:
            raise ValueError(f"load_mtcnn needs paths for pnet, rnet and onet; missing {missing}.")
        paths = {n: Path(folder_or_paths[n]) for n in NET_NAMES}
        for n, p in paths.items():
            if not p.is_file():
                raise FileNotFoundError(f"MTCNN {n} weight file {p.name} is missing in folder {p.parent}.")
    else:
        folder = Path(folder_or_paths)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"MTCNN model folder {folder} does not exist. Create it and put pnet.pt, rnet.pt and onet.pt "
                "(from facenet-pytorch's data/ folder) or their .safetensors versions in it."
            )
        paths = {n: _find_weight_file(folder, n) for n in NET_NAMES}
    nets = [_load_net(cls, paths[n]) for n, cls in zip(NET_NAMES, (PNet, RNet, ONet))]
    logger.info("Loaded MTCNN from %s", ", ".join(str(p) for p in paths.values()))
    return MTCNNDetector(*nets, device=device, **detector_kwargs)
