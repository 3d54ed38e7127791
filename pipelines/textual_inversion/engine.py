"""Test-time optimisation of injected token embeddings against the denoising loss (textual inversion).

Shared by Cross Initialization and PersonaMagic. The recipe follows the diffusers textual-inversion
example that Cross Initialization builds on: per step a batch of B samples, each a random reference image
(random horizontal flip), a fresh VAE posterior sample, uniform timestep, Gaussian noise and a random
prompt template; MSE(prediction, target) plus a method-supplied regulariser; AdamW on the new token rows
only, constant learning rate. Everything else is frozen.

The reference images are VAE-encoded once (both orientations, since a VAE is not flip-equivariant), and
the posterior is re-sampled from the stored mean/std each step, which is what re-encoding would give.
"""
from __future__ import annotations

import logging
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ..runtime import NO_HOOKS, RunHooks
from .backend import EncodedImages, TIBackend

log = logging.getLogger(__name__)

Regularizer = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class StaticTokenEmbeddings(torch.nn.Module):
    """The learnable thing of plain textual inversion: one (K, D) matrix per text tower, timestep-free.

    The engine accepts any module with this interface: ``forward(timesteps) -> {tower key: (K, D) or (B, K, D)}``
    (PersonaMagic's timestep mapper returns per-sample vectors).
    """

    def __init__(self, init: Mapping[str, torch.Tensor]):
        super().__init__()
        self.vectors = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v.detach().float().clone()) for k, v in init.items()}
        )

    def forward(self, timesteps: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        return dict(self.vectors.items())


class NonFiniteLossError(RuntimeError):
    """The optimisation diverged (NaN/inf loss or embedding)."""


@dataclass
class TIConfig:
    steps: int
    batch_size: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    flip_p: float = 0.5
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" (bf16/fp16 autocast on CUDA, off elsewhere) | "no" | "fp16" | "bf16"
    preview_every: int = 0  # 0: no previews; otherwise decode the predicted clean image every N steps

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch size must be at least 1 (got {self.steps}, {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")


@dataclass
class TIResult:
    vectors: dict[str, torch.Tensor]  # per tower key, (K, D) float32 on the CPU
    loss_history: list[float] = field(default_factory=list)  # total loss per step
    diffusion_loss_history: list[float] = field(default_factory=list)
    reg_loss_history: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.loss_history)


class TextualInversionEngine:
    """Holds the learnable vectors and runs optimisation steps; ``run()`` does them all."""

    def __init__(
        self,
        backend: TIBackend,
        images: torch.Tensor,
        prompts: Sequence[str],
        placeholders: Sequence[str],
        init_vectors: "Mapping[str, torch.Tensor] | torch.nn.Module",
        config: TIConfig,
        regularizer: Optional[Regularizer] = None,
        hooks: RunHooks = NO_HOOKS,
    ):
        config.validate()
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("the reference images contain NaN or infinite pixels; load them again")
        dims = backend.embedding_dims
        if not isinstance(init_vectors, torch.nn.Module):
            if set(init_vectors) != set(dims):
                raise ValueError(
                    f"init vectors are for {sorted(init_vectors)} but the model's text towers are {sorted(dims)}"
                )
            for key, vec in init_vectors.items():
                if tuple(vec.shape) != (len(placeholders), dims[key]):
                    raise ValueError(f"{key}: init vectors {tuple(vec.shape)} != ({len(placeholders)}, {dims[key]})")
            init_vectors = StaticTokenEmbeddings(init_vectors)
        missing = [p for p in prompts if any(ph not in p for ph in placeholders)]
        if not prompts or missing:
            raise ValueError(f"every prompt must contain all placeholders {list(placeholders)}; bad: {missing[:2]}")

        self.backend = backend
        self.config = config
        self.prompts = list(prompts)
        self.placeholders = list(placeholders)
        self.regularizer = regularizer
        self.hooks = hooks
        self.device = torch.device(backend.device)
        self._images = images
        self._latents: Optional[EncodedImages] = None
        self.embeddings = init_vectors.to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.embeddings.parameters() if p.requires_grad],
            lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.adam_eps,
        )
        self._rng = random.Random(config.seed)
        self._gen = torch.Generator().manual_seed(config.seed)
        self._order: list[int] = []
        self._amp_dtype = self._autocast_dtype()
        self._scaler = torch.amp.GradScaler("cuda") if self._amp_dtype == torch.float16 else None
        self.result = TIResult(vectors={})
        self._last: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        """The learnable (K, D) matrices of a static embedding (empty for other embedding modules)."""
        vectors = getattr(self.embeddings, "vectors", None)
        return dict(vectors.items()) if isinstance(vectors, torch.nn.ParameterDict) else {}

    # ------------------------------------------------------------------ setup
    def _autocast_dtype(self) -> Optional[torch.dtype]:
        mp = self.config.mixed_precision
        if self.device.type != "cuda" or mp == "no":
            return None
        if mp == "bf16" or (mp == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    def _encode_references(self) -> EncodedImages:
        if self._latents is None:
            imgs = self._images.detach().clone().float()  # clone: ComfyUI hands over inference-mode tensors
            both = torch.cat([imgs, imgs.flip(-1)])  # second half = mirrored references
            enc = self.backend.encode_images(both)
            self._latents = EncodedImages(
                mean=enc.mean.detach().float(), std=None if enc.std is None else enc.std.detach().float()
            )
        return self._latents

    def _pick_images(self, n: int) -> list[int]:
        count = self._images.shape[0]
        picks = []
        for _ in range(n):
            if not self._order:  # a shuffled pass over the references, like a shuffled data loader
                self._order = list(range(count))
                self._rng.shuffle(self._order)
            index = self._order.pop()
            flipped = self._rng.random() < self.config.flip_p
            picks.append(index + count * flipped)
        return picks

    # ------------------------------------------------------------------ optimisation
    def step(self) -> float:
        """One optimisation step; returns the total loss."""
        self.hooks.check_interrupt()
        with torch.inference_mode(False), torch.enable_grad():
            return self._step()

    def _step(self) -> float:
        cfg, backend = self.config, self.backend
        enc = self._encode_references()
        b = cfg.batch_size
        picks = torch.tensor(self._pick_images(b), device=enc.mean.device)
        prompts = [self._rng.choice(self.prompts) for _ in range(b)]
        mean = enc.mean[picks]
        latents = mean
        if enc.std is not None:
            latents = mean + enc.std[picks] * torch.randn(mean.shape, generator=self._gen).to(mean.device)
        latents = latents.to(self.device)
        noise = torch.randn(latents.shape, generator=self._gen).to(self.device)
        timesteps = backend.sample_timesteps(b, self._gen).to(self.device)
        noisy = backend.add_noise(latents, noise, timesteps)
        target = backend.target(latents, noise, timesteps)

        amp = torch.autocast("cuda", dtype=self._amp_dtype) if self._amp_dtype is not None else nullcontext()
        vectors = self.embeddings(timesteps)
        with amp:
            cond = backend.encode_prompts(prompts, self.placeholders, vectors)
            pred = backend.predict(noisy, timesteps, cond)
        diffusion = F.mse_loss(pred.float(), target.float(), reduction="mean")
        reg = self.regularizer(vectors) if self.regularizer is not None else diffusion.new_zeros(())
        loss = diffusion + reg
        value = self._optimizer_step(
            loss, "embedding", "lower the learning rate (or use the 'full' preset), and check the model and reference images."
        )
        self.result.loss_history.append(value)
        self.result.diffusion_loss_history.append(float(diffusion.detach()))
        self.result.reg_loss_history.append(float(reg.detach()))
        self._last = (noisy.detach(), timesteps, pred.detach())
        return value

    def _optimizer_step(self, loss: torch.Tensor, trained: str, advice: str) -> float:
        """Backward and one optimizer step (through the AMP scaler when there is one). A non-finite loss is
        refused before the step and non-finite trained weights after it (NonFiniteLossError naming ``trained``
        and the ``advice``), so a diverged run stops instead of saving NaNs. Returns the loss value."""
        value = float(loss.detach())
        step = len(self.result.loss_history) + 1
        if not math.isfinite(value):
            raise NonFiniteLossError(f"The loss became {value} at step {step}. The optimisation diverged: {advice}")
        self.optimizer.zero_grad(set_to_none=True)
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if not all(torch.isfinite(p).all() for p in self.embeddings.parameters()):
            raise NonFiniteLossError(f"The {trained} became NaN/inf at step {step}: lower the learning rate.")
        return value

    def _preview(self) -> Optional[torch.Tensor]:
        if self._last is None:
            return None
        noisy, t, pred = self._last
        try:
            x0 = self.backend.predicted_x0(noisy[:1], t[:1], pred[:1].float())
            images = self.backend.decode_preview(x0)
        except NotImplementedError:
            return None
        return None if images is None else images[0]

    def run(self) -> TIResult:
        total = self.config.steps
        for done in range(1, total + 1):
            self.step()
            preview = None
            if self.config.preview_every and (done % self.config.preview_every == 0 or done == total):
                with torch.no_grad():
                    preview = self._preview()
            self.hooks.progress(done, total, preview)
        self.result.vectors = self.vectors()
        log.info("textual inversion: %d steps, final loss %.4f", total, self.result.loss_history[-1])
        return self.result

    def vectors(self) -> dict[str, torch.Tensor]:
        """The learned static vectors, (K, D) float32 on the CPU (empty for timestep-dependent modules)."""
        return {k: p.detach().float().cpu().clone() for k, p in self.params.items()}
