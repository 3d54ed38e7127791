"""InstantBooth cost: sampling with the adapters vs the same UNet without them, in one process.

    python benchmarks/bench_instantbooth.py [--device cpu|cuda] [--size small|sd15] [--refs N]

Random weights in the real shapes (nothing is downloaded). The adapters run through the same code as in ComfyUI
(``pipelines/instantbooth/adapter.py``: patch-token keys/values prepared once per run, one fused q/k/v matmul and
one attention per transformer block), hooked into a diffusers UNet:
- ``small``: a 2-level UNet (64/128 channels, cross-attention 768, attention at both levels), 16x16 latents, 10 steps;
- ``sd15``: the SD1.5 UNet (diffusers' defaults) at 64x64 latents (512 px), 30 steps.
Each run is an Euler denoising loop with classifier-free guidance (batch 2), adapters on both passes (the node's
default), N reference images -> N*257 patch tokens. Paired runs in ABBA order; the median per-pair ratio is the figure.
The one-off reference encoding (CLIP vision + FC heads) is not part of sampling and is not timed.

Absolute times count only on a GPU; on CPU only the ratio counts (thread CPU time, --threads 1).
"""
from __future__ import annotations

import sys

import torch

from timing import clock_name, device_and_dtype, paired, report_pair, sampling_args  # benchmarks/timing.py (this folder is on sys.path when run as a script)

from facebooth.pipelines.instantbooth import (  # the pack installed as `facebooth` (pip install -e .)
    DiffusersAdapterHooks,
    InstantBoothConfig,
    InstantBoothModel,
    diffusers_layout,
)

TOKENS_PER_REFERENCE = 257  # ViT-L/14 at 224 px


def build(size: str, device: torch.device, dtype: torch.dtype):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if size == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers' defaults are the SD1.x UNet
        latent, steps = 64, 30
    else:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        latent, steps = 16, 10
    ib = InstantBoothModel(InstantBoothConfig(adapters=diffusers_layout(unet), num_heads=8))
    with torch.no_grad():
        for _, adapter in ib.adapter_items():
            adapter.gamma.fill_(0.5)  # open gates (the cost does not depend on the values)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return unet.to(device=device, dtype=dtype).eval(), ib.to(device=device, dtype=dtype).eval(), sched, latent, steps


@torch.inference_mode()
def main() -> int:
    ap = sampling_args(__doc__.split("\n\n")[0], ["small", "sd15"], 8, "with/without")
    ap.add_argument("--refs", type=int, default=1, help="reference images (N*257 patch tokens)")
    args = ap.parse_args()
    device, dtype = device_and_dtype(args)
    unet, ib, sched, latent, steps = build(args.size, device, dtype)
    steps = args.steps or steps
    clock = clock_name(device)
    print(f"device={device} size={args.size} dtype={dtype} steps={steps} latent={latent}x{latent} refs={args.refs} "
          f"adapters={len(ib.config.adapters)} threads={torch.get_num_threads()} clock={clock}")

    g = torch.Generator().manual_seed(0)
    ctx = (torch.randn(2, 77, 768, generator=g) * 0.5).to(device, dtype)
    patch_tokens = torch.randn(args.refs * TOKENS_PER_REFERENCE, ib.config.patch_dim, generator=g).to(device, dtype)
    hooks = DiffusersAdapterHooks(unet, ib, beta=0.3, prepare_once=True)

    def sample(adapters: bool) -> torch.Tensor:
        hooks.set_patch_tokens(patch_tokens if adapters else None)  # a new run: patch keys/values prepared again
        sched.set_timesteps(steps, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 4, latent, latent, generator=gen, device=device, dtype=dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(eps_u + 7.0 * (eps_c - eps_u), t, x).prev_sample
        return x

    with_ad, without = sample(True), sample(False)  # warm-up both paths
    print(f"adapters change the result: max |diff| = {(with_ad - without).abs().max().item():.4f}")
    t_on, t_off = paired(lambda: sample(True), lambda: sample(False), args.repeats, device, warmup=0)
    ratio = report_pair("sampling with adapters", t_on, "sampling without adapters", t_off)
    if device.type != "cuda":
        print("note: the target is for SD1.5 on a GPU; on CPU only the ratio counts")
    print(f"RESULT instantbooth_sampling_over_plain {ratio:.3f} target <= 1.15")
    return 0


if __name__ == "__main__":
    sys.exit(main())
