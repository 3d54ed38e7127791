"""Cross Initialization (Pang et al., CVPR 2024): textual inversion of a face into two token embeddings.

What the official code (lyuPang/CrossInitialization) does, and this module repeats:

1. Mean name embedding: every line of a list of ~691 well-known names is tokenized without padding; the raw
   token-embedding rows of the first two BPE tokens after BOS are averaged column-wise (column 1 over all
   names, column 2 over names with at least two tokens). Duplicates are not removed.
2. Cross step: [BOS, m1, m2, EOS, PAD...] (77 long) goes through the text encoder (position embeddings,
   causal mask); the outputs at positions 1 and 2 (after the final LayerNorm, i.e. the conditioning the
   UNet sees) are both the initial embedding and the regularisation anchor.
3. Optimisation: prompts "<template> face of <v0> <v1> person", MSE denoising loss
   + λ · mean_k ‖v_k − v_init_k‖₂ (not squared; torch ``pairwise_distance`` with eps 1e-6), λ = 1e-5;
   AdamW(0.9, 0.999, wd 1e-2, eps 1e-8), constant LR. Presets: full = 320 steps, batch 8, LR 0.005
   (0.000625 × batch 8, the paper's setting); fast = 25 steps, batch 8, LR 0.08 (paper, "Ours-fast").
4. The two learned vectors live in the input token-embedding space, so they are a standard ComfyUI
   embedding: ``{"clip_l": (2, 768)}`` for SD1.x, ``{"clip_h": (2, 1024)}`` for SD2.x.

SDXL (our extension; the paper covers SD2.1): both text encoders get the two tokens, and each encoder's
tokens start from *its own* output for its own mean name embedding, at the layer SDXL conditions on
(penultimate, no final LayerNorm, for CLIP-L and CLIP-G alike). The regulariser is the same term per
encoder, summed. The backend feeds the UNet the concatenated context and ``y`` (pooled CLIP-G + size/crop
embedding), so the CLIP-G tokens also learn through the pooled output. The file is a standard SDXL
embedding, ``{"clip_l": (2, 768), "clip_g": (2, 1280)}``. Presets keep the paper's step counts and learning
rates on SDXL too: the loss is the same per-pixel MSE and the tokens live in the same CLIP embedding spaces.

Our names list (``data/celebrity_names.txt``) is our own, not the CelebBasis file: 691 unique well-known
people, "First Last" (one "Robert De Niro"), no duplicates (the official file has 45). With the CLIP BPE
every line has at least two tokens (the official list has 11 single-token lines) and 624 first names are
a single token (official: 613), so both columns of the mean are populated as in the official recipe.

Deviation from the official data path: images are centre-cropped to a square by default before the bicubic
resize (``crop="none"`` stretches, as the official code does); identical for square inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..utils.files import UnsafeFileError, atomic_save_safetensors, load_state_dict_file
from .runtime import NO_HOOKS, RunHooks
from .text_encoder import CLIPTextEncoder, PromptTokenizer
from .textual_inversion.backend import FAMILY_KEYS, TIBackend
from .textual_inversion.engine import TextualInversionEngine, TIConfig, TIResult

log = logging.getLogger(__name__)

METHOD = "cross_init"
FORMAT_VERSION = "1"
NAMES_FILE = Path(__file__).parent / "data" / "celebrity_names.txt"
PLACEHOLDERS = ("<fb_ci_v0>", "<fb_ci_v1>")
SUBJECT = "face of {v0} {v1} person"
REG_WEIGHT = 1e-5
PAIRWISE_EPS = 1e-6  # torch.pairwise_distance's eps, as in the official loss

# Prompt frames in the spirit of textual inversion's "imagenet_templates_small" (our own wording), each
# in the three media the official list varies over: 27 × 3 = 81 templates.
_FRAMES = (
    "a {m} of a {s}",
    "a {m} of the {s}",
    "the {m} of a {s}",
    "a cropped {m} of a {s}",
    "a cropped {m} of the {s}",
    "a close-up {m} of a {s}",
    "a close-up {m} of the {s}",
    "a bright {m} of a {s}",
    "a dark {m} of the {s}",
    "a good {m} of a {s}",
    "a good {m} of the {s}",
    "a clean {m} of a {s}",
    "a nice {m} of the {s}",
    "a small {m} of a {s}",
    "a large {m} of the {s}",
    "a cool {m} of a {s}",
    "a weird {m} of the {s}",
    "a detailed {m} of a {s}",
    "a simple {m} of the {s}",
    "a {m} showing a {s}",
    "a {m} showing the {s}",
    "my {m} of a {s}",
    "one {m} of the {s}",
    "an old {m} of a {s}",
    "a recent {m} of the {s}",
    "a sharp {m} of the {s}",
    "a portrait {m} of a {s}",
)
_MEDIA = ("photo", "illustration", "depiction")
TEMPLATES: tuple[str, ...] = tuple(f.replace("{m}", m) for m in _MEDIA for f in _FRAMES)


def training_prompts(placeholders: Sequence[str] = PLACEHOLDERS) -> list[str]:
    subject = SUBJECT.format(v0=placeholders[0], v1=placeholders[1])
    return [t.replace("{s}", subject) for t in TEMPLATES]


# ---------------------------------------------------------------------------------------------- names
def load_celebrity_names(path: Union[str, Path, None] = None) -> list[str]:
    """One name per line; blank lines and '#' comments are skipped, duplicates kept (as the official list)."""
    path = Path(path) if path is not None else NAMES_FILE
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"{path} holds no names")
    return names


@torch.no_grad()
def mean_name_embeddings(encoder: CLIPTextEncoder, tokenizer: PromptTokenizer, names: Sequence[str]) -> torch.Tensor:
    """(2, D): column-wise mean of the raw token-embedding rows of each name's first two BPE tokens."""
    table = encoder.embeddings.token_embedding.weight
    first, second = [], []
    for name in names:
        ids = tokenizer.ids(name)
        if not ids:
            continue
        first.append(ids[0])
        if len(ids) >= 2:
            second.append(ids[1])
    if not first or not second:
        raise ValueError("the names list needs names of at least two tokens")
    rows1 = table[torch.tensor(first, device=table.device)].float()
    rows2 = table[torch.tensor(second, device=table.device)].float()
    return torch.stack([rows1.mean(0), rows2.mean(0)])


