"""Timing shared by the benchmarks: one clock rule, one paired measurement, one ratio.

On a GPU the clock is wall time after synchronising. On a CPU it is CPU time (of this thread for the
single-threaded benchmarks, of the process where several threads work), which other jobs on a shared machine
disturb far less than wall time. Two variants are always timed side by side, in pairs, so load drift cancels.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

Clock = Callable[[], float]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock_for(device: torch.device | str, cpu_clock: Clock = time.thread_time) -> Clock:
    return time.perf_counter if torch.device(device).type == "cuda" else cpu_clock


def clock_name(device: torch.device | str, cpu_clock: Clock = time.thread_time) -> str:
    if torch.device(device).type == "cuda":
        return "wall time"
    return "process CPU time" if cpu_clock is time.process_time else "thread CPU time"


def timed(fn: Callable[[], object], device: torch.device | str, cpu_clock: Clock = time.thread_time) -> float:
    """Seconds one call of ``fn`` takes, by the clock above."""
    clock = clock_for(device, cpu_clock)
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def paired(a: Callable[[], object], b: Callable[[], object], repeats: int, device: torch.device | str, *,
           cpu_clock: Clock = time.thread_time, abba: bool = True, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Times of ``a`` and ``b``, one pair per repeat, back to back.

    ``abba`` alternates which goes first, so a drift in load or clocks favours neither.
    """
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for r in range(repeats):
        first_a = not abba or r % 2 == 0
        if first_a:
            times_a.append(timed(a, device, cpu_clock))
            times_b.append(timed(b, device, cpu_clock))
        else:
            times_b.append(timed(b, device, cpu_clock))
            times_a.append(timed(a, device, cpu_clock))
    return times_a, times_b


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-pair ratios: each pair saw nearly the same machine state."""
    return statistics.median(x / y for x, y in zip(numerators, denominators, strict=True))


def unet_fwd_bwd(unet, add_noise: Callable, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor, amp: torch.dtype | None) -> Callable[[], None]:
    """A bare denoising-loss forward and backward through a diffusers UNet into ``context``: the cost any
    textual-inversion step has to pay, the denominator of the training benchmarks."""

    def step() -> None:
        with torch.autocast("cuda", dtype=amp) if amp else torch.autocast("cpu", enabled=False):
            pred = unet(add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        context.grad = None
        loss.backward()
        float(loss.detach())  # the engines read their loss every step too

    return step


def sampling_args(description: str, sizes: list[str], repeats: int, what: str) -> argparse.ArgumentParser:
    """The options every paired sampling benchmark takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", choices=sizes)
    ap.add_argument("--repeats", type=int, default=repeats, help=f"paired {what} runs (ABBA order)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU-time measurement is exact)")
    return ap


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """fp16 on a GPU as users run it, fp32 on a CPU, whose thread count follows --threads."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


def report_pair(label_a: str, times_a: list[float], label_b: str, times_b: list[float]) -> float:
    """Print both medians and the per-pair ratios a/b; return their median."""
    width = max(len(label_a), len(label_b))
    for label, times in ((label_a, times_a), (label_b, times_b)):
        print(f"{label + ':':{width + 1}s} median {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms")
    ratios = [a / b for a, b in zip(times_a, times_b, strict=True)]
    print(f"per-pair ratios: {', '.join(f'{x:.3f}' for x in ratios)}")
    return statistics.median(ratios)
