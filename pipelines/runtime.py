"""How long-running pipeline code reports progress and learns that the user wants it to stop.

Nodes pass ComfyUI's ProgressBar and interrupt check in; the CLI and training scripts pass tqdm or nothing.
Pipelines never import ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ProgressFn = Callable[[int, int, Optional[torch.Tensor]], None]  # (done, total, preview image HWC [0,1] or None)


def _no_progress(done: int, total: int, preview: Optional[torch.Tensor] = None) -> None:
    return None


def _never_interrupted() -> None:
    return None


@dataclass
class RunHooks:
    """``check_interrupt`` raises (any exception) when the user asked to stop; loops call it every step."""

    progress: ProgressFn = field(default=_no_progress)
    check_interrupt: Callable[[], None] = field(default=_never_interrupted)


NO_HOOKS = RunHooks()
