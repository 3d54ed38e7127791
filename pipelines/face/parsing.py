"""Face parsing (19 CelebAMask-HQ classes) with facexlib's BiSeNet, and a face-region mask built on it.

facexlib is the source of the network: ``facexlib.parsing.bisenet.BiSeNet``, the model of its
``parsing_bisenet.pth`` (release v0.2.0; the same network as face-parsing.PyTorch's ``79999_iter.pth``). This
module only loads that file strictly (never through facexlib's downloader), feeds crops the way facexlib-based
packs do (RGB, 512x512, ImageNet mean/std) and turns the labels into a face mask. facexlib is optional and
imported only when a parser is loaded: without it, only the parsing choice is unavailable, with a message.

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
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.files import load_state_dict_file
from ...utils.state_dict import load_strict
from .facexlib_support import import_facexlib

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


def bisenet_class():
    """facexlib's BiSeNet class (imported on first use)."""
    import_facexlib("face parsing")
    from facexlib.parsing.bisenet import BiSeNet

    return BiSeNet


class _MainLogits(nn.Module):
    """facexlib's BiSeNet returns (main, aux16, aux32) logits; the parser needs the main head only."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (tuple, list)) else out


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

    ``model`` maps (N, 3, 512, 512) ImageNet-normalised RGB to (N, C, 512, 512) logits (normally facexlib's BiSeNet
    as ``bisenet_from_state_dict`` returns it).
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
        self.model = model.eval().requires_grad_(False)
        self.module = self.model  # what a host (ComfyUI's ModelPatcher) moves between devices

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


def bisenet_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    """facexlib's BiSeNet (class count read from the head), built on the meta device and loaded strictly.

    Returns a module mapping (N, 3, H, W) normalised RGB to (N, C, H, W) main-head logits.
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
    num_classes = int(head.shape[0])
    BiSeNet = bisenet_class()
    with torch.device("meta"):  # shapes only: the file supplies every value, so skip the random init
        net = BiSeNet(num_class=num_classes)
    load_strict(net, {k: v.contiguous() for k, v in state.items()}, source=source, network="BiSeNet face-parsing",
                assign=True, hint=f"Use facexlib's {OFFICIAL_FILE} (release v0.2.0) unchanged.")
    return _MainLogits(net.eval(), num_classes).eval()


def load_bisenet(
    path: PathLike,
    device: Union[str, torch.device] = "cpu",
    face_classes: Iterable[Union[str, int]] = DEFAULT_FACE_CLASSES,
    soft: bool = False,
) -> "BiSeNetFaceParser":
    """``BiSeNetFaceParser`` from ``parsing_bisenet.pth`` (weights-only torch pickle) or a ``.safetensors`` copy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Face-parsing weights {path.name} not found in {path.parent}. Put facexlib's {OFFICIAL_FILE} "
            "(or a .safetensors copy) there, or run without a parsing model (the landmark hull mask is used)."
        )
    import_facexlib("face parsing")  # before reading 50 MB: a missing facexlib is the likelier problem
    state, _ = load_state_dict_file(path, mmap=True)
    model = bisenet_from_state_dict(state, source=str(path))
    logger.info("Loaded BiSeNet face parsing (%d classes) from %s", model.num_classes, path)
    return BiSeNetFaceParser(model, face_classes=face_classes, soft=soft, device=device)
