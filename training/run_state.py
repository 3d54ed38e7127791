"""Run scaffolding every training script shares: deterministic step batches, the LR schedule (diffusers'),
resumable safetensors-only run state (weights, optimizer tensors, RNG, world size and batch), the JSONL loss log,
and loading a frozen diffusers SD folder. Method-specific datasets live in their own modules."""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_save_safetensors

log = logging.getLogger(__name__)


def load_diffusers_sd(path: str, dtype: torch.dtype, device: torch.device):
    """Tokenizer, text encoder, VAE, UNet (all frozen, eval, on ``device``) and DDPM scheduler of a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    if not (root / "unet").is_dir():
        raise FileNotFoundError(f"{root} is not a diffusers model folder (no unet/). Convert the checkpoint to diffusers format first.")
    tokenizer = CLIPTokenizer.from_pretrained(str(root), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(root), subfolder="text_encoder", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(str(root), subfolder="scheduler")
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False).eval().to(device=device)
    return tokenizer, text_encoder, vae, unet, scheduler


class StepBatches:
    """Deterministic batches: step -> (indices, flips) for this process, from a per-epoch permutation.

    The global batch of a step is ``batch_size * world`` samples; process ``rank`` takes positions
    ``rank * batch_size ...`` of it (:attr:`positions`), so any split of the same global batch sees the same data.
    """

    def __init__(self, n: int, batch_size: int, seed: int, flip: bool = True, rank: int = 0, world: int = 1):
        global_batch = batch_size * world
        if n < global_batch:
            raise ValueError(
                f"The dataset has {n} images, fewer than one batch ({batch_size} x {world} processes). Lower --batch-size."
            )
        self.n, self.batch_size, self.seed, self.flip, self.rank, self.world = n, batch_size, seed, flip, rank, world
        self.per_epoch = n // global_batch  # drop the last partial batch

    @property
    def positions(self) -> list[int]:
        """This process's positions in the global batch (the per-sample random draws are keyed by them)."""
        return list(range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size))

    def __call__(self, step: int) -> tuple[list[int], list[bool]]:
        epoch, k = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        flips = torch.rand(self.n, generator=g) < 0.5
        gb = self.batch_size * self.world
        chunk = perm[k * gb : (k + 1) * gb][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return chunk.tolist(), [bool(flips[i]) and self.flip for i in chunk.tolist()]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, base_lrs: Sequence[float]):
    """diffusers' LR schedule (``constant`` / ``cosine``, with linear warmup when ``warmup`` > 0) over ``base_lrs``.

    It is stepped once per optimizer step, never through ``accelerator.prepare`` (which steps it once per process).
    """
    from diffusers.optimization import get_scheduler

    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = group["initial_lr"] = float(base)  # the command line's rates, also on resume
    name = {"constant": "constant_with_warmup" if warmup > 0 else "constant", "cosine": "cosine"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def schedule_at(scheduler, step: int) -> None:
    """Put ``scheduler`` (a LambdaLR) at ``step``: the schedule is a pure function of the step, so resume needs no state."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


# --- run state ------------------------------------------------------------------------------------------------

_CKPT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _CKPT_RE.match(p.name) and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(_CKPT_RE.match(p.name).group(1)), default=None)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.info("No checkpoint in %s yet; starting from step 0.", output_dir / "checkpoints")
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no state.json). Use --resume latest or a step-* folder.")
    return path


def _optimizer_to_flat(opt_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, state in opt_sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_run_state(
    folder: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    is_main: bool = True,
    scaler: Any = None,
    extra: dict | None = None,
    keep: int = 2,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
) -> None:
    """Write ``folder`` (weights + optimizer from the main process, RNG per process) and prune old checkpoints.

    Every process calls this. ``state.json`` is written last, by the main process, after ``barrier`` (all processes)
    and once the ``world`` RNG files are visible: a folder without it is an interrupted save, ignored by
    ``--resume latest``. ``extra`` should carry ``world_size`` and ``batch_size`` (see :func:`keep_global_batch`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng.cuda.{i}"] = s
    atomic_save_safetensors(rng, folder / f"rng_{rank}.safetensors")
    if barrier is not None:
        barrier()
    if not is_main:
        return
    _wait_for_rng_files(folder, world)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_tensors, opt_info = _optimizer_to_flat(optimizer.state_dict())
    tensors.update(opt_tensors)
    atomic_save_safetensors(tensors, folder / "state.safetensors", {"optimizer": json.dumps(opt_info)})
    info = {"step": step, "scaler": scaler.state_dict() if scaler is not None else None, **(extra or {})}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(folder / "state.json")
    ckpts = sorted(
        (p for p in folder.parent.iterdir() if _CKPT_RE.match(p.name)), key=lambda p: int(_CKPT_RE.match(p.name).group(1))
    )
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _wait_for_rng_files(folder: Path, world: int, timeout_s: float = 60.0) -> None:
    """The other processes' RNG files may show up late on a network file system; a node-local output folder never
    gets them (resume then re-seeds those processes: every draw is per sample, so the trajectory is the same)."""
    deadline = time.monotonic() + timeout_s
    missing = [r for r in range(world) if not (folder / f"rng_{r}.safetensors").is_file()]
    while missing and time.monotonic() < deadline:
        time.sleep(0.2)
        missing = [r for r in missing if not (folder / f"rng_{r}.safetensors").is_file()]
    if missing:
        log.warning("%s: no RNG file from process(es) %s after %.0f s; is --output-dir on storage all nodes share?",
                    folder, missing, timeout_s)


def read_run_info(folder: Path) -> dict:
    """The ``state.json`` of a complete checkpoint."""
    return json.loads((Path(folder) / "state.json").read_text())


def keep_global_batch(info: dict | None, batch_size: int, world: int, accumulation: int = 1) -> int:
    """The per-process batch for a run resuming from a checkpoint with ``info``: the one that keeps the checkpoint's
    global batch (per-process batch x processes) on ``world`` processes. Refuses (SystemExit) when it cannot."""
    if not info or "world_size" not in info or "batch_size" not in info:
        return batch_size
    was_world, was_batch = int(info["world_size"]), int(info["batch_size"])
    was_accum = int(info.get("gradient_accumulation_steps", 1))
    if was_accum != accumulation:
        raise SystemExit(f"The checkpoint was trained with --gradient-accumulation-steps {was_accum}; resume with the same "
                         f"value (got {accumulation}), or start a new run.")
    global_batch = was_batch * was_world
    if batch_size * world == global_batch:
        return batch_size
    if global_batch % world:
        raise SystemExit(
            f"The checkpoint was trained with a global batch of {global_batch} ({was_batch} per process x {was_world} "
            f"processes); {world} processes cannot keep it. Resume on a process count that divides {global_batch}, "
            f"or start a new run (e.g. from the exported weights) to change the batch."
        )
    kept = global_batch // world
    log.warning("Resuming on %d process(es): per-process batch %d (not %d) keeps the checkpoint's global batch of %d.",
                world, kept, batch_size, global_batch)
    return kept


def load_run_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    scaler: Any = None,
) -> dict:
    """Restore what :func:`save_run_state` wrote; returns the state.json contents (``step`` etc.)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    info = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    with safe_open(str(folder / "state.safetensors"), "pt") as f:
        opt_info = json.loads(f.metadata()["optimizer"])
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    optimizer.load_state_dict(_optimizer_from_flat(tensors, opt_info))
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    rng_file = folder / f"rng_{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["rng.torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    else:  # a resume on more processes than the checkpoint had; the training draws are per sample anyway
        log.info("%s has no RNG state for process %d; it keeps its seed (every training draw is per sample).", folder, rank)
    return info


def append_log(output_dir: Path, record: dict) -> None:
    with open(output_dir / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(output_dir: Path, step: int) -> None:
    """Drop log records after ``step`` (steps an interrupted run did after its last checkpoint)."""
    records = [r for r in read_log(output_dir) if r.get("step", 0) <= step]
    path = Path(output_dir) / "train_log.jsonl"
    if path.is_file():
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
