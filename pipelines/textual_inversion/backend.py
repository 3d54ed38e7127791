"""What the textual-inversion engine needs from a host (diffusers folder, ComfyUI MODEL/CLIP/VAE).

A backend owns the frozen models and the noise schedule; the engine owns the learnable token vectors,
the data sampling, the loss and the optimizer. Implementing a backend means two methods and a few attributes
(``add_noise``/``target`` come for free from ``alphas_cumprod`` + ``prediction_type``):

* ``encode_images(images)``: (N, 3, H, W) in [-1, 1] → :class:`EncodedImages` (scaled latents, the mean of
  the VAE posterior and, if available, its std so the engine can draw a fresh posterior sample per step as
  the diffusers recipe does). Called once per run, so it may be slow.
* ``alphas_cumprod`` (T,) and ``prediction_type`` ("epsilon" | "v_prediction"): the default ``add_noise``
  (DDPM forward process) and ``target`` (ε or v) use them; ComfyUI's ``model_sampling`` gives
  ``alphas_cumprod = 1 / (1 + sigmas²)``. A backend may override both (the diffusers one uses its scheduler).
* ``predict(noisy_latents, timesteps, cond)``: the UNet's output in the same parameterisation as ``target``.
  Must let gradients flow to ``cond`` (ComfyUI: ``apply_model`` under ``torch.inference_mode(False)``,
  converted from its x0 output back to ε / v).
* ``text_encoders``: one :class:`TextTower` per CLIP tower, built with ``pipelines.text_encoder`` from the
  host's weights (ComfyUI: ``CLIPTextEncoder.from_state_dict(clip.get_sd(), prefix="clip_l.")``, layer
  "penultimate" for SD2) and the host's tokenizer (``PromptTokenizer.from_hf(sd_tokenizer.tokenizer)``, with
  the host's pad id).
* ``family`` ("sd1" | "sd2" | "sdxl"), ``device``; ``num_train_timesteps`` defaults to len(alphas_cumprod).

``encode_prompts`` turns prompts with placeholder strings and the learnable vectors into the UNet's
conditioning; the default handles a single tower (SD1/SD2). SDXL backends override it to concatenate the
two towers (CLIP-L then CLIP-G, 2048 wide) and return CLIP-G's pooled output with it; their ``predict``
builds the UNet's ``y`` from the pooled output and the size/crop values.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from ..text_encoder import CLIPTextEncoder, PromptTokenizer, tokenize_with_slots

FAMILY_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}  # for messages and UI text


@dataclass
class TextTower:
    """One CLIP text tower: its embedding-file key, the autograd-safe encoder and the host tokenizer."""

    key: str  # "clip_l" | "clip_h" | "clip_g": the key a ComfyUI embedding file uses for this tower
    encoder: CLIPTextEncoder
    tokenizer: PromptTokenizer
    _token_cache: dict = field(default_factory=dict, repr=False)  # the same few dozen templates every step

    @property
    def dim(self) -> int:
        return self.encoder.hidden_size

    def encode(
        self, prompts: Sequence[str], placeholders: Sequence[str], vectors: torch.Tensor, output_attentions: bool = False
    ):
        """Encode prompts with ``vectors[j]`` (or ``vectors[b, j]``) as the token embedding of ``placeholders[j]``."""
        device = self.encoder.embeddings.token_embedding.weight.device
        pairs = []
        for prompt in prompts:
            key = (prompt, tuple(placeholders))
            if key not in self._token_cache:
                self._token_cache[key] = tokenize_with_slots(self.tokenizer, prompt, placeholders)
            pairs.append(self._token_cache[key])
        ids = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
        slots = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
        positions = None
        if self.encoder.config.projection_dim:  # pooled output at the first end-of-text token, as ComfyUI reads it
            positions = (ids == self.tokenizer.eos_id).int().argmax(dim=-1)
        return self.encoder(
            ids, slot_ids=slots, slot_vectors=vectors, output_attentions=output_attentions, pooled_positions=positions
        )


@dataclass
class EncodedImages:
    mean: torch.Tensor  # (N, C, h, w) scaled latents (posterior mean)
    std: Optional[torch.Tensor] = None  # posterior std in the same scale, None for deterministic encoders


class TIBackend(ABC):
    """Frozen models + noise schedule for test-time embedding optimisation (see the module doc)."""

    family: str
    device: torch.device
    text_encoders: list[TextTower]
    alphas_cumprod: Optional[torch.Tensor] = None
    prediction_type: str = "epsilon"

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> EncodedImages: ...

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor: ...

    # ------------------------------------------------------------------ defaults a backend may keep
    @property
    def num_train_timesteps(self) -> int:
        return len(self._schedule())

    def _schedule(self) -> torch.Tensor:
        if self.alphas_cumprod is None:
            raise NotImplementedError(f"{type(self).__name__} sets no alphas_cumprod: override add_noise/target")
        return self.alphas_cumprod

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return ddpm_add_noise(self._schedule(), latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return ddpm_target(self._schedule(), latents, noise, timesteps, self.prediction_type)

    def predicted_x0(self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a prediction (for previews)."""
        return ddpm_predicted_x0(self._schedule(), noisy, timesteps, prediction, self.prediction_type)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform integer timesteps in [0, T), drawn on the CPU generator so runs repeat across devices."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def encode_prompts(
        self, prompts: Sequence[str], placeholders: Sequence[str], vectors: Mapping[str, torch.Tensor]
    ) -> Any:
        """UNet conditioning for ``prompts``; ``vectors[key]`` is (K, D) for the tower with that key."""
        if len(self.text_encoders) != 1:
            raise NotImplementedError(f"{type(self).__name__} must override encode_prompts for several text towers")
        tower = self.text_encoders[0]
        return tower.encode(prompts, placeholders, vectors[tower.key]).last_hidden_state

    def decode_preview(self, latents: torch.Tensor) -> Optional[torch.Tensor]:
        """(N, H, W, 3) images in [0, 1] for progress previews, or None when the backend has no decoder."""
        return None

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters must stay untouched (used by checks and tests)."""
        return [t.encoder for t in self.text_encoders]

    @property
    def embedding_dims(self) -> dict[str, int]:
        return {t.key: t.dim for t in self.text_encoders}


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def ddpm_add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
    a = alphas_cumprod.to(x0.device)[t.to(x0.device)]
    return _per_sample(a.sqrt(), x0) * x0 + _per_sample((1 - a).sqrt(), x0) * noise


def ddpm_target(
    alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """ε for epsilon models, v = √ᾱ_t ε − √(1−ᾱ_t) x0 for v-prediction models (SD2 768-v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(x0.device)[t.to(x0.device)]
        return _per_sample(a.sqrt(), x0) * noise - _per_sample((1 - a).sqrt(), x0) * x0
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")


def ddpm_predicted_x0(
    alphas_cumprod: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    a = alphas_cumprod.to(x_t.device)[t.to(x_t.device)]
    sa, s1 = _per_sample(a.sqrt(), x_t), _per_sample((1 - a).sqrt(), x_t)
    if prediction_type == "epsilon":
        return (x_t - s1 * prediction) / sa
    if prediction_type == "v_prediction":
        return sa * x_t - s1 * prediction
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")
