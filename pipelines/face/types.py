"""Plain data passed between face analysis, the methods and the nodes.

Image convention everywhere in pipelines/face: a torch float tensor (H, W, 3), RGB, values in [0, 1]
(ComfyUI's IMAGE layout without the batch axis). Landmarks are (5, 2) pixel coordinates in the order
used by insightface and MTCNN: eye on the image's left, eye on the image's right, nose tip, mouth
corner on the image's left, mouth corner on the image's right.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

SELECT_POLICIES = ("largest", "index", "all")
NO_FACE_POLICIES = ("error", "skip", "pass_through")


@dataclass
class DetectedFace:
    """What a detector reports for one face in one image."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    landmarks: torch.Tensor  # (5, 2) pixels

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass
class Face:
    """One selected face: where it is, its aligned crops, mask and identity embedding."""

    image_index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: torch.Tensor  # (5, 2) pixels in the source image
    # (H, W) float in [0, 1] at source-image resolution. May be given as a lazy source (an object with ``full()``
    # and ``paste(canvas)``, see masks.LazyMask): it is then built only when read, at crop size first.
    mask: Any = field(default=None, repr=False, compare=False)
    crops: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (S, S, 3)
    embedding: Optional[torch.Tensor] = None  # (D,) L2-normalised recognizer output

    def paste_mask(self, canvas: torch.Tensor) -> torch.Tensor:
        """Max-combine this face's mask into an (H, W) canvas, touching only the face's window when lazy."""
        source = self.__dict__.get("_mask")
        if hasattr(source, "paste"):
            return source.paste(canvas)
        return torch.maximum(canvas, self.mask.to(canvas.dtype), out=canvas)


def _get_mask(self: Face) -> Optional[torch.Tensor]:
    source = self.__dict__.get("_mask")
    return source.full() if hasattr(source, "full") else source  # lazy: rebuilt per read, never kept full size


def _set_mask(self: Face, value: Any) -> None:
    self.__dict__["_mask"] = value


Face.mask = property(_get_mask, _set_mask)  # type: ignore[assignment]  # after @dataclass: its __init__ sets it


@dataclass
class FaceSet:
    """Result of analysing a batch of images (socket type FACEBOOTH_FACES)."""

    images: torch.Tensor  # (B, H, W, 3)
    faces: list[Face]  # ordered by image index, then left to right
    missing: list[int]  # indices of images where no face was found (policy skip / pass_through)
    no_face_policy: str = "error"
    analyzer_name: str = ""

    def for_image(self, index: int) -> list[Face]:
        return [f for f in self.faces if f.image_index == index]

    def crops(self, kind: str) -> torch.Tensor:
        """All faces' crops of one kind stacked as (N, S, S, 3)."""
        if not self.faces:
            raise ValueError("No faces to take crops from.")
        return torch.stack([f.crops[kind] for f in self.faces])


@dataclass
class Identity:
    """A person's identity (socket type FACEBOOTH_IDENTITY): the mean of several faces' embeddings."""

    embedding: torch.Tensor  # (D,) L2-normalised mean of per_face
    per_face: torch.Tensor  # (N, D) L2-normalised
    recognizer: str  # which recognizer produced it; embeddings of different recognizers do not compare

    @property
    def count(self) -> int:
        return int(self.per_face.shape[0])


class FaceDetector(Protocol):
    name: str

    def detect(self, image: torch.Tensor) -> list[DetectedFace]:
        """All faces in one (H, W, 3) image, any order."""


class FaceRecognizer(Protocol):
    name: str
    input_size: int  # 112 for ArcFace

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) aligned crops in [0, 1] -> (N, D) L2-normalised embeddings."""


class FaceParser(Protocol):
    name: str

    def face_mask(self, crop_512: torch.Tensor) -> torch.Tensor:
        """(512, 512, 3) FFHQ-aligned crop -> (512, 512) face-region mask in [0, 1]."""
