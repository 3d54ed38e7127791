"""BiSeNet face parsing (19 CelebAMask-HQ classes) in plain torch, and a face-region mask built on it.

The network is the face-parsing BiSeNet that facexlib ships as ``parsing_bisenet.pth`` (release v0.2.0; the
same network as the widely used face-parsing.PyTorch ``79999_iter.pth``). Parameter names match that file,
so it loads unchanged. Architecture:

* context path: a ResNet-18 backbone (7x7 stem, max-pool, four stages of two basic blocks; widths 64, 128,
  256, 512) gives features at 1/8, 1/16 and 1/32. A global-average branch and attention-refinement modules
  (ARM: conv, then channel gate sigmoid(BN(1x1 conv(mean)))) merge 1/32 into 1/16 and 1/16 into 1/8 by
  nearest upsampling followed by 3x3 conv heads.
* the "spatial path" is the backbone's 1/8 feature itself; a feature-fusion module (FFM) concatenates it with
  the context feature, applies conv, then scales by (1 + squeeze-excite gate).
* the main head predicts 19 logits at 1/8, bilinearly upsampled (align_corners=True) to the input size. Two
  auxiliary heads (on the context features) exist only for training; they are computed on request.

Input convention (as facexlib-based packs feed it): RGB, 512x512, ImageNet mean/std normalisation.

Label order (CelebAMask-HQ as used by face-parsing.PyTorch): 0 background, 1 skin, 2 l_brow, 3 r_brow,
4 l_eye, 5 r_eye, 6 eye_g (glasses), 7 l_ear, 8 r_ear, 9 ear_r (earring), 10 nose, 11 mouth, 12 u_lip,
13 l_lip, 14 neck, 15 neck_l (necklace), 16 cloth, 17 hair, 18 hat.

The default face region is the inner face: skin, brows, eyes, glasses, nose, mouth, lips. Hair, hat, ears,
earrings, neck and clothing change from photo to photo and carry little identity, so an identity method's
face mask leaves them out (PortraitBooth's ablation finds a face-only mask better than a person mask).
Pass ``face_classes`` to choose differently.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.files import load_state_dict_file

logger = logging.getLogger(__name__)

CELEBAMASK_HQ_LABELS: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip
DEFAULT_FACE_CLASSES: tuple[str, ...] = (
    "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "nose", "mouth", "u_lip", "l_lip",
)  # fmt: skip
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_FILE = "parsing_bisenet.pth"


@dataclass(frozen=True)
class BiSeNetConfig:
    num_classes: int = 19
    stem_channels: int = 64
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)
    blocks_per_stage: int = 2
    context_channels: int = 128  # ARM / context-head width
    fuse_channels: int = 256  # FFM and main-head width (1/8 backbone feature + context feature)
    aux_mid_channels: int = 64
    fuse_reduction: int = 4  # FFM squeeze-excite reduction


# ----------------------------------------------------------------------------------------------
# Building blocks (attribute names follow the official state dict)
# ----------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Sequential] = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(skip + branch)


class ResNet18Backbone(nn.Module):
    """Returns the 1/8, 1/16 and 1/32 features (stages 2, 3, 4)."""

    def __init__(self, cfg: BiSeNetConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = cfg.stem_channels
        for i, cout in enumerate(cfg.stage_channels):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(cfg.blocks_per_stage - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x8 = self.layer2(self.layer1(x))
        x16 = self.layer3(x8)
        x32 = self.layer4(x16)
        return x8, x16, x32


class AttentionRefinement(nn.Module):
    """conv, then a per-channel gate computed from the global mean of the result."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(_global_mean(feat))))
        return feat * gate


