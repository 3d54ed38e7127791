"""Identity similarity between a reference face and generated images, through the pack's face analysis.

Two recognizers, as the protocols ask:
* ``arcface``: the analyzer's own pipeline (MTCNN or InsightFace detector, 5-point alignment to the 112 px
  ArcFace template, ArcFace PyTorch or InsightFace recognizer), largest face per image;
* ``facenet``: the analyzer's detector, the largest face's box cut to 160 px without alignment (as
  facenet-pytorch's MTCNN does) and FaceNet (InceptionResnetV1, VGGFace2).

Scores: ``cosine`` (higher is better) or ``l2_distance`` between unit embeddings (InstantBooth's face
distance, lower is better). With several reference photos the score is the mean over reference faces.
An image without a face follows the protocol's rule (``protocols.NO_FACE_RULES``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..face.analyzer import FaceAnalyzer, FaceInputError, aligned_crop_face, select_faces
from ..face.align import CROP_SIZES, crop_matrix, warp_affine
from .facenet import FaceNetRecognizer, facenet_crop
from .protocols import IDENTITY_MODELS, IDENTITY_SCORES, NO_FACE_RULES


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> (H, W, 3) float tensor in [0, 1] (ComfyUI's IMAGE layout, no batch axis)."""
    return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(image.height, image.width, 3).float() / 255.0


@dataclass
class IdentityScorer:
    analyzer: FaceAnalyzer
    model: str = "arcface"
    score: str = "cosine"
    no_face: str = "exclude"
    clamp_min: Optional[float] = None
    facenet: Optional[FaceNetRecognizer] = None
    mode: str = "detect"  # 'aligned': every image already is an aligned face crop (no detection)

    def __post_init__(self) -> None:
        if self.model not in IDENTITY_MODELS or self.score not in IDENTITY_SCORES or self.no_face not in NO_FACE_RULES:
            raise ValueError(f"Unknown identity setting: model={self.model!r}, score={self.score!r}, no_face={self.no_face!r}.")
        if self.model == "facenet" and self.facenet is None:
            raise FaceInputError("The FaceNet identity score needs the FaceNet weight file (facenet-vggface2).")
        if self.model == "arcface" and self.analyzer.recognizer is None:
            raise FaceInputError("The ArcFace identity score needs a face analyzer with an ArcFace recognizer.")

    @property
    def recognizer_name(self) -> str:
        return self.facenet.name if self.model == "facenet" else self.analyzer.recognizer_name

    # -- faces -> crops -----------------------------------------------------------------------

    def _largest(self, image: torch.Tensor):
        found = [aligned_crop_face(image)] if self.mode == "aligned" else self.analyzer.detect(image)
        chosen = select_faces(found, "largest", 0)
        return chosen[0] if chosen else None

    def crop(self, image: Image.Image) -> Optional[torch.Tensor]:
        """The largest face of one image as the recognizer's input, or None when no face is found."""
        tensor = pil_to_tensor(image)
        face = self._largest(tensor)
        if face is None:
            return None
        if self.model == "facenet":
            return facenet_crop(image, face.box)
        return warp_affine(tensor, crop_matrix("arcface_112", face.landmarks), CROP_SIZES["arcface_112"])

    def embed_crops(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Recognizer forward on a list of crops -> (N, D) unit embeddings."""
        if not crops:
            return torch.zeros(0, 512)
        batch = torch.stack(list(crops))
        if self.model == "facenet":
            return F.normalize(self.facenet.embed(batch), dim=-1)
        return self.analyzer.embed_images(batch)

    def embed(self, images: Sequence[Image.Image]) -> list[Optional[torch.Tensor]]:
        """Largest-face embedding per image (None where no face was found); one batched recognizer pass."""
        crops = [self.crop(im) for im in images]
        found = [c for c in crops if c is not None]
        emb = iter(self.embed_crops(found))
        return [next(emb) if c is not None else None for c in crops]

    def reference(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(R, D) embeddings of the reference photos; an error when none holds a face (nothing to compare)."""
        embs = [e for e in self.embed(images) if e is not None]
        if not embs:
            raise FaceInputError("No face was found in the reference photo(s); identity scores need one.")
        return torch.stack(embs)

    # -- scores -------------------------------------------------------------------------------

    def raw(self, reference: torch.Tensor, embedding: torch.Tensor) -> float:
        if self.score == "cosine":
            return float((reference @ embedding).mean())
        return float((reference - embedding[None]).norm(dim=-1).mean())

    def value(self, reference: torch.Tensor, embedding: Optional[torch.Tensor]) -> float:
        """The per-image identity score under the protocol's rules (NaN = left out of the mean)."""
        if embedding is None:
            if self.no_face == "zero":
                return 0.0
            if self.no_face == "minus_one":
                return -1.0
            return math.nan
        v = self.raw(reference, embedding)
        if self.clamp_min is not None:
            v = max(v, self.clamp_min)
        return v
