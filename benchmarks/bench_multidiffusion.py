"""MultiDiffusion region sampling cost: two subjects vs one subject, in the same process.

    python benchmarks/bench_multidiffusion.py [--device cpu|cuda] [--size small|sd15|sd21] [--canvas N]

A full Euler sampling loop with classifier-free guidance where the conditional branch is MultiDiffusion
(``facebooth.pipelines.multidiffusion``) with bootstrapping for the first 40 % of the steps:

* one subject: background prompt + one region (left half) + the negative prompt;
* two subjects: background + two regions (left and right thirds) + the negative prompt;
* for contrast, the same two-subject loop unbatched (one UNet call per region, as a naive loop does) and plain
  text-only sampling.

Random weights in the real shapes (nothing is downloaded). ``small``: a 2-level UNet (64/128 channels,
cross-attention 768), 32x32 latents, 10 steps. ``sd15``: the SD1.5 UNet at 64x64 latents (512 px), 20 steps.
``sd21``: the SD2.1-base UNet at 64x64 latents. ``--canvas`` (latents) larger than the window adds MultiDiffusion
views. The paper reports 18 s vs 2 s for two subjects vs FastComposer's single pass (9x); the target here is
two subjects <= 2x one subject. On CPU only ratios count (thread CPU time, --threads 1).
"""
from __future__ import annotations

import statistics
import sys

import torch

from timing import clock_name, device_and_dtype, paired, sampling_args, timed  # benchmarks/timing.py (this folder is on sys.path when run as a script)

from facebooth.pipelines.multidiffusion import (  # the pack installed as `facebooth` (pip install -e .)
    COND,
    UNCOND,
    MultiDiffusion,
    MultiDiffusionConfig,
    Region,
    RegionPrompt,
    eps_noise_scaling,
)


def build(size: str, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if size == "sd15":
        unet, latent, steps, ctx_dim = UNet2DConditionModel(cross_attention_dim=768, sample_size=64), 64, 20, 768
    elif size == "sd21":
        unet = UNet2DConditionModel(cross_attention_dim=1024, sample_size=64, attention_head_dim=[5, 10, 20, 20],
                                    use_linear_projection=True)
        latent, steps, ctx_dim = 64, 20, 1024
    else:
        unet = UNet2DConditionModel(
            sample_size=32, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        latent, steps, ctx_dim = 32, 10, 768
    return unet.to(device=device, dtype=dtype).eval(), latent, steps, ctx_dim


def karras_sigmas(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1)])


@torch.inference_mode()
def main() -> int:
    ap = sampling_args(__doc__.split("\n\n")[0], ["small", "sd15", "sd21"], 6, "two/one-subject")
    ap.add_argument("--canvas", type=int, default=None, help="canvas width in latents (default: the window, one view)")
    args = ap.parse_args()
    device, dtype = device_and_dtype(args)
    unet, window, steps, ctx_dim = build(args.size, device, dtype)
    steps = args.steps or steps
    h, w = window, args.canvas or window
    sigmas = karras_sigmas(steps).to(device)
    clock = clock_name(device)
    print(f"device={device} size={args.size} dtype={dtype} steps={steps} canvas={h}x{w} latents window={window} "
          f"threads={torch.get_num_threads()} clock={clock}")

    g = torch.Generator().manual_seed(0)
    uncond, bg = (torch.randn(1, 77, ctx_dim, generator=g).to(device, dtype) for _ in range(2))
    subj = [torch.randn(1, 77, ctx_dim, generator=g).to(device, dtype) for _ in range(2)]
    colours = torch.randn(20, 4, 1, 1, generator=g).to(device, dtype) * 0.5

    def box(x0: float, x1: float) -> torch.Tensor:
        m = torch.zeros(h * 8, w * 8)
        m[:, int(x0 * w * 8) : int(x1 * w * 8)] = 1
        return m

    def md_for(n_subjects: int, max_batch: int = 0) -> MultiDiffusion:
        boxes = [(0.0, 0.5)] if n_subjects == 1 else [(0.0, 1 / 3), (2 / 3, 1.0)]
        regions = [Region([RegionPrompt(subj[k])], box(*b)) for k, b in enumerate(boxes)]
        cfg = MultiDiffusionConfig(window=window, stride=max(1, window // 8), bootstrap_fraction=0.4, max_batch=max_batch)
        return MultiDiffusion(regions, cfg, bootstrap_latents=colours)

    def apply(x, sigma, ctx, extras, flags, uuids):
        s = sigma.reshape(-1, 1, 1, 1)
        t = (sigma * 60).clamp(max=999)  # any monotone sigma -> timestep map: the cost does not depend on it
        eps = unet(x / torch.sqrt(s ** 2 + 1), t, encoder_hidden_states=ctx).sample
        return x - s * eps

    contexts = torch.cat([uncond, bg])

    def sample(md) -> torch.Tensor:
        x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1)).to(device, dtype) * sigmas[0]
        for i in range(steps):
            s = sigmas[i].reshape(1).expand(2)
            if md is None:
                d = apply(torch.cat([x, x]), s, contexts, {}, [UNCOND, COND], [None, None])
            else:
                d = md(apply, torch.cat([x, x]), s, contexts, [UNCOND, COND], sample_sigmas=sigmas,
                       noise_scaling=eps_noise_scaling)
            d_u, d_c = d.chunk(2)
            den = d_u + 5.0 * (d_c - d_u)
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    one, two, two_seq = md_for(1), md_for(2), md_for(2, max_batch=1)
    for m in (None, one, two):  # warm-up
        sample(m)
    t_one, t_two = paired(lambda: sample(one), lambda: sample(two), args.repeats, device, warmup=0)
    ratios = [b / a for a, b in zip(t_one, t_two)]
    calls_one, calls_two = one.calls, two.calls
    t_plain = statistics.median(timed(lambda: sample(None), device) for _ in range(max(2, args.repeats // 2)))
    t_seq = statistics.median(timed(lambda: sample(two_seq), device) for _ in range(max(2, args.repeats // 2)))
    runs = 1 + args.repeats  # warm-up + one run per pair
    print(f"plain text sampling:           median {t_plain * 1000:.0f} ms")
    print(f"one subject  (MultiDiffusion): median {statistics.median(t_one) * 1000:.0f} ms, "
          f"{calls_one / (steps * runs):.1f} UNet call(s) per step")
    print(f"two subjects (MultiDiffusion): median {statistics.median(t_two) * 1000:.0f} ms, "
          f"{calls_two / (steps * runs):.1f} UNet call(s) per step")
    print(f"two subjects, unbatched loop:  median {t_seq * 1000:.0f} ms ({t_seq / statistics.median(t_one):.2f}x one subject)")
    print(f"per-pair two/one ratios: {', '.join(f'{x:.3f}' for x in ratios)}")
    print(f"two subjects over plain text sampling: {statistics.median(t_two) / t_plain:.2f}x")
    if device.type != "cuda":
        print("note: absolute times count only on a GPU; on CPU only the ratio counts")
    print(f"RESULT multidiffusion_two_over_one_subject {statistics.median(ratios):.3f} target <= 2.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
