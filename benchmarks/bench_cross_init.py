"""Cost of one Cross Initialization optimisation step vs a bare UNet forward + backward.

    python benchmarks/bench_cross_init.py [--device cpu|cuda] [--size small|sd15|sd21|sdxl-small|sdxl] [--steps N]

Both run in this process, interleaved, on the same random-weight models, the same batch shape (latents,
timesteps, 77-token context) and the same autocast setting. The baseline is the least any textual
inversion step must do: UNet forward, MSE, backward to the context (model frozen). The step adds prompt
tokenisation, the text encoder forward/backward through the injected rows, noising, the regulariser and
AdamW. Sizes: ``small`` (tiny, for CPU), ``sd15`` (SD1.5 UNet + CLIP-L shapes), ``sd21`` (SD2.1-base UNet
+ 23-layer OpenCLIP-H text tower). Only ratios count on a CPU; there the clock is the process CPU time, so
other jobs on a shared machine disturb the figure less. The FLOP share of the text tower is printed so a
size's proportions can be compared with real SD (CLIP-L ≈ 2-3 %, OpenCLIP-H ≈ 5-6 % of the UNet).

SDXL sizes (``sdxl-small``: the KOALA-like test UNet of devmodels/sdxl_checkpoint.py, ``sdxl``: diffusers'
full SDXL-base UNet config at 1024 px, batch 8, for a GPU; both with full-size CLIP-L and CLIP-G, random
weights): the baseline is a bare forward + backward through the same UNet *and both text encoders* (token
ids -> context + pooled output -> UNet with its size/crop ids -> MSE -> backward to the injected vectors),
because on SDXL the text towers are a large part of the work, and the figure is
``cross_init_sdxl_step_over_unet_te_fwd_bwd``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from facebooth.pipelines import cross_init as ci
from facebooth.pipelines.text_encoder import CLIPTextEncoder, CLIPTextEncoderConfig, PromptTokenizer
from facebooth.pipelines.textual_inversion import TextualInversionEngine
from facebooth.pipelines.textual_inversion.diffusers_backend import DiffusersBackend
from timing import clock_name, median_ratio, paired, timed, unet_fwd_bwd  # benchmarks/timing.py (on sys.path as a script)

CPU_CLOCK = time.process_time  # these benchmarks may run several threads (--threads)

SIZES = {
    # unet block widths, attention heads (per block), context width, text layers/heads/ffn, latent side, batch
    # small keeps SD's proportions: the text tower costs a few percent of the UNet (printed as a FLOP share)
    "small": dict(blocks=(32, 64), heads=4, ctx=64, text_layers=2, text_heads=4, ffn=256, latent=32, batch=8,
                  linear_proj=False, vocab="tiny"),
    "sd15": dict(blocks=(320, 640, 1280, 1280), heads=8, ctx=768, text_layers=12, text_heads=12, ffn=3072, latent=64,
                 batch=8, linear_proj=False, vocab="clip"),
    "sd21": dict(blocks=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), ctx=1024, text_layers=23, text_heads=16,
                 ffn=4096, latent=64, batch=8, linear_proj=True, vocab="clip"),
    "sdxl-small": dict(ctx=2048, latent=8, batch=1, text_layers=12 + 32, sdxl=True),  # 64 px, as the tests
    "sdxl": dict(ctx=2048, latent=128, batch=8, text_layers=12 + 32, sdxl=True),
}

# diffusers' SDXL-base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json values).
SDXL_BASE_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def build_sdxl_backend(size: str, device: str):
    """SDXL backend with random weights: UNet per size, full-size CLIP-L and CLIP-G (pooled) towers."""
    from dataclasses import replace

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from facebooth.devmodels.sdxl_checkpoint import unet_diffusers_config
    from facebooth.pipelines.textual_inversion import TextTower
    from facebooth.pipelines.textual_inversion.diffusers_backend import DiffusersSDXLBackend

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(unet_diffusers_config() if size == "sdxl-small" else SDXL_BASE_UNET))
    tok = PromptTokenizer.from_hf(_tokenizer("clip"))
    # SDXL conditions on the penultimate layer of both towers, without the final LayerNorm.
    clip_l = CLIPTextEncoder(CLIPTextEncoderConfig(hidden_layers=11, final_layer_norm=False))
    clip_g = CLIPTextEncoder(CLIPTextEncoderConfig(
        hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, hidden_act="gelu",
        hidden_layers=31, final_layer_norm=False, projection_dim=1280,
    ))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusersSDXLBackend(
        unet, vae, TextTower("clip_l", clip_l, tok), TextTower("clip_g", clip_g, replace(tok, pad_id=0)), sched,
        device=device,
    )


def _tokenizer(kind: str):
    from transformers import CLIPTokenizer

    comfy = Path(os.environ.get("COMFYUI_DIR") or Path.home() / "ComfyUI") / "comfy" / "sd1_tokenizer"
    if kind == "clip" and (comfy / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(comfy)
    # character-level CLIP BPE vocabulary: any lowercase prompt tokenizes, no download needed
    chars = list("!\"#$%&'()*+,-./") + list(string.digits) + list(":;<=>?@[]_") + list(string.ascii_lowercase)
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder = Path(tempfile.mkdtemp(prefix="fb_tok_"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder)


def build_backend(size: str, device: str) -> DiffusersBackend:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    s = SIZES[size]
    torch.manual_seed(0)
    hf_tok = _tokenizer(s["vocab"])
    text = CLIPTextEncoder(CLIPTextEncoderConfig(
        vocab_size=len(hf_tok), hidden_size=s["ctx"], num_layers=s["text_layers"], num_heads=s["text_heads"],
        intermediate_size=s["ffn"], hidden_act="quick_gelu" if s["ctx"] == 768 else "gelu",
    ))
    n = len(s["blocks"])
    unet = UNet2DConditionModel(
        sample_size=s["latent"], block_out_channels=s["blocks"], layers_per_block=2 if size != "small" else 1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=s["ctx"], attention_head_dim=s["heads"], use_linear_projection=s["linear_proj"],
        norm_num_groups=32 if size != "small" else 8,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    family = {768: "sd1", 1024: "sd2"}.get(s["ctx"], "sd1")
    return DiffusersBackend(unet, vae, text, PromptTokenizer.from_hf(hf_tok), sched, family=family, device=device)


def run_and_batch(backend, size: dict, settings, device: str):
    """The Cross Initialization run under test, and one batch of its shape for the baseline: latents, noise and
    timesteps (the generator is returned for more draws)."""
    batch, side = size["batch"], size["latent"]
    images = torch.rand(1, side * 2, side * 2, 3)  # the stand-in VAEs halve the resolution: latents side x side
    job = ci.CrossInitRun(backend, images, settings)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, side, side, generator=gen).to(device)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return job, gen, (latents, noise, t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=10, help="timed repetitions of each (after 2 warm-ups)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: CPU time of several threads counts their idle spinning)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    s = SIZES[args.size]
    if s.get("sdxl"):
        return run_sdxl(args)
    backend = build_backend(args.size, args.device)
    batch, side = s["batch"], s["latent"]
    job, gen, (latents, noise, t) = run_and_batch(backend, s, ci.make_settings("full", resolution=side * 2), args.device)
    engine: TextualInversionEngine = job.engine
    amp = engine._amp_dtype
    context = torch.randn(batch, 77, s["ctx"], generator=gen).to(args.device).requires_grad_()

    bare_unet = unet_fwd_bwd(backend.unet, backend.add_noise, latents, noise, t, context, amp)
    prompts = ci.training_prompts()[:batch]

    def text_only() -> None:
        with torch.autocast("cuda", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
            cond = backend.encode_prompts(prompts, ci.PLACEHOLDERS, engine.params)
        cond.float().square().mean().backward()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        text_only()
    text_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        bare_unet()
    unet_flops = fc.get_total_flops()

    step_times, unet_times = paired(engine.step, bare_unet, args.steps, args.device, cpu_clock=CPU_CLOCK, warmup=2)
    text_times = [timed(text_only, args.device, CPU_CLOCK) for _ in range(args.steps)]
    step, unet = statistics.median(step_times), statistics.median(unet_times)
    ratio = median_ratio(step_times, unet_times)
    print(f"device={args.device} size={args.size} batch={batch} latents={side}x{side} context=77x{s['ctx']} "
          f"text_layers={s['text_layers']} autocast={amp} threads={torch.get_num_threads()} "
          f"clock={clock_name(args.device, CPU_CLOCK)}")
    print(f"cross_init step        median {step * 1000:9.1f} ms  (min {min(step_times) * 1000:.1f})")
    print(f"bare UNet fwd+bwd      median {unet * 1000:9.1f} ms  (min {min(unet_times) * 1000:.1f})")
    print(f"text tower fwd+bwd     median {statistics.median(text_times) * 1000:9.1f} ms  "
          f"(FLOP share of the UNet's fwd+bwd: {100 * text_flops / unet_flops:.1f} %)")
    print(f"ratio of medians {step / unet:.3f}, of minima {min(step_times) / min(unet_times):.3f}, "
          f"median of paired ratios {ratio:.3f}")
    print(f"RESULT cross_init_step_over_unet_fwd_bwd {ratio:.3f} target <= 1.25")


def run_sdxl(args) -> None:
    from facebooth.pipelines.text_encoder import batch_tokenize_with_slots

    s = SIZES[args.size]
    backend = build_sdxl_backend(args.size, args.device)
    batch, side = s["batch"], s["latent"]
    job, _, (latents, noise, t) = run_and_batch(backend, s, replace_settings(side * 2, batch), args.device)
    engine: TextualInversionEngine = job.engine
    amp = engine._amp_dtype
    prompts = ci.training_prompts()[:batch]
    towers = {tw.key: tw for tw in backend.text_encoders}
    tokens = {k: batch_tokenize_with_slots(tw.tokenizer, prompts, ci.PLACEHOLDERS, device=args.device) for k, tw in towers.items()}
    eos = (tokens["clip_g"][0] == towers["clip_g"].tokenizer.eos_id).int().argmax(-1)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in job.init.items()}

    def bare() -> None:
        with torch.autocast("cuda", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
            outs = {k: towers[k].encoder(tokens[k][0], slot_ids=tokens[k][1], slot_vectors=leaves[k].to(args.device),
                                         pooled_positions=eos if k == "clip_g" else None) for k in towers}
            cond = {"context": torch.cat([outs["clip_l"].last_hidden_state, outs["clip_g"].last_hidden_state], -1),
                    "pooled": outs["clip_g"].pooled}
            pred = backend.predict(backend.add_noise(latents, noise, t), t, cond)
        loss = F.mse_loss(pred.float(), noise.float())
        for v in leaves.values():
            v.grad = None
        loss.backward()
        float(loss.detach())

    step_times, bare_times = paired(engine.step, bare, args.steps, args.device, cpu_clock=CPU_CLOCK, warmup=2)
    ratio = median_ratio(step_times, bare_times)
    print(f"device={args.device} size={args.size} batch={batch} latents={side}x{side} towers=CLIP-L+CLIP-G (full size) "
          f"autocast={amp} threads={torch.get_num_threads()} clock={clock_name(args.device, CPU_CLOCK)}")
    print(f"cross_init SDXL step          median {statistics.median(step_times) * 1000:9.1f} ms  (min {min(step_times) * 1000:.1f})")
    print(f"bare UNet + both TE fwd+bwd   median {statistics.median(bare_times) * 1000:9.1f} ms  (min {min(bare_times) * 1000:.1f})")
    print(f"RESULT cross_init_sdxl_step_over_unet_te_fwd_bwd {ratio:.3f} target <= 1.15")


def replace_settings(resolution: int, batch: int):
    return ci.make_settings("full", resolution=resolution, batch_size=batch)


if __name__ == "__main__":
    main()
