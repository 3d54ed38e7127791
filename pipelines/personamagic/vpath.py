"""The V path at sampling time: give the UNet's cross-attention a different value context.

``ValuePathPatch`` has the call signature of a ComfyUI ``attn2_patch`` —
``(n, context, value, extra_options) -> (n, context, value)`` — but is plain torch, so it lives here.

How it finds *which* value context belongs to a batch row: the conditioning tensors are PersonaMagic's K
contexts, one per timestep bin, and the patch holds the matching (K, V) pairs. A row whose context equals
one of the K contexts (after the host's dtype cast, and allowing for the host repeating a 77-token context
to a longer common length when it batches conds of different lengths) gets that pair's V rows at the
placeholder positions; every other row keeps its value. Matching by content, not by position or sigma,
means that

* negative prompts (any length, e.g. 154 tokens that force the positive to be repeated ×2) never match;
* conds from other nodes combined with ours, area conds, and other packs' patches are left alone;
* several PersonaMagic identities in one graph each touch only their own rows.

``extra_options['cond_or_uncond']`` (0 = positive chunk, 1 = negative) skips the negative chunks without
looking at them at all. Only the placeholder rows are written, on a copy of ``value``, so an earlier patch's
change to other rows survives.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)


class _Group:
    """Candidates that share a context length and placeholder positions (one prompt)."""

    def __init__(self, length: int, positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.length = length
        self.positions = positions  # (P,) long
        self.keys = torch.stack(keys)  # (C, L, D) float32, CPU
        self.value_rows = torch.stack([v[positions] for v in values])  # (C, P, D)
        self.key_rows = self.keys[:, positions]  # (C, P, D): the cheap first check
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device, dtype: torch.dtype):
        k = (str(device), dtype)
        if k not in self._cast:
            self._cast[k] = (
                self.keys.to(device=device, dtype=dtype),
                self.key_rows.to(device=device, dtype=dtype),
                self.value_rows.to(device=device, dtype=dtype),
            )
        return self._cast[k]


class ValuePathPatch:
    """attn2_patch: V = the bypass context for rows whose context is one of our K contexts."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], name: str = "personamagic"):
        self.name = name
        groups: dict[tuple, tuple[list, list]] = {}
        for key, value in pairs:
            key, value = key.detach().float().cpu().reshape(-1, key.shape[-1]), value.detach().float().cpu().reshape(-1, key.shape[-1])
            if key.shape != value.shape:
                raise ValueError(f"K and V contexts differ in shape: {tuple(key.shape)} vs {tuple(value.shape)}")
            diff = (key != value).any(-1).nonzero().flatten()
            if diff.numel() == 0:
                continue  # a static-stage context: V = K, nothing to do
            sig = (key.shape[0], tuple(diff.tolist()))
            groups.setdefault(sig, ([], []))
            groups[sig][0].append(key)
            groups[sig][1].append(value)
        self.groups = [
            _Group(length, torch.tensor(pos, dtype=torch.long), ks, vs) for (length, pos), (ks, vs) in groups.items()
        ]
        self.calls = 0  # rows rewritten so far (tests and logs)

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; this object is immutable
        return self

    def to(self, device: Any) -> "ValuePathPatch":
        """Hosts move patches with the model (ComfyUI: ``ModelPatcher.model_patches_to``, also on unload): the
        contexts stay on the CPU, and cast copies on any other device are dropped, freeing its memory."""
        if isinstance(device, (str, torch.device)):
            for g in self.groups:
                g._cast = {k: v for k, v in g._cast.items() if k[0] == str(torch.device(device))}
        return self

    def __len__(self) -> int:
        return sum(g.keys.shape[0] for g in self.groups)

    @staticmethod
    def positive_rows(batch: int, extra_options: Mapping[str, Any]) -> range | list[int]:
        chunks = extra_options.get("cond_or_uncond") if extra_options else None
        if not chunks or batch % len(chunks):
            return range(batch)
        per = batch // len(chunks)
        return [i * per + r for i, c in enumerate(chunks) if c == 0 for r in range(per)]

    def match(self, row: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(positions, V rows) for a context row (L', D) that is one of our K contexts (possibly repeated)."""
        for g in self.groups:
            if row.shape[0] % g.length:
                continue
            reps = row.shape[0] // g.length
            keys, key_rows, value_rows = g.on(row.device, row.dtype)
            hit = (key_rows == row[g.positions].unsqueeze(0)).all(-1).all(-1).nonzero().flatten()
            for c in hit.tolist():
                if torch.equal(row, keys[c].repeat(reps, 1)):
                    offsets = torch.arange(reps, device=row.device).repeat_interleave(len(g.positions)) * g.length
                    pos = g.positions.to(row.device).repeat(reps) + offsets
                    return pos, value_rows[c].repeat(reps, 1)
        return None

    def __call__(self, n: torch.Tensor, context: Optional[torch.Tensor], value: Optional[torch.Tensor], extra_options: Mapping[str, Any]):
        if context is None or context.dim() != 3 or not self.groups:
            return n, context, value
        out = None
        for b in self.positive_rows(context.shape[0], extra_options):
            found = self.match(context[b])
            if found is None:
                continue
            pos, rows = found
            if out is None:
                out = (value if value is not None else context).clone()
            out[b, pos] = rows.to(out.dtype)
            self.calls += 1
        return n, context, (value if out is None else out)
