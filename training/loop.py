"""The ``main()`` skeleton the four accelerate training scripts share.

A script parses its arguments, builds its models and data, then hands :class:`TrainingRun` a ``compute`` function
(one micro-batch -> losses). The run does the rest the same way for every script:

* launch: refuses a ``WORLD_SIZE`` that accelerate did not join; console lines from the main process only;
  the same initial seed on every process (the per-step draws are per sample, see ``distributed.SampleRandom``);
* data: ``StepBatches`` over the global batch; process r takes positions r*B .. r*B+B-1;
* resume: the checkpoint records world size, per-process batch and accumulation; a resume keeps the global batch
  (or refuses with a message) and restores weights, optimizer, the LR schedule position and the log;
* step: accumulate, backward, clip, optimizer and (diffusers) LR scheduler step; a non-finite loss on any process
  stops every process with a message;
* log: ``train_log.jsonl`` records the mean over processes (``sums`` keys: the sum), written by the main process;
* save: every process writes its RNG file, the main process waits for all of them, then writes weights, optimizer,
  ``state.json`` (the "complete" mark) and the script's output files.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import SampleRandom, start_accelerator
from .run_state import (
    StepBatches,
    append_log,
    checkpoint_dir,
    keep_global_batch,
    load_run_state,
    make_scheduler,
    read_run_info,
    resolve_resume,
    save_run_state,
    schedule_at,
    truncate_log,
)

log = logging.getLogger(__name__)

Compute = Callable[[list[int], list[bool], SampleRandom], dict[str, Any]]


def add_run_arguments(p: argparse.ArgumentParser, *, batch_size: int, max_steps: int | None, save_every: int = 1000,
                      max_grad_norm: float = 1.0, lr_schedule: str = "constant", accumulation: bool = True,
                      max_steps_help: str = "", batch_help: str = "") -> None:
    """The options every script's :class:`TrainingRun` reads (script-specific defaults)."""
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="per process: the global batch is this x processes x accumulation steps" + batch_help)
    if accumulation:
        p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warmup (from 0)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=lr_schedule)
    p.add_argument("--max-steps", type=int, default=max_steps, help=max_steps_help or None)
    p.add_argument("--max-grad-norm", type=float, default=max_grad_norm, help="gradient clipping; 0: off")
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every, help="checkpoint and output files every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoints/step-* folder")
    p.add_argument("--log-every", type=int, default=1)


