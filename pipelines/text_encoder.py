"""An autograd-safe CLIP text encoder built from an HF-layout CLIP text state dict.

Why it exists: ComfyUI's own CLIP adds residuals in place, so gradients cannot flow back to the input
embeddings. Textual-inversion style methods (Cross Initialization, PersonaMagic) optimise token
embeddings through the text encoder, so they run this module instead, built from the host's weights:

* diffusers / transformers ``text_encoder`` state dicts (``text_model.embeddings...`` or, transformers 5,
  ``embeddings...``),
* ComfyUI's ``clip.get_sd()`` (``clip_l.transformer.text_model...``, ``clip_h.`` for SD2, ``clip_g.`` for SDXL).

Layer choice: SD1 uses the last layer + final LayerNorm; SD2 (ComfyUI, full 24-layer OpenCLIP-H tower)
uses the penultimate layer + final LayerNorm, which is what diffusers ships as a 23-layer tower with
"last". SDXL uses the penultimate layer *without* the final LayerNorm. Layers past the chosen one are
not built at all.

Injection: rows of the *token* embedding (before position embeddings are added) can be replaced per
position by learnable vectors; this is where textual-inversion embeddings and ComfyUI embedding files
live. The attention probabilities of the last layer that runs can be returned for attention losses.

Pooled output (SDXL's CLIP-G, ``pooled=True``): the UNet's ``y`` gets the *last* layer's output, after the
final LayerNorm, at the first end-of-text position, through ``text_projection`` (as ComfyUI's CLIP computes
it), while the cross-attention context is the penultimate layer. Then every layer is built and run, and
``last_hidden_state`` is taken after the chosen one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

from einops import rearrange
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LayerChoice = Union[str, int]  # "last" | "penultimate" | a layer index (negative counts from the end)

_TOKEN_EMB = "embeddings.token_embedding.weight"
_POS_EMB = "embeddings.position_embedding.weight"


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class CLIPTextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12  # layers that are built and run (already cut at the chosen output layer)
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    final_layer_norm: bool = True  # SDXL's towers skip it on the penultimate output
    hidden_layers: Optional[int] = None  # layers before last_hidden_state (None: all); fewer when pooled
    projection_dim: int = 0  # > 0: a text_projection (no bias) gives the pooled output


@dataclass
class TextEncoderOutput:
    last_hidden_state: torch.Tensor  # (B, L, D): output of the chosen layer (+ final LN when configured)
    attention_probs: Optional[torch.Tensor] = None  # (B, heads, L, L) of the last layer run, post-softmax
    pooled: Optional[torch.Tensor] = None  # (B, projection_dim): projected last-layer output at end-of-text


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        d = config.hidden_size
        if d % config.num_heads:
            raise ValueError(f"hidden size {d} is not divisible by {config.num_heads} heads")
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, want_probs: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if want_probs:
            # Explicit softmax so the probabilities themselves can carry a loss.
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
            probs = scores.softmax(dim=-1)
            out = probs @ v
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.out_proj(out), probs


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {config.hidden_act!r}; use one of {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, want_probs: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        attn, probs = self.self_attn(self.layer_norm1(x), want_probs)
        x = x + attn  # out of place: gradients must reach the input embeddings
        x = x + self.mlp(self.layer_norm2(x))
        return x, probs


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_layers)])


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer; submodule names follow HF (``embeddings``, ``encoder.layers.N``, ``final_layer_norm``)."""

    def __init__(self, config: CLIPTextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw rows of the token-embedding table (no position embedding)."""
        return self.embeddings.token_embedding(input_ids)

    def inject(self, token_embeds: torch.Tensor, slot_ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Replace token embeddings where ``slot_ids >= 0`` by ``vectors[slot_ids]``.

        ``slot_ids``: (B, L) long, -1 where the tokenizer's row stays. ``vectors``: (K, D) shared by the batch,
        or (B, K, D) per sample. Out of place, so gradients reach ``vectors``.
        """
        if slot_ids.shape != token_embeds.shape[:2]:
            raise ValueError(f"slot_ids shape {tuple(slot_ids.shape)} != token shape {tuple(token_embeds.shape[:2])}")
        vectors = vectors.to(token_embeds.dtype)
        idx = slot_ids.clamp(min=0)
        if vectors.dim() == 2:
            rows = vectors[idx]  # (B, L, D)
        elif vectors.dim() == 3:
            rows = torch.gather(vectors, 1, idx.unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))
        else:
            raise ValueError(f"vectors must be (K, D) or (B, K, D), got {tuple(vectors.shape)}")
        return torch.where((slot_ids >= 0).unsqueeze(-1), rows, token_embeds)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        slot_ids: Optional[torch.Tensor] = None,
        slot_vectors: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        pooled_positions: Optional[torch.Tensor] = None,
    ) -> TextEncoderOutput:
        """Encode token ids, or token embeddings (``inputs_embeds``, position embeddings not yet added).

        With ``slot_ids``/``slot_vectors`` the token embeddings at the slots are replaced first.
        ``pooled_positions`` (B,): where the pooled output is read (the first end-of-text token); without them
        no pooled output is computed and the layers after the hidden one are skipped.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.token_embeddings(input_ids)
        if slot_ids is not None:
            if slot_vectors is None:
                raise ValueError("slot_ids given without slot_vectors")
            inputs_embeds = self.inject(inputs_embeds, slot_ids, slot_vectors)
        n = inputs_embeds.shape[1]
        if n > self.config.max_positions:
            raise ValueError(f"sequence of {n} tokens is longer than the {self.config.max_positions} positions")
        pos = self.embeddings.position_embedding.weight[:n].to(inputs_embeds.dtype)
        x = inputs_embeds + pos
        probs = None
        pooled_wanted = pooled_positions is not None
        if pooled_wanted and not self.config.projection_dim:
            raise ValueError("this encoder has no text projection: build it with pooled=True for a pooled output")
        n_hidden = self.config.hidden_layers or len(self.encoder.layers)
        hidden = x
        for i, layer in enumerate(self.encoder.layers):
            if i >= n_hidden and not pooled_wanted:
                break
            x, p = layer(x, want_probs=output_attentions and i == n_hidden - 1)
            if p is not None:
                probs = p
            if i == n_hidden - 1:
                hidden = x
        if self.config.final_layer_norm:
            hidden = self.final_layer_norm(hidden)
        pooled = None
        if pooled_wanted:
            last = self.final_layer_norm(x)
            rows = last[torch.arange(last.shape[0], device=last.device), pooled_positions.to(last.device)]
            pooled = self.text_projection(rows)
        return TextEncoderOutput(last_hidden_state=hidden, attention_probs=probs, pooled=pooled)

    # ------------------------------------------------------------------ construction from weights
    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        prefix: str = "",
        layer: LayerChoice = "last",
        final_layer_norm: bool = True,
        hidden_act: Optional[str] = None,
        num_heads: Optional[int] = None,
        layer_norm_eps: float = 1e-5,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
        pooled: bool = False,
    ) -> "CLIPTextEncoder":
        """Build from an HF-layout CLIP text state dict; ``prefix`` picks one tower (``"clip_l."``, ``"clip_h."``...).

        ``pooled``: also build every later layer and ``text_projection`` (read next to ``text_model.``) for the
        pooled output SDXL feeds its UNet.

        Width, depth, vocabulary and positions come from the tensors. ``hidden_act`` and ``num_heads`` are not
        in a state dict: by default heads = width / 64 (true for CLIP-L/H/bigG) and the activation is
        quick_gelu for the 768-wide OpenAI CLIP-L and gelu for the OpenCLIP towers (1024, 1280).
        """
        base = find_text_model_prefix(state_dict, prefix)
        tok = state_dict[base + _TOKEN_EMB]
        pos = state_dict[base + _POS_EMB]
        total = count_layers(state_dict, base)
        keep = resolve_layer(layer, total)
        width = tok.shape[1]
        fc1 = state_dict[f"{base}encoder.layers.0.mlp.fc1.weight"]
        projection = None
        if pooled:
            proj_key = base.removesuffix("text_model.") + "text_projection.weight"
            if proj_key not in state_dict:
                raise KeyError(f"{proj_key!r} is missing: this CLIP text tower has no text projection for a pooled output")
            projection = state_dict[proj_key]
        config = CLIPTextEncoderConfig(
            vocab_size=tok.shape[0],
            hidden_size=width,
            num_layers=total if pooled else keep,
            hidden_layers=keep if pooled else None,
            projection_dim=0 if projection is None else projection.shape[0],
            num_heads=num_heads or max(1, width // 64),
            intermediate_size=fc1.shape[0],
            max_positions=pos.shape[0],
            hidden_act=hidden_act or ("quick_gelu" if width == 768 else "gelu"),
            layer_norm_eps=layer_norm_eps,
            final_layer_norm=final_layer_norm,
        )
        model = cls(config).to(dtype=dtype or tok.dtype)  # load without a precision round trip
        wanted = model.state_dict().keys()
        weights = {k: state_dict[base + k] for k in wanted if (base + k) in state_dict}
        if projection is not None:
            weights["text_projection.weight"] = projection
        missing = sorted(set(wanted) - set(weights))
        if missing:
            raise KeyError(
                f"CLIP text weights under {base!r} lack {len(missing)} tensors (first: {missing[0]}). "
                "Pass the text encoder's full state dict (diffusers text_encoder, or ComfyUI clip.get_sd())."
            )
        model.load_state_dict(weights, strict=True)
        model.requires_grad_(False).eval()
        return model.to(device=device)


def find_text_model_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """The key prefix in front of ``embeddings.token_embedding.weight`` for the tower selected by ``prefix``."""
    hits = sorted(k[: -len(_TOKEN_EMB)] for k in state_dict if k.startswith(prefix) and k.endswith(_TOKEN_EMB))
    if not hits:
        towers = sorted({k.split(".")[0] for k in state_dict if k.endswith(_TOKEN_EMB)})
        raise KeyError(
            f"No CLIP text tower with prefix {prefix!r} in this state dict"
            + (f" (towers found: {towers})." if towers else ".")
            + " Use prefix 'clip_l.' for SD1.x, 'clip_h.' for SD2.x, 'clip_l.'/'clip_g.' for SDXL."
        )
    if len(hits) > 1:
        raise KeyError(f"Several CLIP text towers match prefix {prefix!r}: {hits}. Give a longer prefix.")
    return hits[0]


def count_layers(state_dict: Mapping[str, torch.Tensor], base: str) -> int:
    head = base + "encoder.layers."
    idx = {int(k[len(head):].split(".", 1)[0]) for k in state_dict if k.startswith(head)}
    if not idx:
        raise KeyError(f"no encoder layers under {head!r}")
    return max(idx) + 1


def resolve_layer(layer: LayerChoice, total: int) -> int:
    """How many layers to run for a layer choice ("last", "penultimate", or an index, negative from the end)."""
    if layer == "last":
        return total
    if layer == "penultimate":
        return total - 1
    if isinstance(layer, int):
        keep = total + layer + 1 if layer < 0 else layer + 1
        if 1 <= keep <= total:
            return keep
    raise ValueError(f"layer must be 'last', 'penultimate' or an index within {total} layers, got {layer!r}")


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptTokenizer:
    """What the encoder needs from a host tokenizer: text → BPE ids (no specials) and the special ids.

    ``pad_id`` matters: SD1 pads with end-of-text (49407), SD2/SDXL-G with "!" (0), and because the
    encoder is causal-only the padding positions change the context the UNet sees.
    """

    encode: Callable[[str], Sequence[int]]
    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int = 77

    @classmethod
    def from_hf(cls, tokenizer, max_length: Optional[int] = None) -> "PromptTokenizer":
        """Wrap a transformers CLIPTokenizer (diffusers folders, and ComfyUI's ``SDTokenizer.tokenizer``)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max_length or min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
        return cls(
            encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            bos_id=int(tokenizer.bos_token_id),
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(pad),
            max_length=length,
        )

    def ids(self, text: str) -> list[int]:
        """BPE ids of ``text`` without BOS/EOS/padding."""
        return [int(i) for i in self.encode(text)]


def tokenize_with_slots(
    tokenizer: PromptTokenizer, prompt: str, placeholders: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Tokenize ``prompt`` to [BOS, ..., EOS, PAD...] and mark where each placeholder string stands.

    Placeholders are never added to the tokenizer: the prompt is split at them, the pieces are BPE-encoded
    and one slot (filled with the BOS id, replaced later) is kept per placeholder. CLIP BPE works word by
    word, so splitting at whitespace-separated placeholders gives the same ids as the whole string.
    Returns (ids, slot_ids) of length ``max_length``; slot_ids[i] = placeholder index or -1.
    """
    ids, slots = [tokenizer.bos_id], [-1]
    rest = prompt
    while rest:
        hits = [(rest.find(p), j) for j, p in enumerate(placeholders) if p and rest.find(p) >= 0]
        if not hits:
            piece, rest, j = rest, "", None
        else:
            at, j = min(hits)
            piece, rest = rest[:at], rest[at + len(placeholders[j]):]
        if piece.strip():
            toks = tokenizer.ids(piece)
            ids += toks
            slots += [-1] * len(toks)
        if j is not None:
            ids.append(tokenizer.bos_id)
            slots.append(j)
    if len(ids) + 1 > tokenizer.max_length:
        raise ValueError(
            f"The prompt {prompt!r} needs {len(ids) + 1} tokens; at most {tokenizer.max_length} fit. Shorten it."
        )
    ids.append(tokenizer.eos_id)
    slots.append(-1)
    pad = tokenizer.max_length - len(ids)
    return ids + [tokenizer.pad_id] * pad, slots + [-1] * pad


def batch_tokenize_with_slots(
    tokenizer: PromptTokenizer, prompts: Sequence[str], placeholders: Sequence[str], device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [tokenize_with_slots(tokenizer, p, placeholders) for p in prompts]
    ids = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
    slots = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
    return ids, slots
