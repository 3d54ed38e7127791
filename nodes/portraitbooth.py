"""PortraitBooth / FastComposer nodes: load the published FastComposer checkpoint (or our STEA file) and
build identity-augmented conditioning (STEA) for any sampler."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from comfy_api.latest import io

import comfy.sd
import folder_paths

from ..pipelines.face.types import FaceSet
from ..pipelines.portraitbooth.fastcomposer_loading import (
    fastcomposer_to_ldm_checkpoint,
    is_fastcomposer_state_dict,
    load_stea,
    read_weights,
    split_fastcomposer,
    stea_from_fastcomposer,
)
from ..pipelines.portraitbooth.stea import STEAModel, SubjectFeatures, fuse_subject_rows
from ..pipelines.portraitbooth.token_positions import (
    SubjectMatch,
    SubjectWordError,
    find_subject_positions,
    parse_subject_words,
    token_id,
)
from . import model_folders
from .common import check_prompt_embeddings, load_managed, managed, named_file_fingerprint, require_family
from .controls import check_range, range_inputs, schedule
from .types import FaceAnalyzer as FaceAnalyzerType
from .types import Faces

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/PortraitBooth"
FOLDER = "facebooth/portraitbooth"

STEAType = io.Custom("FACEBOOTH_STEA")
AUTO_START_AT = -1.0  # start_at sentinel: the STEA's recommended delayed conditioning (STEAModel.recommended_start_at)


@dataclass
class LoadedSTEA:
    """What the STEA socket carries: the model and the ComfyUI patcher that moves it to the GPU when used."""

    model: STEAModel
    patcher: Any
    name: str


def _wrap(model: STEAModel, name: str) -> LoadedSTEA:
    return LoadedSTEA(model=model, patcher=managed(model), name=name)


def _file_input(tooltip: str) -> io.Combo.Input:
    return io.Combo.Input("file", options=model_folders.list_files(FOLDER), tooltip=tooltip)


class FastComposerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothFastComposerLoader",
            display_name="Load FastComposer Checkpoint",
            category=CATEGORY,
            description="Loads FastComposer's published pytorch_model.bin (weights only, never arbitrary pickles) from "
            "models/facebooth/portraitbooth: its fine-tuned SD1.5 UNet, text encoder, VAE, and the STEA fuse MLP with "
            "its CLIP image encoder. Old key names (no text_model level, position_ids, pre-0.17 VAE attention) are handled.",
            inputs=[_file_input("FastComposer's pytorch_model.bin (huggingface.co/mit-han-lab/fastcomposer), 4.5 GB.")],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="FastComposer's fine-tuned SD1.5 UNet; use it with the STEA conditioning."),
                io.Clip.Output(display_name="CLIP", tooltip="The SD1.5 CLIP-L text encoder stored in the file."),
                io.Vae.Output(display_name="VAE", tooltip="The SD1.5 VAE stored in the file."),
                STEAType.Output(display_name="stea", tooltip="The identity fuse MLP and CLIP image encoder, for PortraitBooth Conditioning."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, file: str = "", **kwargs) -> Any:
        return named_file_fingerprint(FOLDER, file)

    @classmethod
    def execute(cls, file: str) -> io.NodeOutput:
        path = model_folders.resolve_file(FOLDER, file)
        sd, _ = read_weights(path)
        if not is_fastcomposer_state_dict(sd):
            raise ValueError(
                f"{file} is not a FastComposer checkpoint (it has no unet./postfuse_module. weights). "
                "Load PortraitBooth STEA files with 'Load PortraitBooth STEA' and the UNet with a checkpoint loader."
            )
        parts = split_fastcomposer(sd, file)
        stea = stea_from_fastcomposer(parts, source=file)
        ldm = fastcomposer_to_ldm_checkpoint(parts)
        del sd, parts
        loaded = comfy.sd.load_state_dict_guess_config(
            ldm, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
        )
        if loaded is None or loaded[1] is None:
            raise ValueError(f"ComfyUI could not recognise the UNet/text encoder in {file}; the file is damaged.")
        model, clip, vae, _ = loaded
        context_dim = model.model.model_config.unet_config.get("context_dim")
        if context_dim != 768:
            raise ValueError(f"{file}: the UNet takes {context_dim}-wide text, FastComposer is SD1.5 (768).")
        return io.NodeOutput(model, clip, vae, _wrap(stea, file))


class STEALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothSTEALoader",
            display_name="Load PortraitBooth STEA",
            category=CATEGORY,
            description="Loads a STEA file from models/facebooth/portraitbooth: one trained with FaceBooth's "
            "train_portraitbooth (ArcFace features, .safetensors), or the STEA part of FastComposer's pytorch_model.bin.",
            inputs=[_file_input("A PortraitBooth STEA .safetensors, or FastComposer's pytorch_model.bin (only its STEA part is used).")],
            outputs=[STEAType.Output(display_name="stea", tooltip="For PortraitBooth Conditioning.")],
        )

    @classmethod
    def fingerprint_inputs(cls, file: str = "", **kwargs) -> Any:
        return named_file_fingerprint(FOLDER, file)

    @classmethod
    def execute(cls, file: str) -> io.NodeOutput:
        model = load_stea(model_folders.resolve_file(FOLDER, file))
        log.info("FaceBooth: STEA %s (%s features, %s)", file, model.config.feature_source, list(model.config.arcface_layers) or "clip")
        return io.NodeOutput(_wrap(model, file))


# ----------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------


def _single_encoder_tokens(tokens: dict) -> tuple[str, list]:
    if len(tokens) != 1:
        raise ValueError(
            f"This CLIP has text encoders {sorted(tokens)}; PortraitBooth/FastComposer work with SD1.x (one CLIP-L "
            "encoder). Use an SD1.5 checkpoint's CLIP (or the one from Load FastComposer Checkpoint)."
        )
    key = next(iter(tokens))
    return key, tokens[key]


def _sd_tokenizer(clip) -> Any:
    tok = clip.tokenizer
    inner = getattr(tok, getattr(tok, "clip", ""), None)
    return inner if inner is not None else tok


def _subject_ids(clip, key: str, word: str, end_ids: set[int]) -> list[int]:
    chunk = clip.tokenize(word)[key][0]
    ids = []
    for t in chunk[1:]:
        tid = token_id(t[0])
        if tid is None:
            raise SubjectWordError(f"The subject {word!r} is an embedding; name a plain word of the prompt (e.g. 'man').")
        if tid in end_ids:
            break
        ids.append(tid)
    return ids


def locate_subjects(clip, tokens: dict, subjects: list[str], text: str) -> list[SubjectMatch]:
    """Subject positions in ComfyUI's tokenized prompt (chunks of 77, weights, embeddings)."""
    key, chunks = _single_encoder_tokens(tokens)
    tok = _sd_tokenizer(clip)
    specials = {t for t in (getattr(tok, "start_token", None), getattr(tok, "end_token", None), getattr(tok, "pad_token", None)) if t is not None}
    end_ids = {t for t in (getattr(tok, "end_token", None), getattr(tok, "pad_token", None)) if t is not None}
    inv = getattr(tok, "inv_vocab", None)
    is_word_end = (lambda i: str(inv.get(i, "</w>")).endswith("</w>")) if isinstance(inv, dict) else None
    try:
        return find_subject_positions(
            [[t[0] for t in chunk] for chunk in chunks],
            subjects,
            [_subject_ids(clip, key, w, end_ids) for w in subjects],
            weights=[[t[1] for t in chunk] for chunk in chunks],
            is_word_end=is_word_end,
            special_ids=sorted(specials),
        )
    except SubjectWordError as exc:
        shown = text if len(text) <= 120 else text[:117] + "..."
        raise SubjectWordError(f"{exc} Prompt: {shown!r}") from exc


