"""RetinaFace (ResNet-50) face detector from facexlib: boxes, scores and 5 landmarks.

The network is facexlib's ``RetinaFace`` with the weights PuLID and PhotoMaker V2 users already have,
``detection_Resnet50_Final.pth``; facexlib also supplies the prior boxes and the box / landmark decoding, so the
numbers are facexlib's own. FaceBooth only loads the file strictly (never through facexlib's downloader) and
feeds images the way facexlib's ``detect_faces`` does: BGR, 0..255, minus the per-channel means (104, 117, 123),
at the size it is given. The face analyzer gives it the photo shrunk to its detection size (like insightface's
``det_size``), so its cost does not grow with the photo. facexlib is optional and imported on first use.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from ...utils.files import load_state_dict_file
from ...utils.state_dict import load_strict
from .facexlib_support import import_facexlib
from .types import DetectedFace

logger = logging.getLogger(__name__)

OFFICIAL_FILE = "detection_Resnet50_Final.pth"
BGR_MEAN = (104.0, 117.0, 123.0)


def build_retinaface(meta: bool = False) -> nn.Module:
    """facexlib's RetinaFace-ResNet50, on the meta device (shapes only, for loading with ``assign``) or with init."""
    import_facexlib("RetinaFace detector")
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():  # torchvision's resnet50(pretrained=False) deprecation notice
        warnings.simplefilter("ignore")
        if meta:
            with torch.device("meta"):
                return RetinaFace(network_name="resnet50", half=False, phase="test", device="meta")
        return RetinaFace(network_name="resnet50", half=False, phase="test", device="cpu")


def retinaface_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = build_retinaface(meta=True)
    load_strict(model, state, source=source, network="facexlib RetinaFace-ResNet50", assign=True,
                hint=f"Use facexlib's {OFFICIAL_FILE} (release v0.1.0) unchanged; the MobileNet-0.25 file is not supported.")
    model.device = torch.device("cpu")  # facexlib reads these only in its own detect_faces, which we do not use
    model.mean_tensor = torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=8)
def _priors(height: int, width: int) -> torch.Tensor:
    from facexlib.detection.retinaface import generate_config
    from facexlib.detection.retinaface_utils import PriorBox

    return PriorBox(generate_config("resnet50"), image_size=(height, width)).forward()


class RetinaFaceDetector:
    """``FaceDetector`` protocol on facexlib's RetinaFace."""

    name = "retinaface_resnet50"

    def __init__(self, model: nn.Module, *, conf_threshold: float = 0.8, nms_threshold: float = 0.4,
                 device: Union[str, torch.device, None] = None) -> None:
        if not 0.0 <= conf_threshold < 1.0:
            raise ValueError(f"conf_threshold must be in [0, 1), got {conf_threshold}. facexlib's default is 0.8.")
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.module = self.model  # what a host (ComfyUI's ModelPatcher) moves between devices
        self.conf_threshold = float(conf_threshold)
        self.nms_threshold = float(nms_threshold)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[DetectedFace]:
        """All faces in one (H, W, 3) RGB image in [0, 1], best score first, in that image's pixels."""
        from facexlib.detection.retinaface_utils import decode, decode_landm, py_cpu_nms

        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[-1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"RetinaFace expects one (H, W, 3) RGB image; got {shape}.")
        if not torch.isfinite(image).all():
            raise ValueError("The image contains NaN or infinite values; fix the upstream node that produced it.")
        h, w = image.shape[:2]
        device = self.device
        mean = torch.tensor(BGR_MEAN, device=device).view(1, 3, 1, 1)
        x = image.to(device, torch.float32).flip(-1).permute(2, 0, 1)[None] * 255.0 - mean  # RGB -> BGR, 0..255
        loc, conf, landms = self.model(x.contiguous())
        priors = _priors(h, w).to(device)
        variance = self.model.cfg["variance"]
        scale = torch.tensor([w, h] * 5, dtype=torch.float32, device=device)
        boxes = (decode(loc[0], priors, variance) * scale[:4]).cpu().numpy()
        marks = (decode_landm(landms[0], priors, variance) * scale).cpu().numpy()
        scores = conf[0, :, 1].cpu().numpy()
        keep = np.where(scores > self.conf_threshold)[0]
        order = keep[np.argsort(-scores[keep], kind="stable")]
        dets = np.hstack([boxes[order], scores[order, None]]).astype(np.float32, copy=False)
        picked = py_cpu_nms(dets, self.nms_threshold) if len(dets) else []
        return [
            DetectedFace(
                box=tuple(float(v) for v in dets[i, :4]),
                score=float(dets[i, 4]),
                landmarks=torch.from_numpy(np.asarray(marks[order[i]], dtype=np.float32).reshape(5, 2)),
            )
            for i in picked
        ]


def load_retinaface(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", **kwargs) -> RetinaFaceDetector:
    """``RetinaFaceDetector`` from facexlib's ``detection_Resnet50_Final.pth`` (weights only) or a .safetensors copy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RetinaFace weights {path.name} not found in {path.parent}. Put facexlib's {OFFICIAL_FILE} there "
            "(PuLID / PhotoMaker V2 users often have it in facexlib's weights folder or models/facexlib)."
        )
    import_facexlib("RetinaFace detector")
    state, _ = load_state_dict_file(path, mmap=True)
    model = retinaface_from_state_dict(state, source=str(path))
    logger.info("Loaded RetinaFace-ResNet50 from %s", path)
    return RetinaFaceDetector(model, device=device, **kwargs)
