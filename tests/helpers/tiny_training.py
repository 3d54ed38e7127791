"""Small builders the training tests share: a real CLIP BPE tokenizer over a few words, and PNG writing.

    from helpers.tiny_training import save_png, write_clip_tokenizer
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_clip_tokenizer(folder: Path, words: Sequence[str]) -> int:
    """vocab.json + merges.txt of a CLIP BPE tokenizer in which each of ``words`` is one token; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[str] = []
    for c in sorted(set("".join(words))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def save_png(arr: np.ndarray, path: Path) -> None:
    """(H, W, 3) floats in [0, 1] (clipped) -> 8-bit PNG, creating the folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)