@torch.no_grad()
def cross_initialize(encoder: CLIPTextEncoder, tokenizer: PromptTokenizer, means: torch.Tensor) -> torch.Tensor:
    """E(v̄): run [BOS, m1, m2, EOS, PAD...] through the encoder and return its outputs at positions 1, 2."""
    n = len(means)
    length = tokenizer.max_length
    ids = [tokenizer.bos_id] * (n + 1) + [tokenizer.eos_id] + [tokenizer.pad_id] * (length - n - 2)
    slots = [-1] + list(range(n)) + [-1] * (length - n - 1)
    device = encoder.embeddings.token_embedding.weight.device
    dtype = encoder.embeddings.token_embedding.weight.dtype
    out = encoder(
        torch.tensor([ids], device=device),
        slot_ids=torch.tensor([slots], device=device),
        slot_vectors=means.to(device, dtype),
    ).last_hidden_state
    return out[0, 1 : n + 1].float()


def initial_vectors(backend: TIBackend, names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """Cross-initialised (2, D) vectors for every text tower of the backend."""
    names = list(names) if names is not None else load_celebrity_names()
    init = {}
    for tower in backend.text_encoders:
        means = mean_name_embeddings(tower.encoder, tower.tokenizer, names)
        init[tower.key] = cross_initialize(tower.encoder, tower.tokenizer, means)
    return init


# ---------------------------------------------------------------------------------------------- loss
class CrossInitRegularizer:
    """λ · mean over tokens of ‖v_k − v_init_k‖₂ (not squared), summed over text towers."""

    def __init__(self, anchors: Mapping[str, torch.Tensor], weight: float = REG_WEIGHT):
        self.anchors = {k: v.detach().float().clone() for k, v in anchors.items()}
        self.weight = weight

    def __call__(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for key, v in vectors.items():
            anchor = self.anchors[key].to(v.device)
            term = F.pairwise_distance(v.float(), anchor, p=2, eps=PAIRWISE_EPS).mean()
            total = term if total is None else total + term
        return self.weight * total


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class CrossInitSettings:
    preset: str = "full"
    steps: int = 320
    batch_size: int = 8
    lr: float = 0.005
    seed: int = 0
    reg_weight: float = REG_WEIGHT
    resolution: int = 512
    crop: str = "center"  # "center" (square crop) or "none" (stretch, the official default for square CelebA-HQ)
    mixed_precision: str = "auto"
    preview_every: int = 0

    def ti_config(self) -> TIConfig:
        return TIConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
            mixed_precision=self.mixed_precision, preview_every=self.preview_every,
        )


PRESETS = {
    "full": CrossInitSettings(preset="full", steps=320, batch_size=8, lr=0.005),
    "fast": CrossInitSettings(preset="fast", steps=25, batch_size=8, lr=0.08),
}


def make_settings(
    preset: str = "full",
    *,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    **other,
) -> CrossInitSettings:
    """A preset ("full", "fast", or "custom" = full's values) with overrides; overrides make it "custom"."""
    if preset not in (*PRESETS, "custom"):
        raise ValueError(f"unknown preset {preset!r}; use full, fast or custom")
    base = PRESETS["full" if preset == "custom" else preset]
    changes = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    changed = any(getattr(base, k) != v for k, v in changes.items())
    name = "custom" if preset == "custom" or changed else preset
    return replace(base, preset=name, **changes, **other)


# ---------------------------------------------------------------------------------------------- images
def prepare_images(
    images: Union[torch.Tensor, Sequence[torch.Tensor]], resolution: int = 512, crop: str = "center"
) -> torch.Tensor:
    """(N, H, W, C) or a list of (H, W, C) float images in [0, 1] → (N, 3, R, R) in [-1, 1], bicubic.

    Grayscale is repeated to RGB and an alpha channel is dropped.
    """
    items = list(images) if not isinstance(images, torch.Tensor) or images.dim() == 4 else [images]
    if not items:
        raise ValueError("no reference image given")
    out = []
    for img in items:
        if img.dim() != 3 or img.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected an (H, W, C) image with 1, 3 or 4 channels, got {tuple(img.shape)}")
        img = img.detach().float()
        img = img[..., :3] if img.shape[-1] == 4 else img.expand(-1, -1, 3)
        x = img.permute(2, 0, 1).unsqueeze(0)
        h, w = x.shape[-2:]
        if min(h, w) < 16:
            raise ValueError(f"a reference image of {w}x{h} pixels is too small; use a face photo of at least 256 px")
        if crop == "center":
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top : top + side, left : left + side]
        elif crop != "none":
            raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
        out.append(x.clamp(0, 1) * 2 - 1)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- run
