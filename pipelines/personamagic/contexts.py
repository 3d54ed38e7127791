"""The two text contexts PersonaMagic gives the UNet: K from the injected tokens, V with the bypass added.

As the official code (``reference/methods.md`` §3.3):

* input level: the token embedding at each placeholder slot i is replaced by the mapper's base token i
  (position embeddings are added afterwards, the normal CLIP path);
* output level: after the last encoder layer and *before* the final LayerNorm, the hidden state h at slot i
  becomes normalize(bypass_i + h)·‖h‖; the final LayerNorm then runs on both versions;
* the UNet's cross-attention takes K = to_k(context) and V = to_v(context with bypass).

SDXL (``KVText`` with CLIP-L and CLIP-G): each encoder gets its part of every token (768 + 1280 of the mapper's
2048), the bypass acts on each encoder's penultimate state (SDXL's context has no final LayerNorm), and K and V
are CLIP-L ‖ CLIP-G, 2048 wide, as ComfyUI concatenates them. CLIP-G's pooled output of the K prompt (tokens
injected, no bypass) goes with it, for the UNet's ``y``.

Placeholders: the user writes one trigger word (``<persona>`` by default); it stands for N consecutive
tokens, spelled internally as ``<fb_pm_0> … <fb_pm_{N-1}>`` (the official ``<new1> … <new4>``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..text_encoder import CLIPTextEncoder, PromptTokenizer, tokenize_with_slots

DEFAULT_TRIGGER = "<persona>"
SUPERCATEGORY = "face"


def internal_placeholders(n: int) -> list[str]:
    return [f"<fb_pm_{i}>" for i in range(n)]


def _trigger_pattern(trigger: str) -> re.Pattern:
    # whole word only: "<persona>s" or "sksman" must not match "<persona>" / "sks"
    return re.compile(r"(?<![\w<>])" + re.escape(trigger) + r"(?![\w<>])")


def check_trigger(prompt: str, trigger: str) -> None:
    if not trigger or not trigger.strip() or any(ch.isspace() for ch in trigger.strip()):
        raise ValueError(f"The trigger word {trigger!r} must be one word without spaces, such as '<persona>'.")
    if not _trigger_pattern(trigger.strip()).search(prompt):
        raise ValueError(
            f"The prompt does not contain the trigger word {trigger!r}. Write it where the person goes, "
            f"for example 'a photo of {trigger} wearing a hat'."
        )


def expand_trigger(prompt: str, trigger: str, n: int) -> str:
    """The prompt with the trigger replaced by the N internal placeholder strings."""
    check_trigger(prompt, trigger)
    return _trigger_pattern(trigger.strip()).sub(" ".join(internal_placeholders(n)), prompt)


def supercategory_prompt(prompt: str, trigger: str, supercategory: str = SUPERCATEGORY) -> str:
    """The first static stage's prompt: the trigger replaced by the supercategory word ("face")."""
    check_trigger(prompt, trigger)
    return _trigger_pattern(trigger.strip()).sub(supercategory, prompt)


def supercategory_embedding(encoder: CLIPTextEncoder, tokenizer: PromptTokenizer, word: str = SUPERCATEGORY) -> torch.Tensor:
    """The raw token-embedding row of the supercategory word (must be a single BPE token, as "face" is)."""
    ids = tokenizer.ids(word)
    if len(ids) != 1:
        raise ValueError(f"The supercategory {word!r} is {len(ids)} CLIP tokens; use a single-token word such as 'face'.")
    return encoder.embeddings.token_embedding.weight[ids[0]].detach().float().clone()


@dataclass
class KVContexts:
    key: torch.Tensor  # (B, L, D): what the UNet's to_k sees (and the CONDITIONING tensor)
    value: torch.Tensor  # (B, L, D): what to_v sees; equals key outside the placeholder slots
    slot_ids: torch.Tensor  # (B, L) long: placeholder index per position, -1 elsewhere
    attention_probs: Optional[torch.Tensor] = None  # (B, heads, L, L) of the last text-encoder layer
    pooled: Optional[torch.Tensor] = None  # (B, projection_dim): SDXL's pooled CLIP-G output of the K prompt


