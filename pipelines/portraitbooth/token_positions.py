"""Find the subject word(s) in a prompt that a host has already tokenized, weights and embeddings included.

The STEA output replaces the text-encoder output at the subject word's position, so the position must be
right whatever the prompt looks like: weight syntax ``(man:1.2)``, textual-inversion embeddings (tensor
tokens), prompts longer than one 77-token window (several chunks, each with its own start/end tokens),
and words that occur more than once.

The search works on token ids, never on space-separated word counts or the host's word ids (ComfyUI's
word ids number prompt segments, not words). The subject word is tokenized on its own; its BPE ids must
then occur as a run in the prompt that starts at a word boundary. The fused slot is the run's **last**
token: FastComposer marks the token right before its image marker, which is the noun's last BPE piece.

Several subjects are matched in reading order; each takes the first occurrence of its word that no earlier
subject took, so "a man and a man" with subjects "man, man" gives both positions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

SUBJECT_SEPARATORS = re.compile(r"[,;\n|]+")


class SubjectWordError(ValueError):
    """A subject word is missing from the prompt, empty, or cannot be located."""


@dataclass(frozen=True)
class SubjectMatch:
    subject: str
    chunk: int  # which text-encoder window
    slot: int  # position inside that window (0 = start token)
    position: int  # row in the concatenated conditioning (chunk offsets + slot)
    weight: float  # the prompt weight the host gave that token (1.0 unless "(word:w)")


def parse_subject_words(text: str) -> list[str]:
    """"man, woman" -> ["man", "woman"]. Commas, semicolons, '|' or new lines separate subjects."""
    words = [w.strip() for w in SUBJECT_SEPARATORS.split(text or "")]
    words = [w for w in words if w]
    if not words:
        raise SubjectWordError(
            "No subject word given. Type the word in the prompt that stands for the person, e.g. 'man' or "
            "'woman' (several subjects: 'man, woman')."
        )
    return words


def token_id(token: Any) -> Optional[int]:
    """The integer id of a host token, or None for tensor tokens (embeddings) and other non-int entries."""
    if isinstance(token, bool):
        return None
    if isinstance(token, int):
        return token
    try:  # numpy / 0-d torch integers
        import numbers

        if isinstance(token, numbers.Integral):
            return int(token)
    except Exception:  # pragma: no cover - defensive
        pass
    return None


def find_subject_positions(
    chunks: Sequence[Sequence[Any]],
    subjects: Sequence[str],
    subject_ids: Sequence[Sequence[int]],
    *,
    weights: Optional[Sequence[Sequence[float]]] = None,
    is_word_end: Optional[Callable[[int], bool]] = None,
    special_ids: Sequence[int] = (),
) -> list[SubjectMatch]:
    """Locate every subject in a chunked token list.

    ``chunks``: the prompt as the host tokenized it, one token list per text-encoder window; a token is an int
    id or anything else (an embedding vector), which never matches. ``subject_ids``: each subject's BPE ids on
    their own (no start/end tokens). ``is_word_end(id)``: whether a token ends a word (CLIP BPE: ends with
    ``</w>``); with it a match must start right after a word end, a special token or an embedding, so
    "man" is not found inside "woman" even for tokenizers that split that way. ``special_ids``: start / end /
    pad ids, which never match.
    """
    if len(subjects) != len(subject_ids):
        raise ValueError("one id sequence per subject is needed")
    specials = set(int(s) for s in special_ids)
    flat: list[Optional[int]] = []
    where: list[tuple[int, int, int, float]] = []  # (chunk, slot, position, weight)
    offset = 0
    for c, chunk in enumerate(chunks):
        for s, tok in enumerate(chunk):
            tid = token_id(tok)
            flat.append(None if tid is None or tid in specials else tid)
            w = float(weights[c][s]) if weights is not None else 1.0
            where.append((c, s, offset + s, w))
        offset += len(chunk)

    def starts_word(i: int) -> bool:
        if i == 0 or is_word_end is None:
            return True
        prev = flat[i - 1]
        return prev is None or is_word_end(prev)

    taken: set[int] = set()
    matches: list[SubjectMatch] = []
    for name, ids in zip(subjects, subject_ids):
        ids = [int(i) for i in ids]
        if not ids:
            raise SubjectWordError(f"The subject word {name!r} gives no tokens; use a plain word such as 'man'.")
        n = len(ids)
        hit = None
        count = 0
        for i in range(len(flat) - n + 1):
            if flat[i : i + n] == ids and where[i][0] == where[i + n - 1][0] and starts_word(i):
                count += 1
                if hit is None and (i + n - 1) not in taken:
                    hit = i + n - 1
        if hit is None:
            if count == 0:
                raise SubjectWordError(
                    f"The subject word {name!r} does not occur in the prompt. Write it in the prompt (e.g. "
                    f"'a photo of a {name}') or change the subject word to the word the prompt uses for the person."
                )
            raise SubjectWordError(
                f"The subject word {name!r} occurs {count} time(s), but {sum(1 for s in subjects if s == name)} "
                "subjects use it. Write the word once per subject."
            )
        taken.add(hit)
        c, s, pos, w = where[hit]
        matches.append(SubjectMatch(subject=name, chunk=c, slot=s, position=pos, weight=w))
    return matches
