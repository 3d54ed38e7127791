"""Face2Diffusion identity math, host-independent: face crops of one person -> the two word vectors S1*, S2*.

The ComfyUI nodes (``nodes/face2diffusion.py``) and the scripts call these; they only add device placement and
their own inputs and outputs.
"""
from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..face.align import crop_face
from ..face.analyzer import to_rgb_batch
from ..face.types import FaceSet
from .expression import prepare_expression
from .injection import IdentityTokens, placeholder_token_id, plan_chunked_injection
from .loading import F2DWeightsError, load_mapping, load_msid
from .mapping import F2DMapping
from .msid import MSIDEncoder, encode_identity

log = logging.getLogger(__name__)

CROP_SIZE = 112  # ArcFace-aligned crops, as the official MSID encoder reads them
CROP_KIND = f"arcface_{CROP_SIZE}"


@dataclass
class F2DIdentity:
    """One person to inject into a prompt."""

    vectors: Optional[torch.Tensor]  # (2, D) S1*, S2* in float32 on the CPU; None: no face found (pass through)
    placeholder: str
    strength: float
    faces: int
    source: str  # for messages: where the faces came from


def check_pair(msid: MSIDEncoder, mapping: F2DMapping, msid_name: str, mapping_name: str) -> None:
    """Refuse a mapping file that does not read the MSID file's identity vectors (they come from different runs)."""
    if mapping.config.id_dim != msid.feature_dim:
        raise F2DWeightsError(
            f"{mapping_name} takes {mapping.config.id_dim}-d identity vectors, but "
            f"{msid_name} makes {msid.feature_dim}-d ones: the two files do not belong together. "
            "Use the msid and mapping files of one release (official: msid.pt + mapping.pt) or of one training run."
        )


def load_pair(msid_path: str | os.PathLike, mapping_path: str | os.PathLike) -> tuple[MSIDEncoder, F2DMapping]:
    """Both networks on the CPU in eval mode, checked to belong together."""
    msid, mapping = load_msid(msid_path), load_mapping(mapping_path)
    check_pair(msid, mapping, os.path.basename(msid_path), os.path.basename(mapping_path))
    return msid, mapping


def faceset_crops(faceset: FaceSet) -> torch.Tensor:
    """(N, 112, 112, 3) ArcFace-aligned crops of every detected face; made here when the analyzer kept other kinds."""
    crops = []
    for f in faceset.faces:
        crop = f.crops.get(CROP_KIND)
        if crop is None:
            crop = crop_face(faceset.images[f.image_index], f.landmarks, CROP_KIND)
        crops.append(crop)
    return torch.stack(crops).float()


