"""Cross Initialization nodes: learn a face embedding on the loaded checkpoint, import official results.

The math is ``pipelines/cross_init.py`` (init, regulariser, presets) on the shared textual-inversion engine;
``ti_comfy_backend.py`` runs it on ComfyUI's MODEL / CLIP / VAE. The result is a standard ComfyUI embedding in
``models/embeddings``, used as ``embedding:NAME`` in any prompt.

Caching: ComfyUI reuses the node's output while its inputs and the embedding file stay the same. The
fingerprint includes the file's size and time, so a deleted or replaced file makes the node run again; a
run with the same MODEL/CLIP/VAE objects, images and settings as one this ComfyUI process already did then
rewrites the stored result instead of training again (or, if the file is still the one written, just returns
it). Anything else that would replace an existing file needs 'overwrite'.
"""
from __future__ import annotations

import logging
import os
from dataclasses import astuple, replace
from typing import Any, Optional

import torch
from comfy_api.latest import io, ui

import folder_paths

from ..pipelines import cross_init as ci
from ..pipelines.face.types import FaceSet
from ..pipelines.textual_inversion.backend import FAMILY_NAMES
from ..utils.files import BadNameError, sanitize_name
from . import model_folders
from .common import (
    RerunCache,
    checkpoint_inputs,
    comfy_hooks,
    embedding_family,
    file_state,
    image_digest,
    named_file_fingerprint,
)
from .loss_curve import loss_curve_image
from .ti_comfy_backend import ComfyTIBackend
from .types import Faces

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/Cross Initialization"
PRESETS = ["fast", "full", "custom"]
_FACE_CROP = "ffhq_512"


# ---------------------------------------------------------------------------------------------- files
def embedding_name(name: str) -> str:
    """A file-safe embedding name that also survives prompt parsing (ComfyUI splits prompts at spaces)."""
    return sanitize_name(name, what="embedding name").replace(" ", "_")


def embedding_path(name: str) -> str:
    """Where an embedding called ``name`` is written: the first of ComfyUI's ``embeddings`` folders."""
    return os.path.join(model_folders.writable_folder("embeddings"), f"{name}.safetensors")


_WRITTEN = RerunCache()  # result = (embedding, metadata) written for a request


def _reference_images(image: torch.Tensor, faces: Optional[FaceSet]) -> torch.Tensor:
    if faces is None:
        return image
    if not faces.faces:
        raise ValueError(
            "The connected faces hold no face (Detect Faces found none). Check its debug output, or disconnect "
            "'faces' to train on the whole photos."
        )
    if any(_FACE_CROP not in f.crops for f in faces.faces):
        raise ValueError(f"The connected faces have no '{_FACE_CROP}' crops; connect the 'faces' output of Detect Faces.")
    return faces.crops(_FACE_CROP)


