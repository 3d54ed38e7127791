"""Stage regulation: which timesteps are static (supercategory / frozen) and which are dynamic (mapper).

Timesteps are the model's training indices t ∈ [0, T) (T = 1000 for SD), large t = noisy = early in sampling.

* Stage 1, t > t_high: static; the prompt says the supercategory ("face") instead of the trigger.
* Stage 2, t_low ≤ t ≤ t_high: dynamic; the mapper's embeddings at t. Training samples t ∈ [t_low, t_high).
* Stage 3, t < t_low: static; the mapper's embeddings frozen at t_low.

Two ways to get (t_low, t_high):

* the official code's fixed timesteps, (400, 800) (``PRESETS["official"]``);
* the paper's IoU partition: after warm-up iterations over the whole schedule, the placeholder's
  cross-attention map is compared with the face mask at a grid of timesteps; IoU grows as t falls. The
  first static stage is where IoU < λ1 = 0.7, the second where IoU > λ2 = 0.8, the dynamic stage between
  (:func:`partition_by_iou`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LAMBDA_1 = 0.7
LAMBDA_2 = 0.8
MIN_DYNAMIC_WIDTH = 50  # timesteps; a narrower dynamic stage would leave the mapper almost nothing to learn


@dataclass(frozen=True)
class StagePlan:
    t_low: int
    t_high: int
    num_timesteps: int = 1000
    source: str = "official"  # "official" | "iou" | "custom"

    def __post_init__(self) -> None:
        if not 0 <= self.t_low < self.t_high < self.num_timesteps:
            raise ValueError(
                f"stage boundaries must satisfy 0 <= t_low < t_high < {self.num_timesteps}, got {self.t_low}, {self.t_high}"
            )

    def stage_of(self, t: int) -> int:
        """1 (supercategory), 2 (dynamic) or 3 (frozen) for an integer timestep."""
        return 1 if t > self.t_high else (2 if t >= self.t_low else 3)

    def sample_training_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform integers in [t_low, t_high), as the official ``randint(400, 800)``."""
        return torch.randint(self.t_low, self.t_high, (n,), generator=generator)


PRESETS = {"official": StagePlan(400, 800, source="official")}


