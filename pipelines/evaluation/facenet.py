"""FaceNet identity embeddings: Inception-ResNet-v1 (Szegedy et al. 2017) in the layout of the
facenet-pytorch VGGFace2 file (``20180402-114759-vggface2.pt``, converted from davidsandberg/facenet).

Used by the PortraitBooth (FastComposer), Face2Diffusion and InstantBooth protocols. Input: a 160x160
RGB face cut from the detector's box (no landmark alignment), standardised as (x*255 - 127.5) / 128.
Output: a 512-d L2-normalised embedding. The classifier ``logits.*`` of the file is not needed.

Layout (key prefixes): stem ``conv2d_1a`` .. ``conv2d_4b``; ``repeat_1`` (5 x Block35, scale 0.17),
``mixed_6a``, ``repeat_2`` (10 x Block17, scale 0.10), ``mixed_7a``, ``repeat_3`` (5 x Block8, scale 0.20),
``block8`` (scale 1, no ReLU); then average pool, ``last_linear`` (no bias) and ``last_bn``. Each conv unit
is ``conv`` (no bias) + ``bn`` (eps 1e-3) + ReLU; each residual block ends in a 1x1 ``conv2d`` with bias.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...utils.files import load_state_dict_file, require_weight_file

log = logging.getLogger(__name__)

INPUT_SIZE = 160
EMBEDDING_DIM = 512


class ConvUnit(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _chain(*units: ConvUnit) -> nn.Sequential:
    return nn.Sequential(*units)


class Block35(nn.Module):
    """Inception-ResNet-A on 35x35-grid features (256 channels here)."""

    def __init__(self, scale: float = 0.17) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = ConvUnit(256, 32, 1)
        self.branch1 = _chain(ConvUnit(256, 32, 1), ConvUnit(32, 32, 3, padding=1))
        self.branch2 = _chain(ConvUnit(256, 32, 1), ConvUnit(32, 32, 3, padding=1), ConvUnit(32, 32, 3, padding=1))
        self.conv2d = nn.Conv2d(96, 256, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)
        return self.relu(x + self.scale * self.conv2d(mixed))


class Block17(nn.Module):
    """Inception-ResNet-B (896 channels), factorised 1x7 / 7x1 convolutions."""

    def __init__(self, scale: float = 0.10) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = ConvUnit(896, 128, 1)
        self.branch1 = _chain(ConvUnit(896, 128, 1), ConvUnit(128, 128, (1, 7), padding=(0, 3)), ConvUnit(128, 128, (7, 1), padding=(3, 0)))
        self.conv2d = nn.Conv2d(256, 896, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch0(x), self.branch1(x)], 1)
        return self.relu(x + self.scale * self.conv2d(mixed))


class Block8(nn.Module):
    """Inception-ResNet-C (1792 channels), 1x3 / 3x1; the last one has scale 1 and no ReLU."""

    def __init__(self, scale: float = 0.20, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = ConvUnit(1792, 192, 1)
        self.branch1 = _chain(ConvUnit(1792, 192, 1), ConvUnit(192, 192, (1, 3), padding=(0, 1)), ConvUnit(192, 192, (3, 1), padding=(1, 0)))
        self.conv2d = nn.Conv2d(384, 1792, 1)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch0(x), self.branch1(x)], 1)
        return self.relu(x + self.scale * self.conv2d(mixed))


class Mixed6a(nn.Module):
    """Reduction-A: 256 -> 384 + 256 + 256 = 896 channels, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = ConvUnit(256, 384, 3, stride=2)
        self.branch1 = _chain(ConvUnit(256, 192, 1), ConvUnit(192, 192, 3, padding=1), ConvUnit(192, 256, 3, stride=2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class Mixed7a(nn.Module):
    """Reduction-B: 896 -> 384 + 256 + 256 + 896 = 1792 channels, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = _chain(ConvUnit(896, 256, 1), ConvUnit(256, 384, 3, stride=2))
        self.branch1 = _chain(ConvUnit(896, 256, 1), ConvUnit(256, 256, 3, stride=2))
        self.branch2 = _chain(ConvUnit(896, 256, 1), ConvUnit(256, 256, 3, padding=1), ConvUnit(256, 256, 3, stride=2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class InceptionResnetV1(nn.Module):
    """(N, 3, 160, 160) standardised faces -> (N, 512) L2-normalised embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d_1a = ConvUnit(3, 32, 3, stride=2)
        self.conv2d_2a = ConvUnit(32, 32, 3)
        self.conv2d_2b = ConvUnit(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvUnit(64, 80, 1)
        self.conv2d_4a = ConvUnit(80, 192, 3)
        self.conv2d_4b = ConvUnit(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[Block35() for _ in range(5)])
        self.mixed_6a = Mixed6a()
        self.repeat_2 = nn.Sequential(*[Block17() for _ in range(10)])
        self.mixed_7a = Mixed7a()
        self.repeat_3 = nn.Sequential(*[Block8() for _ in range(5)])
        self.block8 = Block8(scale=1.0, relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x))))
        x = self.repeat_3(self.mixed_7a(self.repeat_2(self.mixed_6a(self.repeat_1(x)))))
        x = self.avgpool_1a(self.block8(x)).flatten(1)  # dropout (p=0.6 in training) is the identity here
        return F.normalize(self.last_bn(self.last_linear(x)), dim=1)


def inception_resnet_v1_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> InceptionResnetV1:
    """Load a facenet-pytorch-layout state dict strictly; the classifier (``logits.*``) is ignored."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    model = InceptionResnetV1()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} is not an InceptionResnetV1 (facenet-pytorch) state dict: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}. "
            "Use 20180402-114759-vggface2.pt from facenet-pytorch's releases."
        )
    bad = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{source}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}.")
    full = dict(expected)
    full.update({k: v if k.endswith("num_batches_tracked") else v.float() for k, v in state.items()})
    model.load_state_dict(full)
    return model.eval().requires_grad_(False)


def facenet_crop(image: Image.Image, box: tuple[float, float, float, float], size: int = INPUT_SIZE) -> torch.Tensor:
    """The face as facenet-pytorch's MTCNN (margin 0) hands it to FaceNet: box corners truncated to whole
    pixels and clipped to the image, PIL bilinear resize to ``size``. Returns (3, size, size) float in [0, 255]."""
    w, h = image.size
    x1, y1, x2, y2 = box
    crop_box = (int(max(x1, 0)), int(max(y1, 0)), int(min(x2, w)), int(min(y2, h)))
    face = image.crop(crop_box).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(face, dtype=np.float32).copy()).permute(2, 0, 1)


class FaceNetRecognizer:
    """(N, 3, 160, 160) crops in [0, 255] -> (N, 512) unit embeddings."""

    input_size = INPUT_SIZE

    def __init__(self, model: InceptionResnetV1, device: Union[str, torch.device] = "cpu", name: str = "facenet", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.name = name
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, crops.shape[0], self.batch_size):
            x = (crops[start:start + self.batch_size].to(self.device, torch.float32) - 127.5) / 128.0  # fixed_image_standardization
            outs.append(self.model(x).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, EMBEDDING_DIM)


def load_facenet(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> FaceNetRecognizer:
    path = require_weight_file(path, "FaceNet", "Put facenet-pytorch's 20180402-114759-vggface2.pt there "
                               "(python -m facebooth weights fetch facenet-vggface2).")
    state, _ = load_state_dict_file(path)
    model = inception_resnet_v1_from_state_dict(state, source=str(path))
    log.info("Loaded FaceNet from %s", path)
    return FaceNetRecognizer(model, device=device, name=f"facenet:{path.name}")
