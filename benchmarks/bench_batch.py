"""Throughput of ``facebooth batch`` against a bare /prompt loop, and two servers against one, in one run.

    python benchmarks/bench_batch.py [--device cpu|cuda] [--size small] [--jobs 12] [--rounds 2] [--comfyui-dir DIR]

Two ComfyUI servers are started on the random SD1.5 test checkpoint (``basic_txt2img`` example at its test
size: 64 px, 4 steps), each with one torch thread (``OMP_NUM_THREADS=1``) on CPU. Per round, with fresh seeds
each time (so ComfyUI's cache never skips a sampler):

* ``bare``: the loop users write by hand on server A: post /prompt, wait for it, download the image;
* ``batch x1``: the same number of jobs through the batch runner on server A (journal, files, report);
* ``batch x2``: the same number of jobs through the batch runner on servers A and B.

Rounds alternate the order (ABC, CBA, ...) to spread machine noise; figures are ratios of summed wall time.

* ``batch_throughput_over_bare_prompt_loop`` = images/s of batch x1 / images/s of bare. Target >= 0.97.
* ``batch_two_servers_over_one`` = images/s of batch x2 / batch x1. Target >= 1.7 (needs two free cores).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from facebooth.runner import examples as ex
from facebooth.runner import local_setup, placeholders
from facebooth.runner.batch.dispatcher import Settings
from facebooth.runner.batch.jobs import matrix_jobs
from facebooth.runner.batch.run import BatchSpec, execute
from facebooth.runner.batch.servers import ComfyBackend, HttpTransport
from facebooth.runner.client import ComfyClient
from facebooth.runner.server import ComfyServer


def start_servers(comfyui_dir: str, n: int, cpu: bool, cache: Path) -> tuple[list[ComfyServer], dict]:
    servers, subs = [], {}
    for _ in range(n):
        base = Path(tempfile.mkdtemp(prefix="facebooth-bench-batch-"))
        subs = local_setup.prepare_base_dir(base, comfyui_dir=comfyui_dir, cache_dir=cache).substitutions
        servers.append(ComfyServer(comfyui_dir, base, cpu=cpu, startup_timeout=900, die_with_parent=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))
    for s in servers:  # started from the main thread, so they end with this process
        s.start()
    return servers, subs


def bare_loop(url: str, workflow: dict, values: dict, seeds: range) -> float:
    client = ComfyClient(url)
    t = time.perf_counter()
    for seed in seeds:
        api = placeholders.substitute(workflow, {**values, "SEED": seed}, name="bench")
        pid = client.queue_prompt(api)
        entry = client.wait(pid, timeout=900)
        assert client.output_images(pid, entry), "no image"
    client.close()
    return time.perf_counter() - t


def batch_run(urls: list[str], workflow: dict, values: dict, seeds: range, out: Path) -> float:
    jobs = matrix_jobs(None, None, seeds=len(seeds), seed_base=seeds.start)
    spec = BatchSpec(workflow, "bench", jobs, values, out, Settings(inflight=2))
    t = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        outcome = asyncio.run(execute(spec, [ComfyBackend(HttpTransport(u), 2) for u in urls], handle_signals=False,
                                      progress_stream=quiet))
    elapsed = time.perf_counter() - t
    assert outcome.counts.get("done") == len(seeds), outcome
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=("small",), default="small")
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    args = p.parse_args()
    if not args.comfyui_dir:
        print("Set COMFYUI_DIR or pass --comfyui-dir", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    cache = Path(os.environ.get("FACEBOOTH_TEST_CACHE") or Path.home() / ".cache" / "facebooth-test")
    workflow = ex.load_workflow(Path(ex.API_DIR) / "basic_txt2img_api.json")
    servers, subs = start_servers(args.comfyui_dir, 2, args.device == "cpu", cache)
    values = {**subs, "WORKFLOW": "bench"}
    try:
        a, b = (s.url for s in servers)
        warm = [threading.Thread(target=bare_loop, args=(u, workflow, values, range(10**6 + i, 10**6 + i + 1)))
                for i, u in enumerate((a, b))]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        work = Path(tempfile.mkdtemp(prefix="facebooth-bench-batch-out-"))
        totals = {"bare": 0.0, "x1": 0.0, "x2": 0.0}
        seed = 0
        for r in range(args.rounds):
            order = ["bare", "x1", "x2"] if r % 2 == 0 else ["x2", "x1", "bare"]
            for phase in order:
                seeds = range(seed, seed + args.jobs)
                seed += args.jobs
                if phase == "bare":
                    dt = bare_loop(a, workflow, values, seeds)
                else:
                    dt = batch_run([a] if phase == "x1" else [a, b], workflow, values, seeds, work / f"{phase}-{r}")
                totals[phase] += dt
                print(f"round {r} {phase:>4}: {args.jobs} images in {dt:6.1f} s ({args.jobs / dt:.3f} img/s)", flush=True)
        n = args.jobs * args.rounds
        print(f"totals over {n} images each: bare {totals['bare']:.1f} s, batch x1 {totals['x1']:.1f} s, "
              f"batch x2 {totals['x2']:.1f} s (device {args.device}, one torch thread per server)")
        print(f"RESULT batch_throughput_over_bare_prompt_loop {totals['bare'] / totals['x1']:.3f} target >= 0.97")
        print(f"RESULT batch_two_servers_over_one {totals['x1'] / totals['x2']:.3f} target >= 1.7")
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
