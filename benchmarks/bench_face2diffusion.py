"""Face2Diffusion cost: face encoding latency, and sampling with F2D conditioning vs plain text conditioning.

    python benchmarks/bench_face2diffusion.py [--device cpu|cuda] [--size small|sd15]

Random weights in the real shapes (nothing is downloaded):
- encode: official-size MSID encoder (ViT-S/8, 112 px) + mapping networks (1536 -> 768) for one aligned face;
- sampling: prompt encoding + an Euler-ancestral denoising loop with classifier-free guidance (batch 2), once with
  the F2D-injected prompt "a photo of f l" and once with the plain prompt, alternated in the same process.
  ``small``: CLIP-L-width text encoder (4 layers), a 2-level UNet (64/128 channels, cross-attention 768),
  16x16 latents, 10 steps. ``sd15``: CLIP-L (12 layers) and the SD1.5 UNet at 64x64 latents, 30 steps (the paper's setting).

Absolute times count only on a GPU (paper: 6 ms encoding on an A100); on CPU only the ratio counts.
"""
from __future__ import annotations

import statistics
import sys

import torch

from timing import clock_name, device_and_dtype, paired, report_pair, sampling_args, timed  # benchmarks/timing.py (this folder is on sys.path when run as a script)

from facebooth.pipelines.face2diffusion import (  # the pack installed as `facebooth` (pip install -e .)
    F2DMapping,
    IdentityTokens,
    MSIDEncoder,
    encode_with_identities,
)

# "a photo of f l" and "" in the SD1 CLIP BPE vocabulary, padded to 77 with <|endoftext|>.
BOS, EOS, F_ID = 49406, 49407, 325
PROMPT = [BOS, 320, 1125, 539, 325, 331, EOS]
EMPTY = [BOS, EOS]


def _pad(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids + [EOS] * (77 - len(ids))])


def build(size: str, device: torch.device, dtype: torch.dtype):
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    msid = MSIDEncoder().eval()
    mapping = F2DMapping().eval()
    layers = 12 if size == "sd15" else 4
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )).eval()
    if size == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers' defaults are the SD1.x UNet
        latent = 64
        steps = 30
    else:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        latent = 16
        steps = 10
    sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    mods = [m.to(device=device, dtype=dtype).eval() for m in (msid, mapping, text, unet)]
    return (*mods, sched, latent, steps)


@torch.inference_mode()
def main() -> int:
    args = sampling_args(__doc__.split("\n\n")[0], ["small", "sd15"], 12, "F2D / text").parse_args()
    device, dtype = device_and_dtype(args)
    if device.type == "cpu" and args.threads != 1:
        print("warning: with several threads the CPU-time clock only sees the main thread; use --threads 1")
    torch.set_grad_enabled(False)
    msid, mapping, text, unet, sched, latent, steps = build(args.size, device, dtype)
    steps = args.steps or steps
    clock = clock_name(device)
    print(f"device={device} size={args.size} dtype={dtype} steps={steps} latent={latent}x{latent} threads={torch.get_num_threads()} clock={clock}")

    # --- encode: MSID + mapping for one aligned face --------------------------------------------------------
    face = torch.rand(1, 3, 112, 112, device=device, dtype=dtype) * 2 - 1

    def encode() -> torch.Tensor:
        return mapping(msid(face))[0]

    for _ in range(3):
        encode()
    enc = [timed(encode, device) for _ in range(20)]
    encode_ms = statistics.median(enc) * 1000
    print(f"encode (MSID + mapping, 1 face): median {encode_ms:.2f} ms, min {min(enc) * 1000:.2f} ms")

    # --- sampling: F2D-conditioned vs text-conditioned, same loop -----------------------------------------
    ids, empty = _pad(PROMPT).to(device), _pad(EMPTY).to(device)
    vectors = encode()

    def conditioning(f2d: bool) -> torch.Tensor:
        uncond = text(input_ids=empty)[0]
        if f2d:
            cond = encode_with_identities(text, ids, [IdentityTokens(F_ID, vectors)])[0]
        else:
            cond = text(input_ids=ids)[0]
        return torch.cat([uncond, cond])

    def sample(f2d: bool) -> torch.Tensor:
        ctx = conditioning(f2d)
        sched.set_timesteps(steps, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 4, latent, latent, generator=g, device=device, dtype=dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(eps_u + 7.0 * (eps_c - eps_u), t, x, generator=g).prev_sample
        return x

    sample(True)  # warm-up both paths
    sample(False)
    # Paired runs in ABBA order: the median of the per-pair ratios is robust to load drift that would swamp a
    # difference of a few percent.
    t_f2d, t_text = paired(lambda: sample(True), lambda: sample(False), args.repeats, device, warmup=0)
    ratio = report_pair("sampling with F2D conditioning", t_f2d, "sampling with text conditioning", t_text)

    # The only code that differs is the prompt encoding; timed on its own, many times, it bounds the overhead.
    c_f2d, c_text = paired(lambda: conditioning(True), lambda: conditioning(False), args.repeats * 4, device,
                           abba=False, warmup=0)
    d_cond = statistics.median(c_f2d) - statistics.median(c_text)
    print(f"prompt encoding: F2D {statistics.median(c_f2d) * 1000:.2f} ms vs text {statistics.median(c_text) * 1000:.2f} ms "
          f"(difference {d_cond * 1000:+.2f} ms = {d_cond / statistics.median(t_text) * 100:+.2f}% of a text-conditioned run)")
    if device.type != "cuda":
        print("note: absolute times count only on a GPU; on CPU only the ratio counts")
    print(f"RESULT f2d_encode_ms {encode_ms:.2f} target <= 10")
    print(f"RESULT f2d_sampling_over_text {ratio:.3f} target <= 1.02")
    return 0


if __name__ == "__main__":
    sys.exit(main())
