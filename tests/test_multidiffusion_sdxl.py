"""MultiDiffusion on SDXL: every region prompt's jobs get that prompt's own ``y`` (pooled output + size
conditioning), the background and negative jobs keep the host's; the fused prediction equals a plain loop that
calls the denoiser once per (view, prompt) with the right y. The denoiser here is a stand-in whose output depends
on both the context and y, so a wrong pairing shows up in the numbers."""
from __future__ import annotations

import torch

from facebooth.pipelines.multidiffusion import COND, UNCOND, MultiDiffusion, MultiDiffusionConfig, Region, RegionPrompt

CTX, ADM = 6, 5


def _denoise(x, ctx, y):
    # per-sample: latent scaled by a context statistic plus a y statistic (both matter)
    return x * (1 + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)) + y.sum(dim=1).view(-1, 1, 1, 1)


def test_region_prompts_bring_their_own_y_and_the_rest_keeps_the_hosts():
    g = torch.Generator().manual_seed(0)
    h = w = 8
    left = torch.zeros(h, w)
    left[:, :4] = 1
    right = 1 - left
    ctx_a, ctx_b = torch.randn(1, 3, CTX, generator=g), torch.randn(1, 3, CTX, generator=g)
    y_a, y_b = torch.randn(1, ADM, generator=g), torch.randn(1, ADM, generator=g)
    regions = [Region([RegionPrompt(ctx_a, extras={"y": y_a})], left), Region([RegionPrompt(ctx_b, extras={"y": y_b})], right)]
    md = MultiDiffusion(regions, MultiDiffusionConfig(window=8, stride=8, bootstrap_fraction=0.0))
    x = torch.randn(2, 4, h, w, generator=g)  # chunk 0 positive, chunk 1 negative
    host_ctx = torch.randn(2, 3, CTX, generator=g)
    host_y = torch.randn(2, ADM, generator=g)
    seen = []

    def apply(xb, sb, ctx, extras, flags, uuids):
        seen.append(extras["y"])
        return _denoise(xb, ctx, extras["y"])

    out = md(apply, x, torch.tensor([1.0, 1.0]), host_ctx, [COND, UNCOND], extras={"y": host_y})

    # Reference: the published fusion written out, regions cover the canvas so no background job.
    pos = (_denoise(x[:1], ctx_a, y_a) * left + _denoise(x[:1], ctx_b, y_b) * right) / (left + right)
    neg = _denoise(x[1:], host_ctx[1:], host_y[1:])
    torch.testing.assert_close(out, torch.cat([pos, neg]))
    ys = torch.cat(seen)
    assert any(torch.equal(r, y_a[0]) for r in ys) and any(torch.equal(r, y_b[0]) for r in ys)
    assert any(torch.equal(r, host_y[1]) for r in ys)