class TrainingRun:
    """One run of a training script on 1..N processes. ``args`` needs: output_dir, mixed_precision, seed, batch_size,
    no_flip, resume, save_every, keep_checkpoints, log_every, max_grad_norm."""

    def __init__(self, args, name: str, gradient_accumulation_steps: int = 1) -> None:
        self.args, self.name, self.accum = args, name, int(gradient_accumulation_steps)
        self.accelerator = acc = start_accelerator(args.mixed_precision, self.accum)
        self.device, self.rank, self.world, self.is_main = acc.device, acc.process_index, acc.num_processes, acc.is_main_process
        self.out = Path(args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)  # identical fresh weights on every process
        self.resume_from = resolve_resume(self.out, args.resume)
        info = read_run_info(self.resume_from) if self.resume_from is not None else None
        self.batch_size = keep_global_batch(info, args.batch_size, self.world, self.accum)
        self.step = 0
        self.batches: StepBatches | None = None

    # --- setup -------------------------------------------------------------------------------------------------

    def step_batches(self, n: int) -> StepBatches:
        self.batches = StepBatches(n, self.batch_size, self.args.seed, flip=not self.args.no_flip,
                                   rank=self.rank, world=self.world)
        return self.batches

    def restore(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
        """Load the resume checkpoint into the (unwrapped) ``modules`` and ``optimizer``; returns the step."""
        if self.resume_from is None:
            return 0
        info = load_run_state(self.resume_from, modules, optimizer, rank=self.rank, scaler=self.accelerator.scaler)
        self.step = int(info["step"])
        if self.is_main:
            truncate_log(self.out, self.step)
        log.info("Resumed from %s at step %d.", self.resume_from, self.step)
        return self.step

    def scheduler(self, optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int,
                  base_lrs: Sequence[float]):
        """diffusers' LR schedule at the current step (call after :meth:`restore`)."""
        scheduler = make_scheduler(optimizer, schedule, warmup, total, base_lrs)
        schedule_at(scheduler, self.step)
        return scheduler

    # --- collectives -------------------------------------------------------------------------------------------

    def global_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """Sum over processes (no gradient)."""
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach().clone().reshape(-1)
        return self.accelerator.reduce(t, "sum")[0] if self.world > 1 else t[0]

    def reduce_record(self, record: dict[str, float], sums: Sequence[str] = ()) -> dict[str, float]:
        """Mean over processes of each value (``sums`` keys: the sum)."""
        if self.world == 1 or not record:
            return dict(record)
        keys = sorted(record)
        t = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=self.device)
        total = self.accelerator.reduce(t, "sum").cpu()
        return {k: float(v) if k in sums else float(v) / self.world for k, v in zip(keys, total)}

    # --- the loop ----------------------------------------------------------------------------------------------

    def save(self, step: int, modules: dict[str, nn.Module], optimizer, write_outputs: Callable[[int], None],
             extra: dict | None = None) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state = {"world_size": self.world, "batch_size": self.batch_size, "gradient_accumulation_steps": self.accum,
                 "seed": self.args.seed, **(extra or {})}
        save_run_state(checkpoint_dir(self.out, step), step, modules, optimizer, rank=self.rank, is_main=self.is_main,
                       scaler=acc.scaler, keep=self.args.keep_checkpoints, extra=state, world=self.world,
                       barrier=acc.wait_for_everyone)
        if self.is_main:
            write_outputs(step)

    def _check_finite(self, loss: torch.Tensor, step: int, hint: str) -> None:
        bad = float(not bool(torch.isfinite(loss.detach()).all()))
        if self.world > 1:  # every process stops together, none is left waiting in a collective
            bad = float(self.global_sum(bad))
        if bad:
            raise FloatingPointError(f"{self.name}: the loss became non-finite ({loss.item()}) at step {step}; {hint}")

    def train(
        self,
        *,
        max_steps: int,
        compute: Compute,
        models: Sequence[nn.Module],
        optimizer,
        scheduler,
        clip_params: Sequence[torch.Tensor],
        save: Callable[[int], None],
        lr_keys: Sequence[str] = ("lr",),
        sums: Sequence[str] = (),
        evaluate: Callable[[], float] | None = None,
        eval_every: int = 0,
        hint: str = "lower the learning rate or use --mixed-precision no.",
    ) -> int:
        """Train from :attr:`step` to ``max_steps``. ``compute(indices, flips, rng)`` returns ``{"loss": tensor, ...}``
        (other entries are logged); ``save(step)`` writes a checkpoint (usually via :meth:`save`)."""
        acc, args = self.accelerator, self.args
        if self.batches is None:
            raise RuntimeError("call step_batches() before train()")
        eval_on = evaluate is not None and eval_every > 0
        if eval_on and self.step == 0 and self.is_main:
            append_log(self.out, {"step": 0, "eval_loss": evaluate()})
        t0 = time.perf_counter()
        step = self.step
        while step < max_steps:
            lrs = {k: g["lr"] for k, g in zip(lr_keys, optimizer.param_groups)}
            totals: dict[str, float] = {}
            for micro in range(self.accum):
                k = step * self.accum + micro
                indices, flips = self.batches(k)
                rng = SampleRandom(args.seed, k, self.batches.positions)
                with acc.accumulate(*models):
                    out = compute(indices, flips, rng)
                    self._check_finite(out["loss"], step, hint)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and args.max_grad_norm > 0:
                        acc.clip_grad_norm_(clip_params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, v in out.items():
                    totals[key] = totals.get(key, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / self.accum
            scheduler.step()
            step += 1
            self.step = step
            record: dict | None = None
            if step % args.log_every == 0 or step == max_steps:
                record = {"step": step, **self.reduce_record(totals, sums), **lrs}
            if eval_on and (step % eval_every == 0 or step == max_steps) and self.is_main:
                record = {**(record or {"step": step}), "eval_loss": evaluate()}
            if record is not None and self.is_main:
                append_log(self.out, record)
            if step % args.save_every == 0 or step == max_steps:
                save(step)
        acc.wait_for_everyone()
        log.info("%s done: step %d in %.1fs, outputs in %s", self.name, step, time.perf_counter() - t0, self.out)
        acc.end_training()
        return 0
