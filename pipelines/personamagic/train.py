"""PersonaMagic optimisation on the textual-inversion engine.

Per step (batch B, official: batch 1 × gradient accumulation 2 → here B = 2, the same average gradient):

1. a reference image (no flip by default, as the official code), a fresh noise, t ~ U[t_low, t_high);
2. the mapper gives N base tokens and N bypass vectors at t (the bypass zeroed per sample with p = 0.5);
3. a training prompt ("a photo of a <tokens>"-style) is encoded to the K and V contexts; the UNet predicts;
4. loss = masked MSE (face mask, or the whole image) + Tandem Equilibrium on an editing prompt's last
   text-encoder layer attention + λ_id(t)·identity loss (when a face recognizer is given: x̂0 is decoded,
   cropped at the reference face's ArcFace alignment and compared with the reference embedding);
5. AdamW (0.9, 0.999, wd 0.01) on the mapper only, constant LR 1e-4, 1000 steps.

Stages: ``stages="official"`` trains in the fixed [400, 800); ``stages="iou"`` first trains ``warmup_steps``
over the whole schedule, then measures the placeholder's cross-attention IoU with the face mask on a grid of
timesteps and partitions with λ1 = 0.7, λ2 = 0.8 (``stages.partition_by_iou``), then trains in the dynamic
stage for the remaining steps.

SDXL: the tokens go into both text encoders (``contexts.KVText``), the Tandem Equilibrium term is the mean over
the two encoders' attention, and the UNet also gets ``y`` from the K prompt's pooled CLIP-G output (the backend
builds it with the model's own size/crop embedding).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch

from ..cross_init import prepare_images
from ..runtime import NO_HOOKS, RunHooks
from ..textual_inversion.backend import FAMILY_KEYS, TextTower, TIBackend
from ..textual_inversion.engine import TextualInversionEngine, TIConfig, TIResult
from .attention import AttentionProbe, KVCond
from .backends import predict_kv
from .contexts import SUPERCATEGORY, KVText, encode_kv, internal_placeholders
from .losses import TE_TEMPERATURE, TE_WEIGHT, identity_loss, mask_to_latent, masked_mse, prompt_token_mask, tandem_equilibrium_loss
from .mapper import MapperConfig, MapperOutput, PersonaMagicMapper
from .stages import LAMBDA_1, LAMBDA_2, PRESETS, StagePlan, attention_mask_iou, partition_by_iou

log = logging.getLogger(__name__)

# Training prompts in the style of textual inversion's small template list (our own wording), "{}" = the tokens.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

# Editing prompts for Tandem Equilibrium, "{}" = the tokens. The paper's pool has 40 prompts (supplement: "40 text
# prompts for the TE strategy were generated using ChatGPT"; they are not published, and the released code has 20).
# Ours: 40 of our own wording over clothing, actions, styles and places.
TE_PROMPTS: tuple[str, ...] = (
    "a {} is reading a book", "a {} wearing a santa hat", "a {} in an astronaut suit", "a {} as a chef in a kitchen",
    "a painting of a {} in the style of van gogh", "a {} wearing sunglasses on the beach", "a {} riding a bicycle",
    "a {} with a garland of flowers", "a {} in a cowboy hat", "an oil painting of a {}", "a {} dressed as a wizard",
    "a {} playing the guitar", "a {} in the snow wearing a scarf", "a {} on the cover of a magazine",
    "a {} drinking coffee in a cafe", "a {} wearing a crown", "a watercolor portrait of a {}",
    "a {} in front of the eiffel tower", "a {} holding a bouquet of roses", "a {} as a knight in armour",
    "a {} surfing a big wave", "a {} hiking in the mountains", "a {} in a business suit in an office",
    "a pencil sketch of a {}", "a {} playing chess in a park", "a {} wearing a firefighter uniform",
    "a {} holding an umbrella in the rain", "a pixel art portrait of a {}", "a {} painting on an easel",
    "a {} walking a dog on the street", "a {} wearing headphones in a recording studio", "a {} as a pirate on a ship",
    "a {} skiing down a snowy slope", "a marble statue of a {}", "a {} drinking tea in a garden",
    "a {} wearing a graduation cap", "a {} dancing at a party", "a {} as an anime character",
    "a {} playing basketball", "a {} eating a slice of pizza",
)


@dataclass
class PersonaMagicSettings:
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    seed: int = 0
    token_num: int = 4
    num_anchors: int = 200
    stages: str = "official"  # "official" (fixed 400/800) | "iou" (paper) | "custom" (t_low/t_high below)
    t_low: int = 400
    t_high: int = 800
    warmup_steps: int = 100  # "iou": steps over the whole schedule before the partition
    iou_stride: int = 50  # "iou": timestep grid step for the measurement
    iou_samples: int = 2  # "iou": noise draws per grid timestep
    lambda_1: float = LAMBDA_1
    lambda_2: float = LAMBDA_2
    te_weight: float = TE_WEIGHT
    te_temperature: float = TE_TEMPERATURE
    id_weight: float = 1.0  # multiplies λ_id(t)·L_id; used only with a recognizer
    bypass_dropout: float = 0.5
    resolution: int = 512
    crop: str = "center"
    flip_p: float = 0.0  # the official code does not flip
    mixed_precision: str = "auto"
    preview_every: int = 0
    supercategory: str = SUPERCATEGORY

    def validate(self) -> None:
        if self.stages not in ("official", "iou", "custom"):
            raise ValueError(f"stages must be 'official', 'iou' or 'custom', got {self.stages!r}")
        if self.stages == "iou" and not 0 < self.warmup_steps < self.steps:
            raise ValueError(f"the IoU partition needs 0 < warm-up steps ({self.warmup_steps}) < steps ({self.steps})")
        if not 0 <= self.bypass_dropout <= 1:
            raise ValueError(f"bypass dropout must be in [0, 1], got {self.bypass_dropout}")

    def ti_config(self) -> TIConfig:
        return TIConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed, flip_p=self.flip_p,
            mixed_precision=self.mixed_precision, preview_every=self.preview_every,
        )

    def initial_plan(self, num_timesteps: int) -> StagePlan:
        if self.stages == "official":
            return replace(PRESETS["official"], num_timesteps=num_timesteps)
        return StagePlan(self.t_low, self.t_high, num_timesteps=num_timesteps, source="custom")


@dataclass
class FaceGuidance:
    """What face analysis of the (prepared) training images adds: masks, and for the identity loss the
    ArcFace alignment of each reference face, its embedding and the recognizer."""

    masks: Optional[torch.Tensor] = None  # (N, H, W) in [0, 1] at training resolution
    matrices: Optional[torch.Tensor] = None  # (N, 2, 3) source→ArcFace-crop matrices at training resolution
    embeddings: Optional[torch.Tensor] = None  # (N, D) unit ArcFace embeddings of the references
    recognizer: object = None  # FaceRecognizer whose ``embed`` lets gradients through

    @property
    def has_identity(self) -> bool:
        return self.recognizer is not None and self.matrices is not None and self.embeddings is not None


class PersonaMagicEmbeddings(torch.nn.Module):
    """The learnable part handed to the engine: the mapper plus the references' CLIP image embeddings."""

    def __init__(self, mapper: PersonaMagicMapper, image_embeds: Optional[torch.Tensor]):
        super().__init__()
        self.mapper = mapper
        self.register_buffer("image_embeds", None if image_embeds is None else image_embeds.detach().float().clone())

    def forward(self, timesteps: torch.Tensor, image_index: Optional[torch.Tensor] = None,
                bypass_keep: Optional[torch.Tensor] = None) -> MapperOutput:
        img = None
        if self.mapper.config.output_bypass:
            idx = torch.zeros_like(timesteps.reshape(-1)) if image_index is None else image_index
            img = self.image_embeds[idx.to(self.image_embeds.device)]
        return self.mapper(timesteps, img, bypass_keep)