@dataclass
class CrossInitResult:
    embedding: dict[str, torch.Tensor]  # ComfyUI embedding tensors: {"clip_l": (2, 768)} / {"clip_h": (2, 1024)}
    metadata: dict[str, str]
    init: dict[str, torch.Tensor]
    history: Optional[TIResult] = field(repr=False, default=None)


class CrossInitRun:
    """One Cross Initialization optimisation; ``engine.result`` shows the losses while it runs."""

    def __init__(
        self,
        backend: TIBackend,
        images: Union[torch.Tensor, Sequence[torch.Tensor]],
        settings: Optional[CrossInitSettings] = None,
        hooks: RunHooks = NO_HOOKS,
        names: Optional[Sequence[str]] = None,
    ):
        self.backend = backend
        self.settings = settings or make_settings("full")
        self.pixels = prepare_images(images, self.settings.resolution, self.settings.crop)
        self.names = list(names) if names is not None else load_celebrity_names()
        self.init = initial_vectors(backend, self.names)
        self.engine = TextualInversionEngine(
            backend,
            self.pixels,
            training_prompts(PLACEHOLDERS),
            PLACEHOLDERS,
            self.init,
            self.settings.ti_config(),
            regularizer=CrossInitRegularizer(self.init, self.settings.reg_weight),
            hooks=hooks,
        )

    def run(self) -> CrossInitResult:
        history = self.engine.run()
        metadata = embedding_metadata(
            self.backend.family, history.vectors, settings=self.settings, steps=history.steps,
            final_loss=history.loss_history[-1], num_images=self.pixels.shape[0], num_names=len(self.names),
        )
        return CrossInitResult(embedding=history.vectors, metadata=metadata, init=self.init, history=history)


