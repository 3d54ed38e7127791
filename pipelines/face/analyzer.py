"""Detect → select → align → mask → embed, with the user's policies for which face and for no face."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..runtime import NO_HOOKS, RunHooks
from .align import CROP_SIZES, LazyCrops, crop_matrix, template_for, warp_affine
from .masks import LazyMask
from .types import (
    NO_FACE_POLICIES,
    SELECT_POLICIES,
    DetectedFace,
    Face,
    FaceDetector,
    FaceParser,
    FaceRecognizer,
    FaceSet,
    Identity,
)

log = logging.getLogger(__name__)

# Detectors see at most det_size pixels on the long side (as insightface's det_size): big photos are shrunk for
# detection only, and crops are still taken from the full-resolution photo. 0 means no cap below MAX_DETECT_SIDE.
DEFAULT_DET_SIZE = 640
MAX_DETECT_SIDE = 1600
MIN_IMAGE_SIDE = 16


class NoFaceError(ValueError):
    """No face was found and the policy says to stop."""


class FaceInputError(ValueError):
    """The images cannot be analysed as given."""


def to_rgb_batch(images: torch.Tensor) -> torch.Tensor:
    """Accept (H,W,C) or (B,H,W,C) with C in {1, 3, 4}; return (B,H,W,3) float in [0,1].

    Grayscale is repeated to RGB and RGBA loses its alpha (ComfyUI's LoadImage gives alpha as a MASK).
    """
    if not isinstance(images, torch.Tensor):
        raise FaceInputError("Expected an IMAGE tensor. Connect a Load Image (or any IMAGE) output.")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise FaceInputError(f"Expected an IMAGE batch (B, H, W, C); got shape {tuple(images.shape)}.")
    c = images.shape[-1]
    if c == 1:
        images = images.expand(-1, -1, -1, 3)
    elif c == 4:
        images = images[..., :3]
    elif c != 3:
        raise FaceInputError(f"Expected 1, 3 or 4 colour channels; got {c}. Convert the image to RGB.")
    if images.shape[0] == 0:
        raise FaceInputError("The IMAGE batch is empty.")
    if min(images.shape[1:3]) < MIN_IMAGE_SIDE:
        raise FaceInputError(
            f"The image is {images.shape[2]}×{images.shape[1]} px, too small to hold a face. "
            f"Use images of at least {MIN_IMAGE_SIDE} px (faces of 64 px or more work best)."
        )
    # No whole-image copy or clamp: crops are clamped, and detectors check their (small) input for NaN.
    return images if images.dtype == torch.float32 else images.float()


def _block_mean(image: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each k x k block of an (H, W, C) image (the last H % k rows and W % k columns are dropped).

    Whole rows are added first (contiguous memory), then every k-th column of the k-times-smaller result: plain
    adds over views, several times faster than ``mean`` over the small block dimensions on a big photo.
    """
    h, w, c = image.shape
    hb, wb = h // k, w // k
    rows = image[: hb * k].reshape(hb, k, w, c)
    acc = rows[:, 0] + rows[:, 1]
    for i in range(2, k):
        acc += rows[:, i]
    out = acc[:, 0 : wb * k : k] + acc[:, 1 : wb * k : k]
    for j in range(2, k):
        out += acc[:, j : wb * k : k]
    return out.mul_(1.0 / (k * k))


def shrink_for_detection(image: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, W, 3) -> about (H*scale, W*scale, 3), antialiased, for the detector only.

    Big reductions first average k x k blocks straight from the (H, W, 3) memory (one cheap read of the photo),
    then an antialiased bilinear resize of the much smaller result gives the exact size.
    """
    h, w = image.shape[:2]
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    k = int(1.0 / scale) // 2 * 2 if scale < 0.5 else 1  # even block size, at most half the reduction
    x = _block_mean(image, k) if k >= 2 else image
    x = x.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0)


def _left_to_right(faces: list[DetectedFace]) -> list[DetectedFace]:
    return sorted(faces, key=lambda f: (f.box[0] + f.box[2]) / 2)


def select_faces(faces: list[DetectedFace], select: str, index: int) -> list[DetectedFace]:
    if select not in SELECT_POLICIES:
        raise ValueError(f"Unknown face selection {select!r}; choose one of {SELECT_POLICIES}.")
    if not faces:
        return []
    if select == "largest":
        return [max(faces, key=lambda f: f.area)]
    ordered = _left_to_right(faces)
    if select == "all":
        return ordered
    if not 0 <= index < len(ordered):
        raise FaceInputError(
            f"Face index {index} was asked for but only {len(ordered)} face(s) were found "
            f"(indices 0..{len(ordered) - 1}, counted left to right). Lower the index or use 'largest'."
        )
    return [ordered[index]]


def aligned_crop_face(image: torch.Tensor) -> DetectedFace:
    """Treat the whole image as an ArcFace-aligned crop: landmarks at the template, scaled to the image."""
    h, w = image.shape[:2]
    lm = template_for(112) * torch.tensor([w / 112.0, h / 112.0], dtype=torch.float64)
    return DetectedFace(box=(0.0, 0.0, float(w), float(h)), score=1.0, landmarks=lm.float())


@dataclass
class FaceAnalyzer:
    """Everything the face nodes need, behind one object (socket type FACEBOOTH_FACE_ANALYZER)."""

    detector: Optional[FaceDetector]
    recognizer: Optional[FaceRecognizer]
    parser: Optional[FaceParser] = None
    name: str = "face-analyzer"
    det_size: int = DEFAULT_DET_SIZE  # long side the detector sees (0: up to MAX_DETECT_SIDE)
    # Called before the models run (ComfyUI's nodes load the models onto the GPU here); None in plain use.
    prepare: Optional[Callable[[], None]] = None

    @property
    def recognizer_name(self) -> str:
        return self.recognizer.name if self.recognizer is not None else "none"

    def detect(self, image: torch.Tensor) -> list[DetectedFace]:
        if self.detector is None:
            raise FaceInputError(
                "This face analyzer has no detector. Use mode 'aligned crop' with pre-aligned face crops, "
                "or load a detector (PyTorch MTCNN weights or an InsightFace pack)."
            )
        h, w = image.shape[:2]
        cap = min(self.det_size, MAX_DETECT_SIDE) if self.det_size and self.det_size > 0 else MAX_DETECT_SIDE
        scale = min(1.0, cap / max(h, w))
        if scale < 1.0:
            small = shrink_for_detection(image, scale)
            scale_x, scale_y = small.shape[1] / w, small.shape[0] / h
            found = self.detector.detect(small)
            factor = torch.tensor([1.0 / scale_x, 1.0 / scale_y])
            # box edges scale; landmarks are pixel-centre coordinates: x = (x_small + 0.5) / s - 0.5
            return [
                DetectedFace(
                    box=(f.box[0] / scale_x, f.box[1] / scale_y, f.box[2] / scale_x, f.box[3] / scale_y),
                    score=f.score,
                    landmarks=(f.landmarks + 0.5) * factor - 0.5,
                )
                for f in found
            ]
        return self.detector.detect(image)

    def analyze(
        self,
        images: torch.Tensor,
        *,
        mode: str = "detect",
        select: str = "largest",
        index: int = 0,
        no_face: str = "error",
        crops: Sequence[str] = tuple(CROP_SIZES),
        embed: bool = True,
        hooks: RunHooks = NO_HOOKS,
    ) -> FaceSet:
        if no_face not in NO_FACE_POLICIES:
            raise ValueError(f"Unknown no-face policy {no_face!r}; choose one of {NO_FACE_POLICIES}.")
        if mode not in ("detect", "aligned"):
            raise ValueError("mode must be 'detect' or 'aligned'.")
        batch = to_rgb_batch(images)
        n = batch.shape[0]
        if self.prepare is not None:
            self.prepare()
        faces: list[Face] = []
        missing: list[int] = []
        for i in range(n):
            hooks.check_interrupt()
            image = batch[i]
            found = [aligned_crop_face(image)] if mode == "aligned" else self.detect(image)
            chosen = select_faces(found, select, index)
            if not chosen:
                if no_face == "error":
                    raise NoFaceError(
                        f"No face found in image {i} (0-based) of the batch of {n}. "
                        "Use a clearer, larger, front-facing photo, set 'no face' to skip or pass through, "
                        "or use mode 'aligned crop' if the images are already face crops."
                    )
                log.warning("FaceBooth: no face found in image %d of %d (%s)", i, n, no_face)
                missing.append(i)
            for det in chosen:
                face_crops = LazyCrops(image, det.landmarks, crops)  # each kind sampled when first read
                mask = LazyMask(image, det.landmarks, self.parser, face_crops)  # built when read
                faces.append(
                    Face(image_index=i, box=det.box, score=float(det.score), landmarks=det.landmarks, mask=mask, crops=face_crops)
                )
            hooks.progress(i + 1, n, None)
        if embed and faces and self.recognizer is not None:
            self._embed(faces, batch)
        return FaceSet(images=batch, faces=faces, missing=missing, no_face_policy=no_face, analyzer_name=self.name)

    def _embed(self, faces: list[Face], batch: torch.Tensor) -> None:
        size = self.recognizer.input_size
        key = "arcface_112" if size == 112 else None
        aligned = []
        for f in faces:
            if key and key in f.crops:
                aligned.append(f.crops[key])
            else:
                aligned.append(warp_affine(batch[f.image_index], crop_matrix("arcface_112", f.landmarks), size))
        with torch.no_grad():
            emb = self.recognizer.embed(torch.stack(aligned))
        emb = F.normalize(emb.float(), dim=-1)
        for f, e in zip(faces, emb):
            f.embedding = e.cpu()

    def embed_images(self, aligned: torch.Tensor) -> torch.Tensor:
        if self.recognizer is None:
            raise FaceInputError("This face analyzer has no recognizer (ArcFace) loaded, so it cannot make identities.")
        if self.prepare is not None:
            self.prepare()
        with torch.no_grad():
            return F.normalize(self.recognizer.embed(aligned).float(), dim=-1).cpu()


def identity_from_faces(faceset: FaceSet, recognizer: str) -> Optional[Identity]:
    """Average the embeddings of all faces (several photos of one person). None when there are none."""
    embs = [f.embedding for f in faceset.faces if f.embedding is not None]
    if not embs:
        return None
    per_face = F.normalize(torch.stack(embs).float(), dim=-1)
    mean = F.normalize(per_face.mean(0), dim=0)
    return Identity(embedding=mean, per_face=per_face, recognizer=recognizer)


def cosine_similarity(identity: Identity, embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine between the identity's mean embedding and each row of ``embeddings``."""
    return F.normalize(embeddings.float(), dim=-1) @ identity.embedding.float()