class PersonaMagicEngine(TextualInversionEngine):
    """The engine with PersonaMagic's step: mapper tokens, K/V contexts, masked MSE + TE + identity losses."""

    def __init__(
        self,
        backend: TIBackend,
        pixels: torch.Tensor,
        embeddings: PersonaMagicEmbeddings,
        settings: PersonaMagicSettings,
        guidance: Optional[FaceGuidance] = None,
        hooks: RunHooks = NO_HOOKS,
    ):
        settings.validate()
        n = embeddings.mapper.config.token_num
        self.token_text = " ".join(internal_placeholders(n))
        super().__init__(
            backend, pixels, [t.format(self.token_text) for t in TRAIN_TEMPLATES], internal_placeholders(n),
            embeddings, settings.ti_config(), hooks=hooks,
        )
        self.settings = settings
        self.guidance = guidance = guidance if guidance is not None else FaceGuidance()
        towers = context_towers(backend)
        self.tower = towers[0]
        self.text = KVText([(t.encoder, t.tokenizer) for t in towers])
        self.prompt_cache = self.text.caches[0]
        self.te_prompts = [p.format(self.token_text) for p in TE_PROMPTS]
        T = backend.num_train_timesteps
        self.plan = settings.initial_plan(T)
        self.pending_partition = settings.stages == "iou"
        self.ious: dict[int, float] = {}
        self.te_loss_history: list[float] = []
        self.id_loss_history: list[float] = []
        count = pixels.shape[0]
        if settings.stages == "iou" and guidance.masks is None:
            raise ValueError(
                "The IoU stage partition compares attention maps with the face mask: connect a face analyzer, "
                "or use the official stages (400/800)."
            )
        if guidance.masks is not None and guidance.masks.shape[0] != count:
            raise ValueError(f"{guidance.masks.shape[0]} face masks for {count} reference images")
        if guidance.has_identity and not hasattr(backend, "decode_differentiable"):
            raise NotImplementedError(f"{type(backend).__name__} cannot decode with gradients; the identity loss needs it")
        self._latent_masks: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ helpers
    def _masks_at(self, picks: torch.Tensor, size) -> Optional[torch.Tensor]:
        if self.guidance.masks is None:
            return None
        if self._latent_masks is None or tuple(self._latent_masks.shape[-2:]) != tuple(size):
            m = mask_to_latent(self.guidance.masks, size)
            self._latent_masks = torch.cat([m, m.flip(-1)]).to(self.device)  # second half: mirrored references
        return self._latent_masks[picks]

    def _timesteps(self, n: int) -> torch.Tensor:
        if self.pending_partition:  # warm-up: the whole schedule, as the paper's first iterations
            return torch.randint(0, self.backend.num_train_timesteps, (n,), generator=self._gen)
        return self.plan.sample_training_timesteps(n, self._gen)

    # ------------------------------------------------------------------ the step
    def _step(self) -> float:
        cfg, s, backend = self.config, self.settings, self.backend
        if self.pending_partition and len(self.result.loss_history) >= s.warmup_steps:
            self.partition_stages()
        enc = self._encode_references()
        b = cfg.batch_size
        count = self._images.shape[0]
        picks = torch.tensor(self._pick_images(b), device=enc.mean.device)
        prompts = [self._rng.choice(self.prompts) for _ in range(b)]
        te_prompts = [self._rng.choice(self.te_prompts) for _ in range(b)]
        latents = enc.mean[picks]
        if enc.std is not None:
            latents = latents + enc.std[picks] * torch.randn(latents.shape, generator=self._gen).to(latents.device)
        latents = latents.to(self.device)
        noise = torch.randn(latents.shape, generator=self._gen).to(self.device)
        timesteps = self._timesteps(b).to(self.device)
        keep = (torch.rand(b, generator=self._gen) >= s.bypass_dropout).float().to(self.device)
        noisy = backend.add_noise(latents, noise, timesteps)
        target = backend.target(latents, noise, timesteps)
        index = (picks % count).to(self.device)

        amp = torch.autocast("cuda", dtype=self._amp_dtype) if self._amp_dtype is not None else nullcontext()
        out = self.embeddings(timesteps, index, keep)
        with amp:
            ctx = self.text.encode(prompts, self.placeholders, out.base, out.bypass)
            pred = predict_kv(backend, noisy, timesteps, KVCond(ctx.key, ctx.value, pooled=ctx.pooled))
            te = noisy.new_zeros((), dtype=torch.float32)
            if s.te_weight:
                te = self._tandem_equilibrium(te_prompts, out.base)
        mse = masked_mse(pred, target, self._masks_at(picks, latents.shape[-2:]))
        ident = mse.new_zeros(())
        if self.guidance.has_identity and s.id_weight:
            x0 = backend.predicted_x0(noisy, timesteps, pred.float())
            decoded = backend.decode_differentiable(x0)
            flipped = (picks >= count).to(decoded.device)
            decoded = torch.where(flipped.view(-1, 1, 1, 1), decoded.flip(-1), decoded)  # back to the reference pose
            g = self.guidance
            ident = s.id_weight * identity_loss(
                decoded, g.matrices[index.cpu()], g.embeddings[index.cpu()], g.recognizer, timesteps,
                backend.num_train_timesteps,
            )
        loss = mse + te.float() + ident
        value = self._optimizer_step(loss, "mapper's weights", "lower the learning rate and check the model and the reference image.")
        self.result.loss_history.append(value)
        self.result.diffusion_loss_history.append(float(mse.detach()))
        self.result.reg_loss_history.append(float(te.detach()) + float(ident.detach()))
        self.te_loss_history.append(float(te.detach()))
        self.id_loss_history.append(float(ident.detach()))
        self._last = (noisy.detach(), timesteps, pred.detach())
        return value

    def _tandem_equilibrium(self, prompts: Sequence[str], base: torch.Tensor) -> torch.Tensor:
        """TE on each text encoder's last attention layer for the editing prompts; the mean over encoders (SDXL)."""
        s, terms = self.settings, []
        for enc, tok, (ids, slots), part in zip(self.text.encoders, self.text.tokenizers,
                                                self.text.tokens(prompts, self.placeholders), self.text.split(base)):
            ctx = encode_kv(enc, ids, slots, part, None, output_attentions=True)
            terms.append(tandem_equilibrium_loss(
                ctx.attention_probs, slots, prompt_token_mask(ids, tok.bos_id, tok.eos_id),
                weight=s.te_weight, temperature=s.te_temperature,
            ))
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

    # ------------------------------------------------------------------ IoU stage partition
    @torch.no_grad()
    def measure_ious(self, timesteps: Sequence[int]) -> dict[int, float]:
        """Mean IoU, over references and ``iou_samples`` noise draws, of the placeholder tokens' cross-attention
        map with the face mask at each timestep (the mapper as trained so far, bypass on)."""
        if self.guidance.masks is None:
            raise ValueError("the IoU stage partition needs a face mask: connect a face analyzer")
        enc = self._encode_references()
        count = self._images.shape[0]
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        prompt = [self.prompts[0]]
        _, slots = self.prompt_cache(prompt, self.placeholders, self.device)
        positions = (slots[0] >= 0).nonzero().flatten()
        self.embeddings.eval()
        out: dict[int, float] = {}
        try:
            for t in timesteps:
                scores = []
                for i in range(count):
                    for _ in range(self.settings.iou_samples):
                        lat = enc.mean[i : i + 1].to(self.device)
                        noise = torch.randn(lat.shape, generator=gen).to(self.device)
                        tt = torch.tensor([int(t)], device=self.device)
                        emb = self.embeddings(tt, torch.tensor([i], device=self.device))
                        ctx = self.text.encode(prompt, self.placeholders, emb.base, emb.bypass)
                        probe = AttentionProbe(positions)
                        cond = KVCond(ctx.key, ctx.value, probe, ctx.pooled)
                        predict_kv(self.backend, self.backend.add_noise(lat, noise, tt), tt, cond)
                        amap = probe.spatial_map(*lat.shape[-2:])[0]
                        scores.append(attention_mask_iou(amap, self.guidance.masks[i]))
                out[int(t)] = sum(scores) / len(scores)
        finally:
            self.embeddings.train()
        return out

    def partition_stages(self) -> StagePlan:
        T = self.backend.num_train_timesteps
        stride = max(1, self.settings.iou_stride)
        grid = list(range(T - 1 - (T - 1) % stride, 0, -stride))
        self.ious = self.measure_ious(grid)
        self.plan = partition_by_iou(
            self.ious, lambda_1=self.settings.lambda_1, lambda_2=self.settings.lambda_2, num_timesteps=T,
            fallback=replace(PRESETS["official"], num_timesteps=T),
        )
        self.pending_partition = False
        # The mapper's anchors follow the stage found (officially they span the trained stage, 400..800).
        mapper = self.embeddings.mapper
        mapper.set_anchors(self.plan.t_low, self.plan.t_high)
        self.optimizer.state.pop(mapper.input_layer.weight, None)  # its Adam moments belonged to the old anchors
        log.info("PersonaMagic stages (%s): dynamic [%d, %d]; IoU %s", self.plan.source, self.plan.t_low,
                 self.plan.t_high, {t: round(v, 3) for t, v in sorted(self.ious.items())})
        return self.plan