class PromptCache:
    """Tokenizations of the few dozen prompt templates a run uses, computed once."""

    def __init__(self, tokenizer: PromptTokenizer):
        self.tokenizer = tokenizer
        self._cache: dict = {}

    def __call__(self, prompts: Sequence[str], placeholders: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = []
        for p in prompts:
            key = (p, tuple(placeholders))
            if key not in self._cache:
                self._cache[key] = tokenize_with_slots(self.tokenizer, p, placeholders)
            pairs.append(self._cache[key])
        ids = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
        slots = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
        return ids, slots


def apply_bypass(hidden: torch.Tensor, slot_ids: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
    """normalize(bypass_i + h)·‖h‖ at the slots of ``hidden`` (B, L, D); other rows unchanged. Out of place."""
    b = bypass.to(hidden.dtype)
    b = b.unsqueeze(0).expand(hidden.shape[0], -1, -1) if b.dim() == 2 else b
    idx = slot_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    rows = torch.gather(b, 1, idx)  # (B, L, D): the bypass for each position's slot
    norm = hidden.norm(dim=-1, keepdim=True)
    mixed = F.normalize(rows + hidden, dim=-1) * norm
    # a zero bypass (dropped in training) leaves h as it is, bit for bit, rather than renormalised
    active = (slot_ids >= 0) & (rows != 0).any(-1)
    return torch.where(active.unsqueeze(-1), mixed, hidden)


def encode_kv(
    encoder: CLIPTextEncoder,
    ids: torch.Tensor,
    slot_ids: torch.Tensor,
    base: torch.Tensor,
    bypass: Optional[torch.Tensor] = None,
    output_attentions: bool = False,
    pooled_positions: Optional[torch.Tensor] = None,
) -> KVContexts:
    """K and V contexts for token ``ids`` with ``base`` (N, D) / (B, N, D) injected at ``slot_ids``.

    The pre-LayerNorm hidden state is taken with a forward hook on ``final_layer_norm`` so the K path is
    exactly ``encoder.forward``. ``pooled_positions`` (B,): also the pooled output (an encoder built ``pooled``).
    """
    captured: dict[str, torch.Tensor] = {}
    use_ln = encoder.config.final_layer_norm
    handle = None
    if use_ln and bypass is not None:
        handle = encoder.final_layer_norm.register_forward_hook(lambda m, args, out: captured.__setitem__("pre", args[0]))
    try:
        out = encoder(ids, slot_ids=slot_ids, slot_vectors=base, output_attentions=output_attentions,
                      pooled_positions=pooled_positions)
    finally:
        if handle is not None:
            handle.remove()
    key = out.last_hidden_state
    if bypass is None:
        value = key
    else:
        pre = captured["pre"] if use_ln else key
        mixed = apply_bypass(pre, slot_ids, bypass)
        value = encoder.final_layer_norm(mixed) if use_ln else mixed
        # the LayerNorm is per position: rows the bypass left alone are K's rows; take them from K, bit for bit
        value = torch.where((mixed != pre).any(-1, keepdim=True), value, key)
    return KVContexts(key=key, value=value, slot_ids=slot_ids, attention_probs=out.attention_probs, pooled=out.pooled)


class KVText:
    """The text side of PersonaMagic over one text encoder (SD1.x, SD2.x) or several (SDXL: CLIP-L then CLIP-G,
    in the order of the UNet's context). An encoder built with a text projection gives the pooled output."""

    def __init__(self, towers: Sequence[tuple[CLIPTextEncoder, PromptTokenizer]]):
        if not towers:
            raise ValueError("PersonaMagic needs at least one text encoder")
        self.encoders = [enc for enc, _ in towers]
        self.tokenizers = [tok for _, tok in towers]
        self.caches = [PromptCache(tok) for tok in self.tokenizers]
        self.dims = [enc.hidden_size for enc in self.encoders]

    @property
    def device(self) -> torch.device:
        return self.encoders[0].embeddings.token_embedding.weight.device

    @property
    def word_dims(self) -> Optional[tuple[int, ...]]:
        """The mapper config's ``word_dims``: None for one encoder."""
        return tuple(self.dims) if len(self.dims) > 1 else None

    def split(self, rows: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """A (…, ΣD) tensor of the mapper as one (…, D_i) part per encoder."""
        if rows is None or len(self.dims) == 1:
            return [rows] * len(self.dims)
        return list(rows.split(self.dims, dim=-1))

    def tokens(self, prompts: Sequence[str], placeholders: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [cache(prompts, placeholders, self.device) for cache in self.caches]

    def _pooled_positions(self, enc: CLIPTextEncoder, tok: PromptTokenizer, ids: torch.Tensor) -> Optional[torch.Tensor]:
        # the first end-of-text token, where ComfyUI reads the pooled output
        return (ids == tok.eos_id).int().argmax(dim=-1) if enc.config.projection_dim else None

    def encode(
        self, prompts: Sequence[str], placeholders: Sequence[str], base: torch.Tensor,
        bypass: Optional[torch.Tensor] = None,
    ) -> KVContexts:
        """K and V contexts (B, L, ΣD) of ``prompts`` with the mapper's ``base`` / ``bypass`` (…, N, ΣD)."""
        parts = []
        for enc, tok, (ids, slots), b, v in zip(self.encoders, self.tokenizers, self.tokens(prompts, placeholders),
                                                self.split(base), self.split(bypass)):
            parts.append(encode_kv(enc, ids, slots, b, v, pooled_positions=self._pooled_positions(enc, tok, ids)))
        if len(parts) == 1:
            return parts[0]
        pooled = next((p.pooled for p in parts if p.pooled is not None), None)
        return KVContexts(
            key=torch.cat([p.key for p in parts], dim=-1), value=torch.cat([p.value for p in parts], dim=-1),
            slot_ids=parts[0].slot_ids, pooled=pooled,
        )

    def encode_plain(self, prompts: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The context (B, L, ΣD) and pooled output (or None) of prompts without placeholders."""
        hidden, pooled = [], None
        for enc, tok, (ids, _) in zip(self.encoders, self.tokenizers, self.tokens(prompts, [])):
            out = enc(ids, pooled_positions=self._pooled_positions(enc, tok, ids))
            hidden.append(out.last_hidden_state)
            pooled = out.pooled if out.pooled is not None else pooled
        return (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)), pooled

    def supercategory_embedding(self, word: str = SUPERCATEGORY) -> torch.Tensor:
        """The supercategory word's raw token rows, one per encoder, concatenated (ΣD,)."""
        rows = [supercategory_embedding(enc, tok, word) for enc, tok in zip(self.encoders, self.tokenizers)]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