def _faces_per_subject(faces: FaceSet, n_subjects: int) -> list[list]:
    found = faces.faces
    if n_subjects == 1:
        return [list(found)]  # several photos of one person: their features are averaged
    if len(found) != n_subjects:
        raise ValueError(
            f"The prompt names {n_subjects} subjects but Detect Faces gave {len(found)} face(s). Give one face per "
            "subject (in subject order: images in batch order, faces left to right), or one subject word."
        )
    return [[f] for f in found]


def _subject_features(model: STEAModel, faces: list, name: str) -> SubjectFeatures:
    def stack(kind: str) -> Optional[torch.Tensor]:
        crops = [f.crops[kind] for f in faces if kind in f.crops]
        return torch.stack(crops) if len(crops) == len(faces) else None

    clip_images = stack("ffhq_512")
    if clip_images is None:
        clip_images = stack("clip_224")
    embeddings = [f.embedding for f in faces if f.embedding is not None]
    return SubjectFeatures(
        clip_images=clip_images,
        arcface_crops=stack("arcface_112"),
        embeddings=torch.stack(embeddings) if len(embeddings) == len(faces) else None,
        name=name,
    )


def _reweight(rows: torch.Tensor, empty: torch.Tensor, weight: float) -> torch.Tensor:
    """ComfyUI's prompt weighting of one output row: (z - z_empty) * w + z_empty."""
    return (rows - empty) * weight + empty


class PortraitBoothConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothPortraitBoothConditioning",
            display_name="PortraitBooth Conditioning (STEA)",
            category=CATEGORY,
            description="Encodes the prompt and replaces the subject word's text embedding with the STEA fusion of that "
            "word and the person's identity features. Works with weights, embeddings and long prompts; several subjects "
            "take one face each. Optionally the first part of sampling uses the plain text (delayed subject conditioning).",
            inputs=[
                STEAType.Input("stea", tooltip="From Load FastComposer Checkpoint or Load PortraitBooth STEA."),
                io.Clip.Input("clip", tooltip="SD1.x CLIP (FastComposer: the CLIP from its own loader)."),
                Faces.Input("faces", tooltip="From Detect Faces: one face per subject word (or any number for one subject: averaged)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a photo of a man",
                                tooltip="The prompt. It must contain each subject word; weights like (man:1.2) scale the identity too."),
                io.String.Input("subject_words", default="man",
                                tooltip="The word(s) in the prompt that stand for the person(s), e.g. 'man' or 'man, woman'. "
                                "A repeated word takes its occurrences in order. A word missing from the prompt is an error."),
                io.Float.Input("start_at", default=AUTO_START_AT, min=AUTO_START_AT, max=1.0, step=0.001,
                               tooltip="The identity acts from this fraction of the sampling on; before it the plain text prompt is used. "
                               "This is FastComposer's delayed subject conditioning (its 'text only fraction'). -1 = what the STEA's "
                               "weights were made for: 0.2 for FastComposer's, a STEA file's own recommended value, else 0. 0 = off."),
                FaceAnalyzerType.Input("face_analyzer", optional=True,
                                       tooltip="Needed only for STEA files that read shallow ArcFace layers: the Face Analyzer (PyTorch) "
                                       "with the ArcFace the STEA was trained with."),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05, optional=True,
                               tooltip="1 = STEA as trained. The subject rows are blended toward the plain text rows: 0 = the plain prompt, "
                               "above 1 extrapolates."),
                *[i for i in range_inputs() if i.id != "start_at"],
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="Positive conditioning with the identity in the subject word(s).")],
        )

    @classmethod
    def execute(cls, stea: LoadedSTEA, clip, faces: FaceSet, text: str, subject_words: str, start_at: float = AUTO_START_AT,
                face_analyzer=None, strength: float = 1.0, end_at: float = 1.0, attn_mask=None) -> io.NodeOutput:
        require_family("PortraitBooth (FastComposer, SD1.5)", clip=clip)
        check_prompt_embeddings(clip, text, "PortraitBooth Conditioning")
        if start_at < 0:  # auto: the delayed conditioning the weights were made for
            start_at = stea.model.recommended_start_at
            log.info("FaceBooth PortraitBooth: %s -> identity from %.2f of the sampling on (its recommended start).", stea.name, start_at)
        check_range(start_at, end_at)
        subjects = parse_subject_words(subject_words)
        tokens = clip.tokenize(text)
        matches = locate_subjects(clip, tokens, subjects, text)
        key = next(iter(tokens))
        # The subject rows are fused from the unweighted text output; a prompt weight is applied afterwards.
        plain_tokens = {key: [list(chunk) for chunk in tokens[key]]}
        for m in matches:
            entry = plain_tokens[key][m.chunk][m.slot]
            plain_tokens[key][m.chunk][m.slot] = (entry[0], 1.0) + tuple(entry[2:])
        encoded = clip.encode_from_tokens(plain_tokens, return_pooled=True, return_dict=True)
        cond = encoded.pop("cond")
        extras = dict(encoded)

        if not faces.faces:
            log.warning("FaceBooth PortraitBooth: no face in the input (policy %s); the prompt is used without identity.", faces.no_face_policy)
            fused = cond
        else:
            model = stea.model
            backbone = getattr(getattr(face_analyzer, "recognizer", None), "backbone", None)
            if model.needs_backbone and backbone is None:
                raise ValueError(
                    f"{stea.name} reads ArcFace layers {list(model.config.arcface_layers)}: connect a Face Analyzer (PyTorch) "
                    "with the ArcFace backbone it was trained with to 'face_analyzer'."
                )
            per_subject = _faces_per_subject(faces, len(subjects))
            load_managed(stea.patcher)
            with torch.no_grad():
                feats = torch.stack([model.features(_subject_features(model, fs, s), backbone) for fs, s in zip(per_subject, subjects)])
                fused = fuse_subject_rows(cond, [m.position for m in matches], feats, model.fuse)
            if strength != 1.0:  # only the subject rows differ; 0 gives the text rows back exactly
                fused = cond + strength * (fused - cond)
        text_cond = cond
        weighted = [m for m in matches if m.weight != 1.0]
        if weighted:
            empty = clip.encode_from_tokens(clip.tokenize(""))
            text_cond, fused = cond.clone(), fused.clone()
            for m in weighted:
                e = empty[:, m.slot].to(cond.dtype)
                text_cond[:, m.position] = _reweight(cond[:, m.position], e, m.weight)
                fused[:, m.position] = _reweight(fused[:, m.position], e, m.weight)
        log.info("FaceBooth PortraitBooth: %s", ", ".join(f"{m.subject!r} at token {m.position}" for m in matches))

        if strength == 0.0:
            fused = text_cond
        return io.NodeOutput(schedule([[fused, dict(extras)]], [[text_cond, dict(extras)]], float(start_at), float(end_at), attn_mask))


NODES = [FastComposerLoader, STEALoader, PortraitBoothConditioning]
