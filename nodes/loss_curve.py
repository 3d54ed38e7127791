"""A loss curve drawn with PIL as a ComfyUI IMAGE, for the test-time optimisation nodes."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

_BG, _AXIS, _RAW, _SMOOTH, _TEXT = (250, 250, 250), (90, 90, 90), (160, 190, 230), (20, 70, 160), (30, 30, 30)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_image(losses: Sequence[float], title: str = "loss", width: int = 512, height: int = 256) -> torch.Tensor:
    """(1, H, W, 3) float image: per-step loss (light) and its moving average (dark) against the step."""
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 52, width - 12, 24, height - 26
    d.rectangle([left, top, right, bottom], outline=_AXIS)
    values = [float(v) for v in losses if math.isfinite(float(v))]
    d.text((left, 6), f"{title}: {len(losses)} steps" + (f", last {values[-1]:.4f}" if values else ""), fill=_TEXT)
    if values:
        lo, hi = min(values), max(values)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
        n = len(values)

        def point(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / (n - 1) if n > 1 else 0.5)
            return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

        for series, colour, w in ((values, _RAW, 1), (_moving_average(values, max(1, n // 10)), _SMOOTH, 2)):
            pts = [point(i, v) for i, v in enumerate(series)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=w)
            else:
                x, y = pts[0]
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((4, top - 4), f"{hi:.3g}", fill=_TEXT)
        d.text((4, bottom - 8), f"{lo:.3g}", fill=_TEXT)
        d.text((left, bottom + 6), "1", fill=_TEXT)
        d.text((right - 8 * len(str(n)), bottom + 6), str(n), fill=_TEXT)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)