# ---------------------------------------------------------------------------------------------- run
def context_towers(backend: TIBackend) -> list[TextTower]:
    """The backend's text towers in the order of the UNet's context (SDXL: CLIP-L, then CLIP-G)."""
    towers = {t.key: t for t in backend.text_encoders}
    order = FAMILY_KEYS.get(getattr(backend, "family", ""), ())
    if len(towers) > 1 and set(order) == set(towers):
        return [towers[k] for k in order]
    return list(backend.text_encoders)


@dataclass
class PersonaMagicResult:
    mapper: PersonaMagicMapper
    plan: StagePlan
    image_embed: Optional[torch.Tensor]  # (image_dim,) the mean reference embedding, stored in the file
    history: TIResult
    ious: dict[int, float] = field(default_factory=dict)
    te_loss_history: list[float] = field(default_factory=list)
    id_loss_history: list[float] = field(default_factory=list)

    def file_metadata(self, settings: PersonaMagicSettings) -> dict[str, str]:
        meta = {
            "steps": str(self.history.steps), "final_loss": f"{self.history.loss_history[-1]:.6g}",
            "lr": repr(settings.lr), "batch_size": str(settings.batch_size), "seed": str(settings.seed),
            "stages_requested": settings.stages, "te_weight": repr(settings.te_weight),
            "identity_loss": str(bool(self.id_loss_history and any(self.id_loss_history))),
        }
        if self.ious:
            meta["iou"] = ",".join(f"{t}:{v:.3f}" for t, v in sorted(self.ious.items()))
        return meta


