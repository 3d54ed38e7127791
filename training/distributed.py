"""What makes a training run give the same model on any number of processes.

* :class:`SampleRandom`: every random draw of a step (noise, timesteps, VAE sampling, dropout, augmentation,
  sample modes) comes from a generator keyed by (seed, micro-step, global sample position, purpose). Process r of
  W holds global positions r*B .. r*B+B-1 of the step's global batch (see ``StepBatches``), so a sample sees the same
  draws whatever the world size, and a resume on another process count continues the same trajectory.
* :class:`PerSampleDropout`: ``nn.Dropout`` with its mask drawn per sample from those generators.
* :class:`GlobalBatchNorm` / :func:`sync_batchnorm`: BatchNorm whose training statistics are those of the global
  batch. On CUDA this is ``torch.nn.SyncBatchNorm``; on CPU (gloo), which SyncBatchNorm does not support, the
  per-channel sums are all-reduced with autograd (``torch.distributed.nn.functional.all_reduce``), so the forward,
  the gradient and the running statistics equal a 1-process run on the global batch.
* :func:`check_world_size`: refuses a launch whose processes did not join one process group.
* :func:`setup_logging`: console lines from the main process only (other ranks report errors).
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


# --- launch -------------------------------------------------------------------------------------------------


def check_world_size(num_processes: int, environ: dict | None = None) -> None:
    """Refuse when the launcher started ``WORLD_SIZE`` processes but accelerate joined a different number.

    ``accelerate launch --multi_gpu`` on a machine without a usable distributed backend (e.g. no CUDA and no
    ``ACCELERATE_USE_CPU``) starts N independent 1-process runs that would append the same steps into one folder.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WORLD_SIZE")
    if raw is None or not str(raw).strip().isdigit():
        return
    if int(raw) != num_processes:
        raise SystemExit(
            f"The launcher started WORLD_SIZE={raw} processes, but accelerate set up {num_processes} (no distributed "
            f"backend joined them), so each would train alone into the same output folder. On GPUs check that every "
            f"process sees CUDA; on CPU launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {raw} ...` (gloo)."
        )


def setup_logging(is_main: bool) -> None:
    """INFO lines on the console from the main process only; the other ranks keep errors."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if is_main:
        return
    logging.getLogger().setLevel(logging.ERROR)  # every logger without its own level: ours, and the script's __main__
    for name in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # the main process shows the same warnings once


def start_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1):
    """An ``Accelerator`` after the world-size check, with main-process-only logging."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    check_world_size(accelerator.num_processes)
    setup_logging(accelerator.is_main_process)
    return accelerator


# --- per-sample randomness ----------------------------------------------------------------------------------


def sample_seed(seed: int, step: int, position: int, purpose: str) -> int:
    """A 63-bit seed from the key; a stable hash (Python's ``hash`` of a str differs per process)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{position}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SampleRandom:
    """Random draws for the samples at ``positions`` of the global batch of micro-step ``step``.

    Each (sample, purpose) has its own CPU generator, so the draws do not depend on the batch split, on the order in
    which purposes are used, or on the device. Tensors come back on the CPU; move them where they are needed.
    """

    def __init__(self, seed: int, step: int, positions: Sequence[int]) -> None:
        self.seed, self.step, self.positions = int(seed), int(step), [int(p) for p in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def generators(self, purpose: str) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(sample_seed(self.seed, self.step, p, purpose)) for p in self.positions]

    def randn(self, purpose: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal."""
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators(purpose)])

    def rand(self, purpose: str, shape: Sequence[int] = ()) -> torch.Tensor:
        """(B, *shape) uniform in [0, 1)."""
        return torch.stack([torch.rand(tuple(shape), generator=g) for g in self.generators(purpose)])

    def randint(self, purpose: str, high: int) -> torch.Tensor:
        """(B,) int64 in [0, high)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators(purpose)])


class RandomSlot:
    """Where the training loop puts the current step's :class:`SampleRandom` for modules that draw inside forward."""

    def __init__(self) -> None:
        self.current: SampleRandom | None = None


class PerSampleDropout(nn.Module):
    """``nn.Dropout`` whose mask for row i is drawn from sample i's generator (purpose: this layer's name)."""

    def __init__(self, p: float, name: str, slot: RandomSlot) -> None:
        super().__init__()
        self.p, self.name = float(p), name
        self.__dict__["slot"] = slot  # plain attribute: not a submodule, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rng = self.slot.current
        if rng is None:  # used outside the training loop: ordinary dropout
            return F.dropout(x, self.p, True)
        if len(rng) != x.shape[0]:
            raise ValueError(f"PerSampleDropout {self.name}: {x.shape[0]} rows but draws for {len(rng)} samples.")
        keep = (rng.rand(f"dropout:{self.name}", x.shape[1:]) >= self.p).to(device=x.device, dtype=x.dtype)
        return x * keep / (1.0 - self.p)


def per_sample_dropout(module: nn.Module, slot: RandomSlot) -> int:
    """Replace every ``nn.Dropout`` inside ``module`` by :class:`PerSampleDropout`; returns how many."""
    count = 0
    for name, child in list(module.named_modules()):
        for key, sub in list(child.named_children()):
            if type(sub) is nn.Dropout:
                setattr(child, key, PerSampleDropout(sub.p, f"{name}.{key}".lstrip("."), slot))
                count += 1
    return count


# --- BatchNorm over the global batch ------------------------------------------------------------------------


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any input (N, C, ...)) whose training statistics are all-reduced over the process group.

    Two all-reduces (sum, then the centred sum of squares, as a 1-process BatchNorm computes the variance), both
    differentiable: the backward all-reduces the statistics' gradients, which with DDP's gradient average gives the
    gradient of the global-batch mean loss. Running statistics use the global count (unbiased variance). Eval mode,
    or a single process, is plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or _world() == 1:
            return super().forward(x)
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        mean = all_reduce(x.sum(dims)) / n
        centred = x - mean.reshape(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=m)
        return y


def sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Global-batch BatchNorm for a multi-process run: ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` else.

    Call before wrapping for DDP. A 1-process run gets ``module`` back unchanged.
    """
    if _world() == 1:
        return module
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        # the very same parameters and buffers (an optimizer built before the conversion keeps training them)
        for name, p in module.named_parameters(recurse=False):
            setattr(new, name, p)
        for name, b in module.named_buffers(recurse=False):
            setattr(new, name, b)
        new.train(module.training)
        return new
    for key, child in list(module.named_children()):
        setattr(module, key, _to_global_bn(child))
    return module