def square_crops(images: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """Already aligned square face images (B, S, S, C) in [0, 1] -> (B, size, size, 3); other sizes are resized
    (bilinear, antialiased: 224 px aligned crops come down to 112 without aliasing)."""
    batch = to_rgb_batch(images)
    _, h, w, _ = batch.shape
    if h != w:
        raise ValueError(
            f"face_crops must be square ArcFace-aligned face crops (e.g. {size}x{size}); got {w}x{h}. "
            "Use Detect Faces and connect its 'faces' output instead."
        )
    if h != size:
        x = F.interpolate(batch.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch = x.clamp(0, 1).permute(0, 2, 3, 1)
    return batch.contiguous()


def identity_crops(faces: Optional[FaceSet], face_crops: Optional[torch.Tensor], who: str) -> Optional[tuple[torch.Tensor, str]]:
    """The aligned crops of one person from either input, with a few words on where they came from; None when
    ``faces`` holds no face and its policy is pass-through (the placeholder then stays plain text)."""
    if faces is not None and face_crops is not None:
        raise ValueError(f"{who}: connect either 'faces' (from Detect Faces) or 'face_crops', not both.")
    if faces is not None:
        if not faces.faces:
            n = int(faces.images.shape[0])
            if faces.no_face_policy == "pass_through":
                log.warning("FaceBooth Face2Diffusion: %s: no face in %d image(s); the placeholder stays plain text.", who, n)
                return None
            raise ValueError(
                f"{who}: Detect Faces found no face in the {n} image(s). Use clearer photos, or set its 'no face' option "
                "to 'pass through' to get the plain prompt instead."
            )
        return faceset_crops(faces), f"{len(faces.faces)} detected face(s)"
    if face_crops is not None:
        return square_crops(face_crops), f"{int(face_crops.shape[0])} face crop(s)"
    raise ValueError(f"{who}: connect 'faces' (from Detect Faces) or 'face_crops' (aligned face images).")


@torch.no_grad()
def identity_word_vectors(msid: MSIDEncoder, mapping: F2DMapping, crops: torch.Tensor,
                          expression: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aligned crops (N, 112, 112, 3) of ONE person -> (2, D) word vectors S1*, S2* (float32, CPU).

    Several photos: their MSID identity vectors are averaged before the mapping networks, like the mean ArcFace
    embedding of an identity. One photo gives exactly the official computation. Without ``expression`` the
    learned ``null_exp`` is used, as in the official inference.
    """
    v_id = encode_identity(msid, crops).float().mean(0, keepdim=True)
    exp, mask = prepare_expression(None if expression is None else expression.reshape(1, -1), 1, mapping.config.exp_dim)
    p = next(mapping.parameters())
    out = mapping(v_id.to(p), None if exp is None else exp.to(p), None if mask is None else mask.to(p))
    return out[0].float().cpu()


def blend_toward_plain(plain: torch.Tensor, vectors: torch.Tensor, strength: float) -> torch.Tensor:
    """h = t + s (S* - t) at the text encoder's input: s = 0 keeps the typed words t, 1 is the official
    replacement, s > 1 extrapolates."""
    if strength == 1.0:
        return vectors
    return plain + strength * (vectors - plain)


def _token_id(entry: Any) -> int:
    tok = entry[0]
    return int(tok) if isinstance(tok, numbers.Integral) else -1  # tensors (embedding:...) never match


def inject_weighted_tokens(chunks: Sequence[Sequence[tuple]], identities: Sequence[F2DIdentity], tokenizer: Any,
                           position_embedding: torch.Tensor, token_embedding: torch.Tensor) -> list[list[tuple]]:
    """A copy of a chunked weighted-token prompt (ComfyUI's tokenizer output for one encoder: per 77-slot window a
    list of ``(token id or tensor, weight, ...)``) with every identity's vectors as tensor tokens at its placeholder
    pair, corrected for the position embedding the encoder adds and blended by the identity's strength
    (:func:`blend_toward_plain`). Identities without a face keep their pair as plain text, but still use it up,
    so the others land where they belong.
    """
    chunks = [list(chunk) for chunk in chunks]
    ids = [[_token_id(e) for e in chunk] for chunk in chunks]
    pos = position_embedding.detach().float().cpu()
    width = pos.shape[-1]
    planned = []
    for k, ident in enumerate(identities):
        vectors = ident.vectors if ident.vectors is not None else torch.zeros(2, width)
        name = f"identity {k + 1} (placeholder '{ident.placeholder}')"
        planned.append(IdentityTokens(placeholder_token_id(tokenizer, ident.placeholder), vectors, name=name))
    plan = plan_chunked_injection(ids, planned, pos)
    second_word = placeholder_token_id(tokenizer, "l")
    for k, (c, s, corrected) in enumerate(plan):
        ident = identities[k // 2]
        if ident.vectors is None:
            continue
        if k % 2 == 1 and ids[c][s] != second_word:
            log.warning(
                "FaceBooth Face2Diffusion: the token after placeholder '%s' is replaced too; the weights were trained with "
                "the pair written '%s l'.", ident.placeholder, ident.placeholder)
        old = chunks[c][s]
        plain = old[0] if torch.is_tensor(old[0]) else token_embedding[int(old[0])]
        chunks[c][s] = (blend_toward_plain(plain.detach().float().cpu().reshape(-1), corrected, ident.strength), *old[1:])
    return chunks


__all__ = [
    "CROP_SIZE",
    "F2DIdentity",
    "blend_toward_plain",
    "check_pair",
    "faceset_crops",
    "identity_crops",
    "identity_word_vectors",
    "inject_weighted_tokens",
    "load_pair",
    "square_crops",
]
