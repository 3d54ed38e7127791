"""Prompt creation and concept-token injection (paper Sec. 3.2).

The prompt reads "... sks person ...": the identifier sits right before the class noun. The text encoder runs
on that prompt unchanged; afterwards its OUTPUT row at the identifier is replaced by the concept vector f_c
(the paper's ablation shows that injecting before the text encoder is worse).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

DEFAULT_IDENTIFIER = "sks"
# Coarse descriptions of the "person" category (paper Sec. 3.2 / 4.1).
PERSON_NOUNS: tuple[str, ...] = (
    "person", "man", "woman", "boy", "girl", "baby", "lady", "child", "kid", "guy", "gentleman", "toddler",
    "teenager", "men", "women",
)


class IdentifierError(ValueError):
    """The prompt has no place for the concept token."""


def has_word(prompt: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", prompt, flags=re.IGNORECASE) is not None


def insert_identifier(prompt: str, identifier: str = DEFAULT_IDENTIFIER, class_nouns: Sequence[str] = PERSON_NOUNS) -> str:
    """Return ``prompt`` with ``identifier`` before the first class noun; unchanged when it already has it.

    "a photo of a woman playing guitar" -> "a photo of a sks woman playing guitar".
    """
    if has_word(prompt, identifier):
        return prompt
    pattern = r"(?<![\w])(" + "|".join(re.escape(n) for n in sorted(class_nouns, key=len, reverse=True)) + r")(?![\w])"
    m = re.search(pattern, prompt, flags=re.IGNORECASE)
    if m is None:
        raise IdentifierError(
            f"The prompt has neither the identifier '{identifier}' nor a class noun ({', '.join(class_nouns[:6])}, ...) "
            f"to put it before. Write it like 'a photo of {identifier} person ...'."
        )
    return prompt[: m.start()] + identifier + " " + prompt[m.start():]


def identifier_rows(chunks: Sequence[Sequence[int]], identifier_id: int) -> list[int]:
    """Rows of the text-encoder output that hold the identifier.

    ``chunks``: the prompt's token ids as the host encodes it, one list per text-encoder window (ComfyUI: 77
    tokens each, outputs concatenated); the row of token ``s`` of chunk ``c`` is ``c * len(chunk) + s``.
    """
    rows = []
    offset = 0
    for chunk in chunks:
        # hosts may put embedding tensors in token slots (textual inversions): never the identifier
        rows.extend(offset + s for s, t in enumerate(chunk) if isinstance(t, int) and t == int(identifier_id))
        offset += len(chunk)
    if not rows:
        raise IdentifierError(f"The identifier token (id {identifier_id}) is not in the tokenized prompt.")
    return rows


def inject_concept(cond: torch.Tensor, rows: Sequence[int], concept: torch.Tensor) -> torch.Tensor:
    """A copy of ``cond`` (B, L, D) whose ``rows`` are ``concept`` ((D,) or per sample (B, D)).

    Out of place and differentiable with respect to ``concept`` (training backpropagates into E_c).
    """
    if concept.shape[-1] != cond.shape[-1]:
        raise ValueError(
            f"The concept vector is {concept.shape[-1]} wide but the text encoder gives {cond.shape[-1]}: "
            "this InstantBooth file was trained for another text encoder (SD1.x: 768)."
        )
    if max(rows) >= cond.shape[1]:
        raise IndexError(f"Identifier row {max(rows)} is outside the conditioning of length {cond.shape[1]}.")
    idx = torch.as_tensor(list(rows), device=cond.device)
    vec = concept.to(device=cond.device, dtype=cond.dtype)
    vec = vec.expand(cond.shape[0], -1) if vec.ndim == 1 else vec
    out = cond.clone()
    out[:, idx] = vec[:, None, :].expand(-1, len(idx), -1)
    return out
