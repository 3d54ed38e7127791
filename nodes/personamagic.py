"""PersonaMagic nodes: train a face's timestep mapper on the loaded checkpoint, load it, apply it.

Math: ``pipelines/personamagic``; ComfyUI glue: ``personamagic_comfy.py``. The apply node's CONDITIONING holds
one entry per stage / timestep bin (ComfyUI's start/end percents), its MODEL a V-path ``attn2_patch``, so any
sampler runs it and other packs' patches stack with it. SD1.x, SD2.x and SDXL: on SDXL the mapper's tokens go into
CLIP-L and CLIP-G, the V path acts on the 2048-wide context, and each entry carries its pooled CLIP-G output. A
file names the family it was trained on; applying it with another family's checkpoint is refused.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import astuple, replace
from typing import Any, Optional

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm

from ..pipelines.cross_init import prepare_images
from ..pipelines.face.align import arcface_matrix
from ..pipelines.personamagic.apply import DEFAULT_BINS, schedule_for, value_patch_for
from ..pipelines.personamagic.contexts import DEFAULT_TRIGGER, KVText, check_trigger
from ..pipelines.personamagic.files import PersonaMagicFile, load_personamagic, save_personamagic
from ..pipelines.personamagic.stages import bins_for_visited
from ..pipelines.personamagic.train import FaceGuidance, PersonaMagicRun, PersonaMagicSettings
from ..pipelines.textual_inversion.backend import FAMILY_NAMES
from ..utils.files import BadNameError, sanitize_name
from . import model_folders
from .common import (
    RerunCache,
    check_prompt_embeddings,
    checkpoint_inputs,
    comfy_hooks,
    file_state,
    image_digest,
    named_file_fingerprint,
    require_family,
)
from .controls import blend, check_range, range_inputs, schedule
from .loss_curve import loss_curve_image
from .personamagic_comfy import (
    ComfyPersonaMagicBackend,
    autograd_copy,
    conditioning_entry,
    conditioning_from_entries,
    image_embeddings,
    text_towers,
    visited_timesteps,
    with_value_patch,
)
from .types import FaceAnalyzer as FaceAnalyzerType

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/PersonaMagic"
FOLDER = "facebooth/personamagic"
PersonaMagicType = io.Custom("FACEBOOTH_PERSONAMAGIC")  # pipelines.personamagic.files.PersonaMagicFile
STAGE_CHOICES = {"official (400-800)": "official", "IoU partition (paper)": "iou"}


# ---------------------------------------------------------------------------------------------- files
def result_path(name: str) -> str:
    safe = sanitize_name(name, what="PersonaMagic name")
    return os.path.join(model_folders.writable_folder(FOLDER), f"{safe}.safetensors")


_WRITTEN = RerunCache()  # result = the PersonaMagicFile written for a request (MODEL, CLIP, VAE, CLIP_VISION, analyzer)


def _face_guidance(analyzer, pixels: torch.Tensor) -> FaceGuidance:
    """Masks, ArcFace alignment and embeddings of the prepared training images (training-pixel coordinates)."""
    if analyzer is None:
        return FaceGuidance()
    hwc = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    faceset = analyzer.analyze(hwc, select="largest", no_face="error")
    faces = sorted(faceset.faces, key=lambda f: f.image_index)
    masks = torch.stack([f.mask.float() for f in faces])
    matrices = torch.stack([arcface_matrix(f.landmarks.double()).float() for f in faces])
    recognizer = embeddings = None
    rec = analyzer.recognizer
    if rec is not None and all(f.embedding is not None for f in faces):
        from ..pipelines.face.arcface import ArcFaceRecognizer

        if isinstance(rec, ArcFaceRecognizer):
            recognizer = ArcFaceRecognizer(autograd_copy(rec.backbone), device=rec.device, dtype=torch.float32, name=rec.name)
            embeddings = torch.stack([f.embedding.float() for f in faces])
        else:
            log.warning("FaceBooth: the identity loss needs the PyTorch ArcFace recognizer (Face Analyzer (PyTorch)); "
                        "%s is not differentiable, so PersonaMagic trains without it", getattr(rec, "name", type(rec).__name__))
    return FaceGuidance(masks=masks, matrices=matrices, embeddings=embeddings, recognizer=recognizer)


# ---------------------------------------------------------------------------------------------- train
class PersonaMagicTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothPersonaMagicTrain",
            display_name="PersonaMagic Train",
            category=CATEGORY,
            description="Learns a PersonaMagic mapper for the face in one photo on the loaded SD1.x / SD2.x / SDXL-family "
            "checkpoint: 4 timestep-dependent tokens (and a V-path bypass from the CLIP image embedding) in the dynamic stage, "
            "masked denoising loss, Tandem Equilibrium and, with a PyTorch ArcFace, the identity loss. On SDXL the tokens go "
            "into both text encoders (CLIP-L and CLIP-G). Writes models/facebooth/personamagic/<name>.safetensors, which "
            "names the family it works with. Official recipe: 1000 steps, batch 2, lr 1e-4.",
            inputs=[
                *checkpoint_inputs(
                    model="The checkpoint's MODEL (SD1.x, SD2.x or SDXL family). It stays frozen; only the small mapper learns.",
                    clip="The same checkpoint's CLIP (its text encoders are run by FaceBooth so gradients can pass).",
                    vae="The checkpoint's VAE: encodes the photo, and decodes x̂0 for the identity loss.",
                ),
                io.Image.Input("image", tooltip="A photo of the person (PersonaMagic works from one; a batch of the same person also works). Centre-cropped to a square."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision model (ViT-L/14 or ViT-H/14) for the image embedding that drives the V-path bypass. Use the same one when applying."),
                FaceAnalyzerType.Input("face_analyzer", optional=True, tooltip="Optional face analyzer: gives the face mask for the masked loss and the IoU stages, and (PyTorch ArcFace) the identity loss. Without it the loss covers the whole image."),
                io.String.Input("name", default="my_persona", tooltip="File name: models/facebooth/personamagic/<name>.safetensors. No folders."),
                io.Combo.Input("stages", options=list(STAGE_CHOICES), default="official (400-800)", tooltip="official: train in t∈[400,800) as the released code. IoU partition: warm up over all timesteps, then cut the stages where the placeholder's attention map matches the face mask (IoU 0.7 / 0.8, paper); needs the face analyzer."),
                io.Int.Input("steps", default=1000, min=1, max=20000, tooltip="Optimisation steps (official 1000)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5, round=1e-7, tooltip="AdamW learning rate (official 1e-4 = 5e-5 × gradient accumulation 2)."),
                io.Int.Input("batch_size", default=2, min=1, max=16, tooltip="Samples per step (official: 1 with 2 accumulated = 2)."),
                io.Int.Input("warmup_steps", default=100, min=1, max=5000, tooltip="IoU partition only: steps over the whole schedule before the stages are measured."),
                io.Float.Input("identity_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of λ_id(t)·(1 − cos) (needs a PyTorch ArcFace in the face analyzer). 0 turns it off (it decodes through the VAE each step, the slowest part)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip="Seed for the mapper's init, timesteps, noise and templates."),
                io.Int.Input("resolution", default=512, min=64, max=1024, step=64, tooltip="Training resolution (512 for SD1.x, 1024 for SDXL)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name. Off: stop with an error."),
            ],
            outputs=[
                PersonaMagicType.Output(display_name="personamagic", tooltip="The trained mapper and its stages; connect to PersonaMagic Apply."),
                io.Image.Output(display_name="loss_curve", tooltip="Total loss per step and its moving average."),
            ],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, name: Optional[str] = None) -> bool | str:
        if not isinstance(name, str):
            return True
        try:
            sanitize_name(name, what="PersonaMagic name")
        except BadNameError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, name: str = "", **kwargs) -> Any:
        try:
            path = result_path(name)
        except Exception:
            return ("unusable name", name)
        return (path, file_state(path))

    @classmethod
    def execute(
        cls, model, clip, vae, image: torch.Tensor, clip_vision, name: str, stages: str, steps: int,
        learning_rate: float, batch_size: int, warmup_steps: int, identity_weight: float, seed: int,
        resolution: int, overwrite: bool, face_analyzer=None,
    ) -> io.NodeOutput:
        path = result_path(name)
        safe = os.path.basename(path)[: -len(".safetensors")]
        if resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64, got {resolution}")
        settings = PersonaMagicSettings(
            steps=steps, batch_size=batch_size, lr=learning_rate, seed=seed, stages=STAGE_CHOICES[stages],
            warmup_steps=min(warmup_steps, max(1, steps - 1)), id_weight=identity_weight, resolution=resolution,
            preview_every=max(1, steps // 25),
        )
        if settings.stages == "iou" and face_analyzer is None:
            raise ValueError("The IoU partition compares attention maps with the face mask: connect a face analyzer, or use the official stages.")
        pixels = prepare_images(image, resolution, "center")
        key = (astuple(settings), image_digest(pixels))
        objects = (model, clip, vae, clip_vision, face_analyzer)
        done = _WRITTEN.get(path, key, objects)
        if done is not None:
            state = file_state(path)
            if state is not None and state == done.state:
                log.info("FaceBooth: PersonaMagic %s is up to date (same inputs); not training again", safe)
                return cls._output(done)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"A PersonaMagic file named '{safe}' already exists ({path}). Choose another name or turn on 'overwrite'.")

        embeds = image_embeddings(clip_vision, ((pixels + 1) / 2).permute(0, 2, 3, 1))
        guidance = _face_guidance(face_analyzer, pixels)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        with torch.inference_mode(False):
            backend = ComfyPersonaMagicBackend(model, clip, vae)
            job = PersonaMagicRun(backend, None, embeds, settings, guidance, comfy_hooks(steps, node_id), pixels=pixels.clone())
            log.info(
                "FaceBooth: PersonaMagic '%s': %d steps, batch %d, lr %g, stages %s, mask %s, identity loss %s, %s on %s",
                safe, steps, batch_size, learning_rate, settings.stages, guidance.masks is not None, guidance.has_identity,
                backend.family, backend.device,
            )
            result = job.run()
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"A PersonaMagic file named '{safe}' appeared while training ({path}); turn on 'overwrite'.")
        save_personamagic(path, result.mapper, result.plan, backend.family, result.image_embed, settings.supercategory,
                          extra=result.file_metadata(settings))
        losses = result.history.loss_history
        written = _WRITTEN.put(
            path, key, objects, load_personamagic(path),
            curve=loss_curve_image(losses, title=f"PersonaMagic '{safe}'"),
            summary=f"{FAMILY_NAMES.get(backend.family, backend.family)}, {len(losses)} steps, final loss {losses[-1]:.4f}, dynamic stage [{result.plan.t_low}, {result.plan.t_high}] ({result.plan.source})",
        )
        log.info("FaceBooth: wrote %s (%s)", path, written.summary)
        return cls._output(written)

    @staticmethod
    def _output(written) -> io.NodeOutput:
        return io.NodeOutput(written.result, written.curve, ui=ui.PreviewText(written.summary))


# ---------------------------------------------------------------------------------------------- load
class PersonaMagicLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothPersonaMagicLoad",
            display_name="PersonaMagic Load",
            category=CATEGORY,
            description="Loads a PersonaMagic file written by PersonaMagic Train (models/facebooth/personamagic).",
            inputs=[io.Combo.Input("file", options=model_folders.list_files(FOLDER), tooltip="A .safetensors file from models/facebooth/personamagic.")],
            outputs=[PersonaMagicType.Output(display_name="personamagic", tooltip="Connect to PersonaMagic Apply.")],
        )

    @classmethod
    def fingerprint_inputs(cls, file: str = "", **kwargs) -> Any:
        return named_file_fingerprint(FOLDER, file)  # a file rewritten by PersonaMagic Train is read again

    @classmethod
    def execute(cls, file: str) -> io.NodeOutput:
        return io.NodeOutput(load_personamagic(model_folders.resolve_file(FOLDER, file)))


# ---------------------------------------------------------------------------------------------- apply
class PersonaMagicApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothPersonaMagicApply",
            display_name="PersonaMagic Apply",
            category=CATEGORY,
            description="Turns a prompt with the trigger word into stage-regulated conditioning: the supercategory prompt "
            "('face') early in sampling, the mapper's tokens in the dynamic stage (one entry per timestep bin, via ComfyUI's "
            "timestep ranges), the tokens frozen at the stage's end afterwards; and a MODEL whose cross-attention takes V from "
            "the bypass context. Works with any sampler; stacks with other packs' model patches. SD1.x, SD2.x and SDXL "
            "(each entry then carries its pooled CLIP-G output); the checkpoint must be of the family the mapper was trained on.",
            inputs=[
                *checkpoint_inputs(
                    model="The MODEL to sample with (may already carry other identity packs' patches; they are kept).",
                    clip="The checkpoint's CLIP (the same model family the mapper was trained on).",
                ),
                PersonaMagicType.Input("personamagic", tooltip="From PersonaMagic Train or PersonaMagic Load."),
                io.String.Input("prompt", multiline=True, default=f"a photo of {DEFAULT_TRIGGER} wearing a santa hat", tooltip="The prompt; the trigger word marks where the person goes. One 77-token chunk; no (word:weight) syntax."),
                io.String.Input("trigger_word", default=DEFAULT_TRIGGER, tooltip="The word in the prompt that stands for the person (replaced by the 4 learned tokens, or by 'face' early in sampling)."),
                io.Int.Input("bins", default=DEFAULT_BINS, min=1, max=1000, tooltip="How many timestep bins the dynamic stage is cut into (one conditioning entry each). 100 = 4 timesteps per bin for 400-800; the stage width (401) is exact. Ignored when 'sigmas' is connected."),
                io.Boolean.Input("v_path", default=True, tooltip="Apply the bypass to the cross-attention values (the MODEL output). Off: the MODEL is passed through unchanged."),
                io.Image.Input("image", optional=True, tooltip="The reference photo for the bypass's CLIP image embedding (with clip_vision). Without it the embedding stored at training is used."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="The CLIP vision model used in training, to embed 'image'."),
                io.Sigmas.Input("sigmas", optional=True, tooltip="Optional: the sampler's sigmas (e.g. from BasicScheduler). Then there is one entry per visited timestep and the conditioning is exactly the mapper's output at each step."),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05, optional=True,
                               tooltip="1 = PersonaMagic as trained. Blends every K and V context toward the plain prompt (the trigger replaced by "
                               "the supercategory word, 'face'), as Conditioning Average does: 0 = the plain prompt and the unpatched MODEL."),
                *range_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the V-path attention patch appended."),
                io.Conditioning.Output(display_name="conditioning", tooltip="Positive conditioning whose embeddings change with the timestep."),
            ],
        )

    @classmethod
    def execute(
        cls, model, clip, personamagic: PersonaMagicFile, prompt: str, trigger_word: str, bins: int, v_path: bool,
        image: Optional[torch.Tensor] = None, clip_vision=None, sigmas: Optional[torch.Tensor] = None,
        strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0, attn_mask: Optional[torch.Tensor] = None,
    ) -> io.NodeOutput:
        check_trigger(prompt, trigger_word)
        check_prompt_embeddings(clip, prompt, "PersonaMagic Apply")
        check_range(start_at, end_at)
        pm = personamagic
        check_family(pm, model, clip)
        device = mm.text_encoder_device()
        text = KVText([(t.encoder, t.tokenizer) for t in text_towers(clip, device=device)])
        if sum(text.dims) != pm.mapper.config.word_dim:
            raise ValueError(
                f"This PersonaMagic mapper was trained for {pm.mapper.config.word_dim}-wide text embeddings ({pm.family}) "
                f"but the CLIP gives {sum(text.dims)}: use the checkpoint it was trained on."
            )
        embed = pm.image_embed
        if image is not None and clip_vision is not None:
            embed = image_embeddings(clip_vision, image).mean(0)
        elif (image is None) != (clip_vision is None):
            raise ValueError("Connect both 'image' and 'clip_vision' to embed a reference photo, or neither to use the stored embedding.")
        if pm.mapper.config.output_bypass and embed is None:
            raise ValueError("This mapper needs a CLIP image embedding: connect the reference image and the CLIP vision model.")
        if embed is not None and pm.mapper.config.output_bypass and embed.shape[-1] != pm.mapper.config.image_dim:
            raise ValueError(
                f"The CLIP vision model gives {embed.shape[-1]}-wide embeddings; the mapper was trained with {pm.mapper.config.image_dim}. "
                "Use the same CLIP vision model as in training."
            )
        runs: Any = bins
        if sigmas is not None:
            runs = bins_for_visited(pm.plan, visited_timesteps(model, sigmas))
        with torch.inference_mode(False):
            mapper = copy.deepcopy(pm.mapper).to(device)  # the loaded object is shared by cached outputs
            entries = schedule_for(
                text, mapper, prompt, trigger_word, pm.plan,
                None if embed is None else embed.to(device), bins=runs, supercategory=pm.supercategory,
            )
        plain_key, plain_pooled = entries[0].key, entries[0].pooled  # stage 1: the supercategory word, no identity
        plain = [conditioning_entry(plain_key, plain_pooled)]
        if strength == 0.0:
            log.info("FaceBooth: PersonaMagic strength 0: the plain prompt and the unpatched MODEL")
            return io.NodeOutput(model, plain)
        if strength != 1.0:
            entries = [replace(e, key=blend(e.key, plain_key, strength), value=blend(e.value, plain_key, strength),
                               pooled=None if e.pooled is None else blend(e.pooled, plain_pooled, strength))
                       for e in entries]
        conditioning = schedule(conditioning_from_entries(model, entries), plain, start_at, end_at, attn_mask)
        out_model = model
        if v_path and pm.mapper.config.output_bypass:
            out_model = with_value_patch(model, value_patch_for(entries, name="personamagic"))
        log.info("FaceBooth: PersonaMagic conditioning with %d entries (dynamic stage [%d, %d], %d bins)",
                 len(conditioning), pm.plan.t_low, pm.plan.t_high, sum(e.stage == 2 for e in entries))
        return io.NodeOutput(out_model, conditioning)


def check_family(pm: PersonaMagicFile, model, clip) -> None:
    """A mapper works only with checkpoints of the family it was trained on (its file says which)."""
    trained = FAMILY_NAMES.get(pm.family, pm.family)
    require_family(
        "This PersonaMagic mapper", (pm.family,) if pm.family in FAMILY_NAMES else ("sd1", "sd2", "sdxl"), model=model,
        clip=clip, advice=f"It was trained on an {trained} checkpoint: apply it with an {trained} checkpoint's MODEL and "
        f"CLIP, or train a mapper for this checkpoint with PersonaMagic Train.",
    )


NODES = [PersonaMagicTrain, PersonaMagicLoad, PersonaMagicApply]