def _settings(preset: str, steps: int, learning_rate: float, batch_size: int, seed: int, resolution: int):
    if preset == "custom":
        settings = ci.make_settings("custom", steps=steps, lr=learning_rate, batch_size=batch_size)
    else:
        settings = ci.make_settings(preset)
    if resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (got {resolution}); use 512 for SD1.5 / SD2.1-base, 1024 for SDXL")
    return replace(settings, seed=seed, resolution=resolution, preview_every=max(1, settings.steps // 25))


# ---------------------------------------------------------------------------------------------- nodes
class CrossInitialization(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothCrossInitialization",
            display_name="Cross Initialization (train face embedding)",
            category=CATEGORY,
            description="Learns a two-token embedding of the face in the photos on the loaded SD1.x / SD2.x / SDXL-family checkpoint "
            "(Cross Initialization, CVPR 2024: textual inversion started from E(mean celebrity-name embedding)). Writes "
            "models/embeddings/<name>.safetensors; use 'embedding:<name>' in any prompt of the same family. 'fast' takes 25 steps, "
            "'full' 320. On SDXL both text encoders get the two tokens (clip_l and clip_g in the file).",
            inputs=[
                *checkpoint_inputs(
                    model="The checkpoint's MODEL (SD1.x, SD2.x or SDXL family: SDXL, Pony, Illustrious, SSD-1B, Vega, KOALA). It stays frozen; LoRAs and patches on it apply during training.",
                    clip="The same checkpoint's CLIP. The embedding is learned for its text encoders (clip_l for SD1, clip_h for SD2, clip_l and clip_g for SDXL).",
                    vae="The checkpoint's VAE, used once to encode the photos.",
                ),
                io.Image.Input("image", tooltip="One or more photos of the same person (a batch). Centre-cropped to a square. Ignored when 'faces' is connected."),
                Faces.Input("faces", optional=True, tooltip="Optional: faces from Detect Faces. Their aligned FFHQ-style 512 crops are used instead of the photos, usually better for full-body photos."),
                io.String.Input("name", default="my_face", tooltip="Embedding name: the file is models/embeddings/<name>.safetensors and prompts use embedding:<name>. No folders; spaces become '_'."),
                io.Combo.Input("preset", options=PRESETS, default="fast", tooltip="fast: 25 steps, batch 8, lr 0.08 (paper's 'Ours-fast'). full: 320 steps, batch 8, lr 0.005 (paper). custom: the three values below."),
                io.Int.Input("steps", default=320, min=1, max=10000, tooltip="Optimisation steps (custom preset only)."),
                io.Float.Input("learning_rate", default=0.005, min=1e-6, max=1.0, step=0.0005, round=1e-6, tooltip="AdamW learning rate (custom preset only). Too high a rate can diverge; the node then stops with an error."),
                io.Int.Input("batch_size", default=8, min=1, max=64, tooltip="Samples per step (custom preset only). Each is a random photo, flip, timestep, noise and prompt template."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False, tooltip="Seed for the sampled timesteps, noise, flips and templates: the same seed gives the same embedding."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Training resolution in pixels: 512 for SD1.5 and SD2.1-base, 768 for SD2.1-768, 1024 for SDXL."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing embedding of the same name. Off: stop with an error instead of replacing it."),
            ],
            outputs=[
                io.String.Output(display_name="prompt", tooltip="The text to put in a prompt: 'embedding:<name>'. Feed it to a string Concatenate node to build the prompt."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step (light) and its moving average (dark)."),
            ],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, name: Optional[str] = None) -> bool | str:
        if not isinstance(name, str):  # a linked value is checked when the node runs
            return True
        try:
            embedding_name(name)
        except BadNameError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, name: str = "", **kwargs) -> Any:
        try:
            path = embedding_path(embedding_name(name))
        except Exception:  # the name is refused when the node runs, with its message
            return ("unusable name", name)
        return (path, file_state(path))

    @classmethod
    def execute(
        cls, model, clip, vae, image: torch.Tensor, name: str, preset: str, steps: int, learning_rate: float,
        batch_size: int, seed: int, resolution: int, overwrite: bool, faces: Optional[FaceSet] = None,
    ) -> io.NodeOutput:
        safe = embedding_name(name)
        path = embedding_path(safe)
        settings = _settings(preset, steps, learning_rate, batch_size, seed, resolution)
        images = _reference_images(image, faces)
        key = (astuple(settings), image_digest(images), faces is not None)
        objects = (model, clip, vae)

        done = _WRITTEN.get(path, key, objects)
        if done is not None:
            state = file_state(path)
            if state is not None and state == done.state:
                log.info("FaceBooth: embedding %s is up to date (same inputs); not training again", safe)
                return cls._output(safe, done)
            if state is None or overwrite:  # deleted or replaced since: restore what these inputs produced
                ci.save_embedding(path, *done.result)
                done.state = file_state(path)
                log.info("FaceBooth: rewrote embedding %s from this session's result for the same inputs", safe)
                return cls._output(safe, done)
        cls._refuse_existing(path, safe, overwrite)

        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        with torch.inference_mode(False):  # nodes run in inference mode; the optimisation needs autograd
            backend = ComfyTIBackend(model, clip, vae)
            job = ci.CrossInitRun(backend, images, settings, comfy_hooks(settings.steps, node_id))
            log.info(
                "FaceBooth: Cross Initialization of '%s': %s preset, %d steps, batch %d, lr %g, %d image(s) at %d px, %s on %s",
                safe, settings.preset, settings.steps, settings.batch_size, settings.lr, job.pixels.shape[0],
                settings.resolution, backend.family, backend.device,
            )
            result = job.run()  # raises on interrupt or divergence, before anything is written
        cls._refuse_existing(path, safe, overwrite)  # someone may have written it while we trained
        ci.save_embedding(path, result.embedding, result.metadata)
        losses = result.history.loss_history
        written = _WRITTEN.put(
            path, key, objects, (result.embedding, result.metadata),
            curve=loss_curve_image(losses, title=f"Cross Initialization '{safe}'"),
            summary=f"{FAMILY_NAMES.get(backend.family, backend.family)}, {len(losses)} steps, final loss {losses[-1]:.4f}",
        )
        log.info("FaceBooth: wrote %s (%s); use embedding:%s in a prompt", path, written.summary, safe)
        return cls._output(safe, written)

    @staticmethod
    def _refuse_existing(path: str, safe: str, overwrite: bool) -> None:
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(
                f"An embedding named '{safe}' already exists ({path}). Choose another name or turn on 'overwrite'."
            )

    @staticmethod
    def _output(safe: str, written) -> io.NodeOutput:
        prompt = f"embedding:{safe}"
        return io.NodeOutput(prompt, written.curve, ui=ui.PreviewText(f"{prompt} ({written.summary})"))


def _official_files() -> list[str]:
    try:
        files = folder_paths.get_filename_list("embeddings")
    except Exception:  # listing must never break the node list
        return []
    return [f for f in files if f.lower().endswith((".bin", ".pt"))]


class CrossInitImportOfficial(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothCrossInitImportOfficial",
            display_name="Cross Initialization: import official embedding",
            category=CATEGORY,
            description="Converts a learned_embeds.bin from the official Cross Initialization code (two vectors "
            "'<id>_v0', '<id>_v1') into a ComfyUI embedding, models/embeddings/<name>.safetensors. Loaded weights-only: "
            "pickles holding code are refused. ComfyUI itself would read only the first vector of the .bin.",
            inputs=[
                io.Combo.Input("learned_embeds", options=_official_files(), tooltip="The official .bin (or .pt) file, put into models/embeddings under any name."),
                io.String.Input("name", default="my_face", tooltip="Embedding name for the converted file; prompts use embedding:<name>. No folders; spaces become '_'."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing embedding of the same name. Off: stop with an error instead."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The text to put in a prompt: 'embedding:<name>'.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: Optional[str] = None) -> bool | str:
        return CrossInitialization.validate_inputs(name)

    @classmethod
    def fingerprint_inputs(cls, learned_embeds: str = "", name: str = "", **kwargs) -> Any:
        return (CrossInitialization.fingerprint_inputs(name=name), named_file_fingerprint("embeddings", learned_embeds))

    @classmethod
    def execute(cls, learned_embeds: str, name: str, overwrite: bool) -> io.NodeOutput:
        safe = embedding_name(name)
        source = model_folders.resolve_file("embeddings", learned_embeds)
        path = embedding_path(safe)
        if os.path.abspath(source) == os.path.abspath(path):
            raise ValueError(f"'{learned_embeds}' cannot be converted onto itself; choose another name.")
        CrossInitialization._refuse_existing(path, safe, overwrite)
        embedding, ident = ci.load_official_learned_embeds(source)
        ci.convert_official(source, path)
        key, vectors = next(iter(embedding.items()))
        family = embedding_family(embedding)
        text = (f"embedding:{safe}: a {family} embedding ({key}, {vectors.shape[0]} vectors, official id '{ident}'); "
                f"use it in prompts of {family} checkpoints")
        log.info("FaceBooth: converted %s to %s", source, path)
        return io.NodeOutput(f"embedding:{safe}", ui=ui.PreviewText(text))


NODES = [CrossInitialization, CrossInitImportOfficial]
