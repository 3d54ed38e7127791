"""Strict state-dict loading with one readable report of what does not fit (missing, unexpected, wrong shape)."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import nn


class StateDictMismatchError(ValueError):
    """A weight file does not match the network it is loaded into; the message lists what differs."""


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    network: str,
    optional: Iterable[str] = (),
    hint: str = "",
) -> None:
    """Raise ``StateDictMismatchError`` naming the missing, unexpected and wrong-shape keys of ``state``.

    ``expected`` is the target's own state dict (a meta-device model's is enough: only names and shapes are read).
    ``optional`` keys may be absent (e.g. BatchNorm ``num_batches_tracked``, which older exports drop).
    """
    optional = set(optional)
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} (needs {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of the wrong shape: {_listing(wrong, 3)}")
    raise StateDictMismatchError(f"{source} does not match the {network} layout: {'; '.join(parts)}.{' ' + hint if hint else ''}")


def load_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    network: str,
    hint: str = "",
    dtype: Optional[torch.dtype] = torch.float32,
    assign: bool = False,
) -> nn.Module:
    """Check ``state`` against ``model`` (see ``check_state_dict``), then load it strictly.

    Floating tensors are cast to ``dtype`` (None keeps them). BatchNorm ``num_batches_tracked`` may be missing.
    ``assign=True`` makes the file's tensors the parameters (for models built on the meta device: no random
    init, no second copy when the dtype already matches).
    """
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    check_state_dict(expected, state, source=source, network=network, optional=optional, hint=hint)
    full = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    for k in optional - set(full):
        full[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(full, strict=True, assign=assign)
    return model