def run_cross_init(
    backend: TIBackend,
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    settings: Optional[CrossInitSettings] = None,
    hooks: RunHooks = NO_HOOKS,
    names: Optional[Sequence[str]] = None,
) -> CrossInitResult:
    """Learn a two-token embedding of the face in ``images`` (HWC float in [0, 1]) on ``backend``'s model."""
    return CrossInitRun(backend, images, settings, hooks, names).run()


# ---------------------------------------------------------------------------------------------- files
def embedding_metadata(
    family: str,
    embedding: Mapping[str, torch.Tensor],
    *,
    settings: Optional[CrossInitSettings] = None,
    steps: Optional[int] = None,
    **extra,
) -> dict[str, str]:
    meta = {
        "method": METHOD,
        "format_version": FORMAT_VERSION,
        "base_family": family,
        "dims": ",".join(f"{k}={v.shape[-1]}" for k, v in embedding.items()),
        "num_vectors": str(next(iter(embedding.values())).shape[0]),
    }
    if steps is not None:
        meta["steps"] = str(steps)
    if settings is not None:
        meta.update(
            preset=settings.preset, lr=repr(settings.lr), batch_size=str(settings.batch_size), seed=str(settings.seed),
            reg_weight=repr(settings.reg_weight), resolution=str(settings.resolution),
        )
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_embedding(path: Union[str, Path], embedding: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Atomically write a ComfyUI embedding file (usable as ``embedding:NAME`` in prompts)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in embedding.items()}
    return atomic_save_safetensors(tensors, path, metadata)


def load_official_learned_embeds(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], str]:
    """Read the official ``learned_embeds.bin`` ({"<id>_v0": (D,), "<id>_v1": (D,)}) as our embedding dict.

    Loaded weights-only (pickles with Python objects are refused). Returns ({"clip_h" or "clip_l": (2, D)}, id).
    """
    state, _ = load_state_dict_file(path)
    by_index: dict[int, torch.Tensor] = {}
    ident = None
    for key, value in state.items():
        stem, sep, idx = key.rpartition("_v")
        if not sep or not idx.isdigit() or value.dim() not in (1, 2):
            raise UnsafeFileError(
                f"{Path(path).name} is not a Cross Initialization embedding: unexpected key {key!r} "
                "(expected '<id>_v0', '<id>_v1' with one vector each)."
            )
        if ident not in (None, stem):
            raise UnsafeFileError(f"{Path(path).name} mixes several identities ({ident!r}, {stem!r}).")
        ident = stem
        by_index[int(idx)] = value.reshape(-1, value.shape[-1])[0].float()
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise UnsafeFileError(f"{Path(path).name}: token indices {sorted(by_index)} are not 0..n-1.")
    vectors = torch.stack([by_index[i] for i in range(len(by_index))])
    family = {768: "sd1", 1024: "sd2"}.get(vectors.shape[-1])
    if family is None:
        raise UnsafeFileError(f"{Path(path).name}: {vectors.shape[-1]}-wide vectors match neither SD1 (768) nor SD2 (1024).")
    return {FAMILY_KEYS[family][0]: vectors}, ident.strip("<>")


def convert_official(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Convert an official ``learned_embeds.bin`` to our safetensors embedding file."""
    embedding, ident = load_official_learned_embeds(src)
    family = {"clip_l": "sd1", "clip_h": "sd2"}[next(iter(embedding))]
    meta = embedding_metadata(family, embedding, source="official learned_embeds.bin", official_id=ident)
    return save_embedding(dst, embedding, meta)
