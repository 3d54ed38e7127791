"""Cost of one Cross Initialization optimisation step vs a bare UNet forward + backward.

    python benchmarks/bench_cross_init.py [--device cpu|cuda] [--size small|sd15|sd21] [--steps N]

Both run in this process, interleaved, on the same random-weight models, the same batch shape (latents,
timesteps, 77-token context) and the same autocast setting. The baseline is the least any textual
inversion step must do: UNet forward, MSE, backward to the context (model frozen). The step adds prompt
tokenisation, the text encoder forward/backward through the injected rows, noising, the regulariser and
AdamW. Sizes: ``small`` (tiny, for CPU), ``sd15`` (SD1.5 UNet + CLIP-L shapes), ``sd21`` (SD2.1-base UNet
+ 23-layer OpenCLIP-H text tower). Only ratios count on a CPU; there the clock is the process CPU time, so
other jobs on a shared machine disturb the figure less. The FLOP share of the text tower is printed so a
size's proportions can be compared with real SD (CLIP-L ≈ 2-3 %, OpenCLIP-H ≈ 5-6 % of the UNet).
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

SIZES = {
    # unet block widths, attention heads (per block), context width, text layers/heads/ffn, latent side, batch
    # small keeps SD's proportions: the text tower costs a few percent of the UNet (printed as a FLOP share)
    "small": dict(blocks=(32, 64), heads=4, ctx=64, text_layers=2, text_heads=4, ffn=256, latent=32, batch=8,
                  linear_proj=False, vocab="tiny"),
    "sd15": dict(blocks=(320, 640, 1280, 1280), heads=8, ctx=768, text_layers=12, text_heads=12, ffn=3072, latent=64,
                 batch=8, linear_proj=False, vocab="clip"),
    "sd21": dict(blocks=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), ctx=1024, text_layers=23, text_heads=16,
                 ffn=4096, latent=64, batch=8, linear_proj=True, vocab="clip"),
}


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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    backend = build_backend(args.size, args.device)
    batch, side = s["batch"], s["latent"]
    # The VAE above halves the resolution; choose pixels so the latents are side x side.
    images = torch.rand(1, side * 2, side * 2, 3)
    settings = ci.make_settings("full", resolution=side * 2)
    job = ci.CrossInitRun(backend, images, settings)
    engine: TextualInversionEngine = job.engine
    amp = engine._amp_dtype

    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, side, side, generator=gen).to(args.device)
    noise = torch.randn(latents.shape, generator=gen).to(args.device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(args.device)
    context = torch.randn(batch, 77, s["ctx"], generator=gen).to(args.device).requires_grad_()

    def bare_unet() -> None:
        with torch.autocast("cuda", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
            pred = backend.unet(backend.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        context.grad = None
        loss.backward()
        float(loss.detach())  # the engine reads its loss every step too

    clock = time.perf_counter if args.device == "cuda" else time.process_time

    def timed(fn) -> float:
        _sync(args.device)
        start = clock()
        fn()
        _sync(args.device)
        return clock() - start

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

    for _ in range(2):
        engine.step()
        bare_unet()
    step_times, unet_times, text_times = [], [], []
    for _ in range(args.steps):
        step_times.append(timed(engine.step))
        unet_times.append(timed(bare_unet))
        text_times.append(timed(text_only))
    step, unet = statistics.median(step_times), statistics.median(unet_times)
    # Median of paired ratios: each pair ran back to back, so load drift on a shared machine cancels.
    ratio = statistics.median(a / b for a, b in zip(step_times, unet_times))
    print(f"device={args.device} size={args.size} batch={batch} latents={side}x{side} context=77x{s['ctx']} "
          f"text_layers={s['text_layers']} autocast={amp} threads={torch.get_num_threads()} "
          f"clock={'wall' if args.device == 'cuda' else 'process CPU time'}")
    print(f"cross_init step        median {step * 1000:9.1f} ms  (min {min(step_times) * 1000:.1f})")
    print(f"bare UNet fwd+bwd      median {unet * 1000:9.1f} ms  (min {min(unet_times) * 1000:.1f})")
    print(f"text tower fwd+bwd     median {statistics.median(text_times) * 1000:9.1f} ms  "
          f"(FLOP share of the UNet's fwd+bwd: {100 * text_flops / unet_flops:.1f} %)")
    print(f"ratio of medians {step / unet:.3f}, of minima {min(step_times) / min(unet_times):.3f}, "
          f"median of paired ratios {ratio:.3f}")
    print(f"RESULT cross_init_step_over_unet_fwd_bwd {ratio:.3f} target <= 1.25")


if __name__ == "__main__":
    main()
