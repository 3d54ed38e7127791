"""Put Face2Diffusion's two word vectors into a CLIP text encoder, exactly as the official code does.

Official rule: find the first occurrence of the placeholder token (the BPE token ``f</w>`` of the word "f";
prompts are written "... f l ...") in the prompt ids, BOS included, at position ``p``. The text encoder's
embedding layer output (token embedding + position embedding) is computed, rows ``p`` and ``p + 1`` are
**replaced** by S1* and S2* (so the injected vectors carry no position embedding), and the CLIP encoder
layers and final LayerNorm run on the result. The last hidden state is the conditioning.

Extensions beyond the paper: the placeholder word is user-choosable, and several identities can share one
prompt, each (placeholder id, vectors) pair taking the first occurrence of its placeholder not already used.

Two entry points:
- :func:`encode_with_identities` for a transformers-style CLIP text model (training, diffusers, tests);
- :func:`plan_chunked_injection` for hosts that add position embeddings to injected tensor tokens
  (ComfyUI): it returns ``vector - position_embedding[slot]`` per slot, so the host's sum equals the official
  replacement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

DEFAULT_PLACEHOLDER = "f"  # official: the prompt contains "f l"; "f" marks the slot of S1*, "l" is overwritten by S2*
TOKENS_PER_IDENTITY = 2


class PlaceholderError(ValueError):
    """The prompt does not contain (enough) placeholders, or they do not fit."""


@dataclass
class IdentityTokens:
    """One identity to inject: its placeholder token id and its vectors (2, D) or per-sample (B, 2, D)."""

    placeholder_id: int
    vectors: torch.Tensor
    name: str = "identity"  # only used in error messages


def placeholder_token_id(tokenizer: Any, word: str = DEFAULT_PLACEHOLDER) -> int:
    """The single BPE token id of ``word`` (a Hugging Face CLIP tokenizer; "f" -> 325 in the SD1 vocabulary).

    The official code takes the first token after BOS; a word that splits into several tokens would then match
    only its first piece, so such words are refused here.
    """
    word = (word or "").strip()
    if not word or " " in word:
        raise PlaceholderError(f"The placeholder must be one short word such as 'f', got {word!r}.")
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise PlaceholderError(
            f"The placeholder {word!r} is {len(ids)} CLIP tokens; pick a word that is a single token (the official one is 'f')."
        )
    return int(ids[0])


def find_identity_slots(ids: Sequence[int], placeholder_ids: Sequence[int], names: Optional[Sequence[str]] = None) -> list[int]:
    """First unused occurrence of each placeholder in ``ids``: the slot of S1* (S2* goes into slot + 1).

    Occurrences inside a pair already taken by an earlier identity are skipped, so "f l and f l" with two
    identities on "f" gives slots [p1, p2]. Raises :class:`PlaceholderError` with a message that says what to type.
    """
    ids = [int(i) for i in ids]
    names = list(names) if names is not None else [f"identity {k + 1}" for k in range(len(placeholder_ids))]
    taken: set[int] = set()
    slots = []
    for k, pid in enumerate(placeholder_ids):
        slot = next((i for i, t in enumerate(ids) if t == pid and i not in taken), None)
        if slot is None:
            count = sum(1 for t in ids if t == pid)
            raise PlaceholderError(
                f"The prompt has no free placeholder for {names[k]} (token id {pid} occurs {count} time(s) for "
                f"{len(placeholder_ids)} identities). Write the placeholder pair, e.g. 'a photo of f l', once per identity."
            )
        if slot + 1 >= len(ids) or slot + 1 in taken:
            raise PlaceholderError(
                f"The placeholder for {names[k]} at position {slot} has no free next token to carry the second vector. "
                "Write the pair as 'f l' with a word after the placeholder."
            )
        taken.update((slot, slot + 1))
        slots.append(slot)
    return slots


def _vectors_for_row(tokens: IdentityTokens, row: int, batch: int) -> torch.Tensor:
    v = tokens.vectors
    if v.ndim == 2:
        return v
    if v.ndim == 3 and v.shape[0] in (1, batch):
        return v[0 if v.shape[0] == 1 else row]
    raise ValueError(f"{tokens.name}: vectors must be (2, D) or (B, 2, D) with B = {batch}, got {tuple(v.shape)}.")


def _check_width(identities: Sequence[IdentityTokens], width: int) -> None:
    for t in identities:
        if t.vectors.shape[-2:] != (TOKENS_PER_IDENTITY, width):
            raise ValueError(
                f"{t.name}: Face2Diffusion makes {TOKENS_PER_IDENTITY} word vectors of width {t.vectors.shape[-1]}, but this "
                f"text encoder is {width} wide. The official weights are for SD1.x (CLIP-L, 768); SD2.x/SDXL are not supported."
            )


def replace_identity_rows(hidden: torch.Tensor, input_ids: torch.Tensor, identities: Sequence[IdentityTokens]) -> torch.Tensor:
    """Post-embedding hidden state (B, L, D) -> a copy whose placeholder rows are the identity vectors.

    Out of place and differentiable with respect to the vectors (training backpropagates through it).
    """
    if not identities:
        return hidden
    _check_width(identities, hidden.shape[-1])
    out = hidden.clone()
    batch = hidden.shape[0]
    pids = [t.placeholder_id for t in identities]
    names = [t.name for t in identities]
    for b in range(batch):
        row_ids = input_ids[b].tolist()
        for t, slot in zip(identities, find_identity_slots(row_ids, pids, names)):
            out[b, slot : slot + TOKENS_PER_IDENTITY] = _vectors_for_row(t, b, batch).to(out.dtype)
    return out


def _embedding_module(text_encoder: nn.Module) -> nn.Module:
    # transformers 4.x: CLIPTextModel.text_model.embeddings; 5.x: CLIPTextModel.embeddings.
    inner = getattr(text_encoder, "text_model", text_encoder)
    emb = getattr(inner, "embeddings", None)
    if emb is None:
        raise TypeError(f"{type(text_encoder).__name__} has no CLIP 'embeddings' module; pass a transformers CLIPTextModel.")
    return emb


def encode_with_identities(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    identities: Sequence[IdentityTokens],
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Any:
    """Run a transformers CLIP text model with the identity vectors in place of the placeholder pairs.

    The replacement happens on the embedding layer's output (token + position embedding), before the encoder
    layers, as in the official code. Returns the model's own output; ``[0]`` / ``.last_hidden_state`` is the
    conditioning (SD1: last layer, final LayerNorm applied).
    """
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    emb = _embedding_module(text_encoder)

    def _inject(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return replace_identity_rows(output, input_ids, identities)

    handle = emb.register_forward_hook(_inject)
    try:
        return text_encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()


# --- hosts that add position embeddings to injected tokens (ComfyUI) -------------------------------------


def position_corrected(vectors: torch.Tensor, position_embedding: torch.Tensor, slot: int) -> torch.Tensor:
    """``vectors[k] - position_embedding[slot + k]`` in float32, so that a host adding the slot's position
    embedding to an injected token ends with exactly the official replacement (up to float32 rounding)."""
    n = vectors.shape[-2]
    if slot < 0 or slot + n > position_embedding.shape[0]:
        raise PlaceholderError(f"Slot {slot} + {n} tokens does not fit in {position_embedding.shape[0]} positions.")
    pos = position_embedding[slot : slot + n].to(device=vectors.device, dtype=torch.float32)
    return vectors.to(torch.float32) - pos


def plan_chunked_injection(
    chunks: Sequence[Sequence[int]],
    identities: Sequence[IdentityTokens],
    position_embedding: torch.Tensor,
) -> list[tuple[int, int, torch.Tensor]]:
    """Where to put each identity vector in a host's chunked token list, position-corrected.

    ``chunks``: the prompt as the host tokenized it, one list of ids per text-encoder window (ComfyUI: 77 slots
    with BOS at 0), slot index = position id. Returns ``(chunk, slot, vector (D,))`` triples, two per identity,
    with ``vector = S_k* - position_embedding[slot]``. The host replaces token ``chunks[chunk][slot]`` with that
    tensor. Placeholders are matched in reading order across chunks; a pair may not straddle a chunk boundary.
    """
    flat: list[int] = []
    where: list[tuple[int, int]] = []
    for c, chunk in enumerate(chunks):
        for s, tok in enumerate(chunk):
            flat.append(int(tok))
            where.append((c, s))
    _check_width(identities, position_embedding.shape[-1])
    for t in identities:
        if t.vectors.ndim != 2:
            raise ValueError(f"{t.name}: give one (2, D) vector pair per identity when injecting into a host prompt.")
    slots = find_identity_slots(flat, [t.placeholder_id for t in identities], [t.name for t in identities])
    plan = []
    for t, flat_slot in zip(identities, slots):
        (c0, s0), (c1, s1) = where[flat_slot], where[flat_slot + 1]
        # Hosts close every chunk with an end token: "f" as the chunk's last word would put S2* on that end
        # token while the user's "l" sits in the next chunk.
        split = c0 != c1 or (s1 == len(chunks[c0]) - 1 and c0 < len(chunks) - 1)
        if split:
            raise PlaceholderError(
                f"The placeholder pair of {t.name} is split across two 77-token chunks; move it, or add BREAK before it."
            )
        corrected = position_corrected(t.vectors, position_embedding, s0)
        plan.extend([(c0, s0, corrected[0]), (c0, s0 + 1, corrected[1])])
    return plan
