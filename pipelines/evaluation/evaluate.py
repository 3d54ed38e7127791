"""Score every image of a run under a protocol: identity, detection, CLIP score and CLIP-I, one row per image.

Work is batched: a chunk of images is decoded once, faces are detected and cropped per image, then one
recognizer pass and one CLIP image pass serve the whole chunk. Text features are computed once per
distinct sentence and reference features once per reference file.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from ..runtime import NO_HOOKS, RunHooks
from .clip_score import ClipScorer, clip_score_from_cosine
from .identity import IdentityScorer
from .protocols import Protocol
from .runs import EvalItem


@dataclass
class ScoredImage:
    file: str
    method: str
    setting: str
    subject: str
    seed: str
    prompt: str
    text_prompt: str
    category: str
    face_found: Optional[bool]  # None: no identity scoring (no reference or no face model)
    identity: float  # NaN: left out of the identity mean (no face under 'exclude', excluded category, no reference)
    text: float
    clip_i: float  # NaN without a reference image

    def as_dict(self) -> dict:
        return asdict(self)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass
class _Reference:
    identity: Optional[torch.Tensor]
    clip: torch.Tensor


def evaluate_items(
    items: Sequence[EvalItem],
    protocol: Protocol,
    clip: ClipScorer,
    identity: Optional[IdentityScorer] = None,
    *,
    triggers: Sequence[str] = (),
    categories: Optional[set[str]] = None,
    batch_size: int = 16,
    hooks: RunHooks = NO_HOOKS,
) -> list[ScoredImage]:
    refs: dict[Path, _Reference] = {}
    texts: dict[str, torch.Tensor] = {}
    out: list[ScoredImage] = []
    todo = [it for it in items if categories is None or (it.category or _category(protocol, it, triggers)) in categories]
    total = len(todo)
    hooks.progress(0, total, None)
    for start in range(0, total, batch_size):
        hooks.check_interrupt()
        chunk = todo[start:start + batch_size]
        for it in chunk:
            if it.face is not None and it.face not in refs:
                ref_img = _open(it.face)
                refs[it.face] = _Reference(
                    identity=identity.reference([ref_img]) if identity is not None else None,
                    clip=clip.encode_images([ref_img])[0],
                )
        images = [_open(it.file) for it in chunk]
        sentences = [protocol.text_prompt(it.prompt, it.subject, triggers) for it in chunk]
        new = sorted({s for s in sentences if s not in texts})
        if new:
            texts.update(zip(new, clip.encode_texts(new)))
        image_feats = clip.encode_images(images)
        embeddings = identity.embed(images) if identity is not None else [None] * len(images)
        for it, sentence, feat, emb in zip(chunk, sentences, image_feats, embeddings):
            category = it.category or protocol.category_of(sentence, it.subject)
            ref = refs.get(it.face) if it.face is not None else None
            text = float(clip_score_from_cosine(feat @ texts[sentence], protocol.clip_scale, protocol.clip_clamp_min))
            clip_i = float(feat @ ref.clip) if ref is not None else math.nan
            found: Optional[bool] = None
            ident = math.nan
            if identity is not None and ref is not None:
                found = emb is not None
                if category not in protocol.exclude_categories:
                    ident = identity.value(ref.identity, emb)
            out.append(ScoredImage(
                file=str(it.file), method=it.method, setting=it.setting, subject=it.subject, seed=it.seed,
                prompt=it.prompt, text_prompt=sentence, category=category, face_found=found,
                identity=ident, text=text, clip_i=clip_i,
            ))
        hooks.progress(min(start + batch_size, total), total, None)
    return out


def _category(protocol: Protocol, it: EvalItem, triggers: Sequence[str]) -> str:
    return protocol.category_of(protocol.text_prompt(it.prompt, it.subject, triggers), it.subject)