class PersonaMagicRun:
    """One PersonaMagic optimisation; ``engine.result`` shows the losses while it runs."""

    def __init__(
        self,
        backend: TIBackend,
        images: Union[torch.Tensor, Sequence[torch.Tensor]],
        image_embeds: Optional[torch.Tensor],
        settings: Optional[PersonaMagicSettings] = None,
        guidance: Optional[FaceGuidance] = None,
        hooks: RunHooks = NO_HOOKS,
        pixels: Optional[torch.Tensor] = None,
    ):
        self.settings = settings or PersonaMagicSettings()
        self.settings.validate()
        self.backend = backend
        self.pixels = pixels if pixels is not None else prepare_images(images, self.settings.resolution, self.settings.crop)
        towers = context_towers(backend)
        text = KVText([(t.encoder, t.tokenizer) for t in towers])
        word = text.supercategory_embedding(self.settings.supercategory)
        if image_embeds is not None:
            image_embeds = image_embeds.detach().float().reshape(-1, image_embeds.shape[-1])
            if image_embeds.shape[0] not in (1, self.pixels.shape[0]):
                raise ValueError(f"{image_embeds.shape[0]} image embeddings for {self.pixels.shape[0]} reference images")
            image_embeds = image_embeds.expand(self.pixels.shape[0], -1)
        plan = self.settings.initial_plan(backend.num_train_timesteps)
        config = MapperConfig(
            token_num=self.settings.token_num, word_dim=sum(text.dims), word_dims=text.word_dims,
            num_anchors=self.settings.num_anchors,
            anchor_start=plan.t_low, anchor_end=plan.t_high,  # the trained stage (the IoU partition moves them)
            image_dim=image_embeds.shape[-1] if image_embeds is not None else 512,
            output_bypass=image_embeds is not None,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)  # the mapper's default init is drawn from the global RNG
            mapper = PersonaMagicMapper(config, word)
        self.image_embeds = image_embeds
        self.engine = PersonaMagicEngine(
            backend, self.pixels, PersonaMagicEmbeddings(mapper, image_embeds), self.settings, guidance, hooks
        )

    @property
    def mapper(self) -> PersonaMagicMapper:
        return self.engine.embeddings.mapper

    def run(self) -> PersonaMagicResult:
        history = self.engine.run()
        mapper = self.mapper.eval().requires_grad_(False)
        return PersonaMagicResult(
            mapper=mapper, plan=self.engine.plan,
            image_embed=None if self.image_embeds is None else self.image_embeds.mean(0),
            history=history, ious=dict(self.engine.ious), te_loss_history=list(self.engine.te_loss_history),
            id_loss_history=list(self.engine.id_loss_history),
        )