# ---------------------------------------------------------------------------------------------- IoU partition
def attention_mask_iou(attn_map: torch.Tensor, face_mask: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of a cross-attention map with a face mask.

    ``attn_map`` (h, w), any scale: min-max normalised and thresholded at ``threshold`` (the paper does not
    say how the map is binarised; this is the usual prompt-to-prompt style choice). ``face_mask`` (H, W)
    in [0, 1], resized to (h, w) with area averaging and thresholded at 0.5.
    """
    a = attn_map.detach().float()
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)
    m = F.interpolate(face_mask.detach().float()[None, None], size=a.shape, mode="area")[0, 0]
    pa, pm = a >= threshold, m >= 0.5
    union = (pa | pm).sum().item()
    return float((pa & pm).sum().item() / union) if union else 0.0


def partition_by_iou(
    ious: Mapping[int, float],
    *,
    lambda_1: float = LAMBDA_1,
    lambda_2: float = LAMBDA_2,
    num_timesteps: int = 1000,
    min_width: int = MIN_DYNAMIC_WIDTH,
    fallback: StagePlan = PRESETS["official"],
) -> StagePlan:
    """Stage boundaries from IoU measured at a grid of timesteps.

    Scanning from the noisiest measured t downwards, grid points are first-static while IoU < λ1, dynamic from
    the first one whose IoU reaches λ1, and second-static from the first one below that whose IoU exceeds λ2
    (none: no second static stage). Boundaries go halfway between neighbouring grid points. Measurements are
    smoothed with a 3-point running median first, so one stray map does not move a boundary.

    When IoU never reaches λ1, or the dynamic stage would be narrower than ``min_width``, the attention maps
    say nothing useful (e.g. a random model or a face mask that covers the whole image) and ``fallback``
    is returned, with a warning.
    """
    if not 0 < lambda_1 < lambda_2 <= 1:
        raise ValueError(f"need 0 < λ1 < λ2 <= 1, got {lambda_1}, {lambda_2}")
    ts = sorted(ious, reverse=True)
    if len(ts) < 2:
        raise ValueError("measure IoU at two timesteps at least")
    raw = [float(ious[t]) for t in ts]
    smooth = [sorted(raw[i - 1 : i + 2])[1] if 0 < i < len(raw) - 1 else raw[i] for i in range(len(raw))]
    hi_idx = next((i for i, v in enumerate(smooth) if v >= lambda_1), None)
    if hi_idx is None:
        log.warning("PersonaMagic: IoU never reached λ1=%.2f (max %.2f); using the %s stages", lambda_1, max(smooth), fallback.source)
        return fallback
    t_high = num_timesteps - 1 if hi_idx == 0 else (ts[hi_idx - 1] + ts[hi_idx]) // 2
    lo_idx = next((i for i in range(hi_idx + 1, len(ts)) if smooth[i] > lambda_2), None)
    t_low = 0 if lo_idx is None else (ts[lo_idx - 1] + ts[lo_idx]) // 2 + 1
    if t_high - t_low < min_width:
        log.warning(
            "PersonaMagic: the IoU partition gave a dynamic stage [%d, %d] narrower than %d timesteps; using the %s stages",
            t_low, t_high, min_width, fallback.source,
        )
        return fallback
    return StagePlan(t_low=int(t_low), t_high=int(min(t_high, num_timesteps - 1)), num_timesteps=num_timesteps, source="iou")


# ---------------------------------------------------------------------------------------------- quantisation
@dataclass(frozen=True)
class TimestepBin:
    """Integer timesteps [first, last] that share the mapper's output at ``rep``."""

    first: int
    last: int
    rep: int


def dynamic_bins(plan: StagePlan, bins: int) -> list[TimestepBin]:
    """Split the dynamic stage [t_low, t_high] (inclusive, as the official inference) into ``bins`` runs of
    consecutive integer timesteps, ordered from high t (early in sampling) to low t. Each run is represented
    by its middle timestep. With ``bins`` = t_high − t_low + 1 every timestep is its own bin (exact)."""
    width = plan.t_high - plan.t_low + 1
    if bins < 1:
        raise ValueError(f"need at least one bin, got {bins}")
    bins = min(bins, width)
    edges = [plan.t_low + (width * k) // bins for k in range(bins + 1)]
    out = [TimestepBin(first=a, last=b - 1, rep=(a + b - 1) // 2) for a, b in zip(edges, edges[1:])]
    return out[::-1]


def bins_for_visited(plan: StagePlan, visited: Sequence[int]) -> list[TimestepBin]:
    """Exact bins for a known sampling schedule: one bin per visited integer timestep inside the dynamic
    stage, represented by that timestep, owning the integers nearer to it than to its neighbours (ties go to
    the lower timestep). Timesteps a sampler adds between its steps (Heun, DPM-2 midpoints) fall into the
    nearest bin. Falls back to one bin at the stage middle when no visited timestep is dynamic."""
    reps = sorted({int(t) for t in visited if plan.t_low <= int(t) <= plan.t_high}, reverse=True)
    if not reps:
        return dynamic_bins(plan, 1)
    out = []
    for i, r in enumerate(reps):
        hi = plan.t_high if i == 0 else (reps[i - 1] + r) // 2
        lo = plan.t_low if i == len(reps) - 1 else (r + reps[i + 1]) // 2 + 1
        out.append(TimestepBin(first=lo, last=hi, rep=r))
    return out


def bin_for_timestep(t: int, bins: Sequence[TimestepBin]) -> Optional[TimestepBin]:
    return next((b for b in bins if b.first <= t <= b.last), None)


# ---------------------------------------------------------------------------------------------- percent ranges
def percent_for_sigma(sigma: float, percent_to_sigma: Callable[[float], float], iters: int = 60) -> float:
    """Invert a host's monotone decreasing ``percent_to_sigma`` (ComfyUI's model_sampling) by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class ScheduleRange:
    """An interval of integer timesteps [t_min, t_max] mapped to a host's percent range."""

    t_min: int
    t_max: int
    start_percent: float
    end_percent: float


def timestep_ranges_to_percents(
    ranges: Sequence[tuple[int, int]],
    sigma_of_timestep: Callable[[float], float],
    percent_to_sigma: Callable[[float], float],
    num_timesteps: int = 1000,
) -> list[ScheduleRange]:
    """Percent ranges for integer-timestep intervals.

    A discrete-time model evaluates at the integer timestep nearest (in log σ) to the sampler's σ, so the
    interval [a, b] owns σ between σ(a − ½) and σ(b + ½): the boundaries are put at half-integer timesteps,
    where ComfyUI's interpolated ``percent_to_sigma`` lands exactly on the nearest-timestep switch. The
    interval touching t = T−1 starts at percent 0, the one touching t = 0 ends at percent 1.
    """
    out = []
    for a, b in ranges:
        start = 0.0 if b >= num_timesteps - 1 else percent_for_sigma(sigma_of_timestep(b + 0.5), percent_to_sigma)
        end = 1.0 if a <= 0 else percent_for_sigma(sigma_of_timestep(a - 0.5), percent_to_sigma)
        out.append(ScheduleRange(t_min=a, t_max=b, start_percent=start, end_percent=end))
    return out


def lambda_id(t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """The identity-loss weight λ_id(t) = cos(tπ / 2T) (paper, eq. 4)."""
    return torch.cos(t.float() * math.pi / (2 * num_timesteps))