class ContextPath(nn.Module):
    def __init__(self, cfg: BiSeNetConfig) -> None:
        super().__init__()
        c16, c32 = cfg.stage_channels[2], cfg.stage_channels[3]
        ctx = cfg.context_channels
        self.resnet = ResNet18Backbone(cfg)
        self.arm16 = AttentionRefinement(c16, ctx)
        self.arm32 = AttentionRefinement(c32, ctx)
        self.conv_head32 = ConvBNReLU(ctx, ctx, 3)
        self.conv_head16 = ConvBNReLU(ctx, ctx, 3)
        self.conv_avg = ConvBNReLU(c32, ctx, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (backbone 1/8, context 1/8, context 1/16)."""
        x8, x16, x32 = self.resnet(x)
        global_ctx = self.conv_avg(_global_mean(x32))  # (N, C, 1, 1), broadcast over the 1/32 map
        up32 = F.interpolate(self.arm32(x32) + global_ctx, size=x16.shape[2:], mode="nearest")
        ctx16 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(x16) + ctx16, size=x8.shape[2:], mode="nearest")
        ctx8 = self.conv_head16(up16)
        return x8, ctx8, ctx16


class FeatureFusion(nn.Module):
    """Concatenate, conv, then scale by (1 + squeeze-excite gate)."""

    def __init__(self, cin: int, cout: int, reduction: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // reduction, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // reduction, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_mean(feat)))))
        return feat + feat * gate


class SegmentationHead(nn.Module):
    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.conv_out = nn.Conv2d(mid, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """(N, 3, H, W) normalised RGB -> (N, num_classes, H, W) logits. H and W: multiples of 32 work best."""

    def __init__(self, config: Optional[BiSeNetConfig] = None) -> None:
        super().__init__()
        cfg = config or BiSeNetConfig()
        self.config = cfg
        self.num_classes = cfg.num_classes
        ctx = cfg.context_channels
        self.cp = ContextPath(cfg)
        self.ffm = FeatureFusion(cfg.stage_channels[1] + ctx, cfg.fuse_channels, cfg.fuse_reduction)
        self.conv_out = SegmentationHead(cfg.fuse_channels, cfg.fuse_channels, cfg.num_classes)
        self.conv_out16 = SegmentationHead(ctx, cfg.aux_mid_channels, cfg.num_classes)  # training-only
        self.conv_out32 = SegmentationHead(ctx, cfg.aux_mid_channels, cfg.num_classes)  # training-only

    def forward(
        self, x: torch.Tensor, with_aux: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size = x.shape[2:]
        x8, ctx8, ctx16 = self.cp(x)
        main = self._upsample(self.conv_out(self.ffm(x8, ctx8)), size)
        if not with_aux:
            return main
        return main, self._upsample(self.conv_out16(ctx8), size), self._upsample(self.conv_out32(ctx16), size)

    @staticmethod
    def _upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------------
# Face parser
# ----------------------------------------------------------------------------------------------


def resolve_classes(classes: Iterable[Union[str, int]], num_classes: int = 19) -> tuple[int, ...]:
    """Class names (CelebAMask-HQ) or indices -> sorted unique indices; unknown entries raise."""
    ids: set[int] = set()
    for c in classes:
        if isinstance(c, str):
            key = c.strip().lower()
            if key not in CELEBAMASK_HQ_LABELS:
                raise ValueError(
                    f"Unknown face-parsing class {c!r}. Use names from {', '.join(CELEBAMASK_HQ_LABELS)} "
                    "or their indices 0..18."
                )
            idx = CELEBAMASK_HQ_LABELS.index(key)
        else:
            idx = int(c)
        if not 0 <= idx < num_classes:
            raise ValueError(f"Face-parsing class index {idx} is outside 0..{num_classes - 1}.")
        ids.add(idx)
    if not ids:
        raise ValueError("face_classes is empty: name at least one class (for example 'skin').")
    return tuple(sorted(ids))


def _as_image_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(H, W, C) or (N, H, W, C) in [0, 1] (or uint8) -> (N, H, W, 3) float, and whether it was batched."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"The face parser expects a torch tensor (H, W, 3) in [0, 1], got {type(images).__name__}.")
    batched = images.dim() == 4
    if images.dim() not in (3, 4):
        raise ValueError(f"The face parser expects an image (H, W, 3) or a batch (N, H, W, 3), got {tuple(images.shape)}.")
    x = images if batched else images[None]
    channels = x.shape[-1]
    if channels == 1:
        x = x.expand(*x.shape[:-1], 3)
    elif channels == 4:
        x = x[..., :3]  # the crop's alpha says nothing about the face
    elif channels != 3:
        raise ValueError(
            f"The face parser expects RGB images with the channel last (H, W, 3), got shape {tuple(images.shape)}."
        )
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise TypeError(f"The face parser expects float images in [0, 1] or uint8, got dtype {x.dtype}.")
    if not torch.isfinite(x).all():
        raise ValueError("The face crop contains NaN or infinite values; fix the upstream node that produced it.")
    return x, batched


class BiSeNetFaceParser:
    """``FaceParser`` on a BiSeNet: labels of an FFHQ-aligned crop and the face-region mask.

    ``model`` maps (N, 3, 512, 512) ImageNet-normalised RGB to (N, C, 512, 512) logits (normally ``BiSeNet``).
    ``face_classes`` lists the classes (names or indices) that count as face; ``soft`` makes the mask the summed
    softmax probability of those classes instead of a 0/1 argmax mask.
    """

    name = "bisenet-celebamask-hq"

    def __init__(
        self,
        model: nn.Module,
        face_classes: Iterable[Union[str, int]] = DEFAULT_FACE_CLASSES,
        soft: bool = False,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        num_classes = int(getattr(model, "num_classes", len(CELEBAMASK_HQ_LABELS)))
        self.face_class_ids = resolve_classes(face_classes, num_classes)
        self.soft = bool(soft)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) or (N, H, W, 3) RGB in [0, 1] -> (N, C, H, W) float32 logits on the crops' device.

        The network always sees 512x512 (resized bilinearly, anti-aliased when shrinking); logits go back to
        the crop's own size, so a 512 crop gives 512 logits.
        """
        x, _ = _as_image_batch(crops)
        out_device = x.device
        h, w = x.shape[1:3]
        x = x.to(self.device, torch.float32).permute(0, 3, 1, 2)
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            shrink = h > INPUT_SIZE or w > INPUT_SIZE
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=shrink)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x.clamp(0, 1) - mean) / std).to(self.dtype)
        with torch.no_grad():
            out = self.model(x).float()
        if out.shape[2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out.to(out_device)

    def parse(self, crop: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) -> (H, W) long CelebAMask-HQ labels (or (N, H, W) for a batch)."""
        _, batched = _as_image_batch(crop)
        labels = self.logits(crop).argmax(dim=1)
        return labels if batched else labels[0]

    def mask_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) logits -> (N, H, W) face-region mask in [0, 1]."""
        ids = torch.tensor(self.face_class_ids, device=logits.device)
        if self.soft:
            return logits.softmax(dim=1).index_select(1, ids).sum(dim=1).clamp(0, 1)
        return torch.isin(logits.argmax(dim=1), ids).float()

    def face_mask(self, crop_512: torch.Tensor) -> torch.Tensor:
        """(512, 512, 3) FFHQ-aligned crop -> (512, 512) face-region mask in [0, 1] (or (N, H, W) for a batch)."""
        _, batched = _as_image_batch(crop_512)
        mask = self.mask_from_logits(self.logits(crop_512))
        return mask if batched else mask[0]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

PathLike = Union[str, os.PathLike]


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Checkpoints saved from DataParallel carry a 'module.' prefix on every key."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def bisenet_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> BiSeNet:
    """Build a ``BiSeNet`` (class count read from the head) and load ``state`` into it, with clear errors.

    float32 tensors of ``state`` become the model's parameters without a copy (no second 50 MB in memory).
    """
    state = _strip_prefix(state)
    head = state.get("conv_out.conv_out.weight")
    if head is None or head.dim() != 4:
        hint = ""
        if any(k.startswith("encoder.") for k in state):
            hint = " It looks like facexlib's ParseNet (parsing_parsenet.pth), a different network."
        raise ValueError(
            f"{source} is not a BiSeNet face-parsing state dict (no 'conv_out.conv_out.weight').{hint} "
            f"Use facexlib's {OFFICIAL_FILE} (release v0.2.0) or face-parsing.PyTorch's 79999_iter.pth."
        )
    with torch.device("meta"):  # shapes only: the file supplies every value, so skip the random init
        model = BiSeNet(BiSeNetConfig(num_classes=int(head.shape[0])))
    expected = model.state_dict()
    # BatchNorm step counters do not affect inference; files from old torch versions lack them.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the BiSeNet face-parsing layout: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}. "
            f"Use facexlib's {OFFICIAL_FILE} (release v0.2.0) unchanged."
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, BiSeNet needs {tuple(expected[k].shape)}. "
                f"The file is for a different network; use facexlib's {OFFICIAL_FILE}."
            )
    full = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    for k in optional - set(state):
        full[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(full, strict=True, assign=True)
    return model.eval()


def load_bisenet(
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
    face_classes: Iterable[Union[str, int]] = DEFAULT_FACE_CLASSES,
    soft: bool = False,
) -> BiSeNetFaceParser:
    """``BiSeNetFaceParser`` from ``parsing_bisenet.pth`` (weights-only torch pickle) or a ``.safetensors`` copy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Face-parsing weights {path.name} not found in {path.parent}. Put facexlib's {OFFICIAL_FILE} "
            "(or a .safetensors copy) there, or run without a parsing model (the landmark hull mask is used)."
        )
    state, _ = load_state_dict_file(path)
    model = bisenet_from_state_dict(state, source=str(path))
    logger.info("Loaded BiSeNet face parsing (%d classes) from %s", model.num_classes, path)
    return BiSeNetFaceParser(model, face_classes=face_classes, soft=soft, device=device)
