"""Face2Diffusion nodes: load MSID + mapping, turn face crops into two word vectors, inject them into an SD1.x prompt.

The math lives in ``pipelines/face2diffusion``; this module only adapts it to ComfyUI. The prompt is tokenized by
the CLIP's own tokenizer. The two vectors go in as tensor tokens at the placeholder pair, corrected for the
position embedding that ComfyUI adds (``plan_chunked_injection``). The CLIP's own ``encode_from_tokens_scheduled``
then encodes the prompt. The result is an ordinary CONDITIONING, so every sampler, CLIP hook and conditioning
node works with it.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from comfy_api.latest import io

from ..pipelines.face.types import FaceSet
from ..pipelines.face2diffusion import (
    DEFAULT_PLACEHOLDER,
    F2DMapping,
    MSIDEncoder,
    load_expression,
)
from ..pipelines.face2diffusion.expression import find_expression_file, list_expression_files
from ..pipelines.face2diffusion.identity import (
    F2DIdentity,
    identity_crops,
    identity_word_vectors,
    inject_weighted_tokens,
    load_pair,
    square_crops,
)
from . import model_folders
from .common import (
    DEVICE_CHOICES,
    SDXL_METHODS,
    ModelCache,
    check_prompt_embeddings,
    file_key,
    load_managed,
    managed,
    named_file_fingerprint,
)
from .controls import check_range, range_inputs, schedule
from .types import Faces

log = logging.getLogger(__name__)

CATEGORY = "FaceBooth/Face2Diffusion"
FOLDER = "facebooth/face2diffusion"
EXPRESSION_SUBFOLDER = "expressions"
SD1_WIDTH = 768
_CACHE = ModelCache(max_items=2)

F2DModelType = io.Custom("FACEBOOTH_F2D")  # F2DModels
F2DIdentitiesType = io.Custom("FACEBOOTH_F2D_IDENTITIES")  # list[F2DIdentity]
F2DExpressionType = io.Custom("FACEBOOTH_F2D_EXPRESSION")  # (64,) float tensor


class UnsupportedBaseModelError(ValueError):
    """The CLIP is not an SD1.x (CLIP-L) text encoder."""


@dataclass
class F2DModels:
    """What the loader hands on (socket FACEBOOTH_F2D): both networks under one ComfyUI ModelPatcher, which
    ComfyUI places on the GPU when they run and evicts on unload / free memory."""

    msid: MSIDEncoder
    mapping: F2DMapping
    name: str
    patcher: Any = None  # comfy.model_patcher.ModelPatcher over nn.ModuleDict(msid=..., mapping=...)


# ----------------------------------------------------------------------------------------------------------
# model files


def _model_files() -> list[str]:
    files = [f.replace("\\", "/") for f in model_folders.list_files(FOLDER)]
    return [f for f in files if not f.startswith(EXPRESSION_SUBFOLDER + "/")]


def _ordered(files: list[str], hint: str) -> list[str]:
    """Files whose name contains ``hint`` first, so the default pick is msid.pt / mapping.pt."""
    return sorted(files, key=lambda f: (hint not in os.path.basename(f).lower(), f))


def load_f2d_models(msid_path: str, mapping_path: str, device: str = "auto") -> F2DModels:
    """Both files on the CPU, wrapped for ComfyUI's memory management (``device``: a DEVICE_CHOICES entry)."""
    msid, mapping = load_pair(msid_path, mapping_path)
    patcher = managed(torch.nn.ModuleDict({"msid": msid, "mapping": mapping}), device)
    return F2DModels(msid=msid, mapping=mapping, name=f"{os.path.basename(msid_path)} + {os.path.basename(mapping_path)}",
                     patcher=patcher)


def _expression_roots() -> list[str]:
    return [os.path.join(root, EXPRESSION_SUBFOLDER) for root in model_folders.folder_paths_for(FOLDER)]


def _expression_files() -> list[str]:
    return list_expression_files(_expression_roots())


def _resolve_expression(name: str) -> str:
    return find_expression_file(_expression_roots(), name)


# ----------------------------------------------------------------------------------------------------------
# identities

_crops_from_images = square_crops


def identity_vectors(models: F2DModels, crops: torch.Tensor, expression: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aligned crops (N, 112, 112, 3) of ONE person -> (2, D) word vectors, on ComfyUI's device."""
    if models.patcher is not None:
        load_managed(models.patcher)  # ComfyUI puts both networks on its device (and may evict others)
    return identity_word_vectors(models.msid, models.mapping, crops, expression)


def make_identity(
    models: F2DModels,
    faces: Optional[FaceSet],
    face_crops: Optional[torch.Tensor],
    expression: Optional[torch.Tensor],
    placeholder: str,
    strength: float,
    who: str,
) -> F2DIdentity:
    placeholder = (placeholder or "").strip()
    picked = identity_crops(faces, face_crops, who)
    if picked is None:  # no face, and Detect Faces was told to pass through
        return F2DIdentity(None, placeholder, strength, 0, who)
    crops, source = picked
    vectors = identity_vectors(models, crops, expression)
    log.info("FaceBooth Face2Diffusion: %s from %s%s, placeholder '%s', strength %.2f", who, source,
             " with expression" if expression is not None else "", placeholder, strength)
    return F2DIdentity(vectors, placeholder, float(strength), int(crops.shape[0]), who)


# ----------------------------------------------------------------------------------------------------------
# ComfyUI's CLIP


_FAMILIES = {
    "SD2ClipModel": "SD2.x (OpenCLIP ViT-H text encoder)",
    "SDXLClipModel": "SDXL (CLIP-L + OpenCLIP-G)",
    "SDXLRefinerClipModel": "the SDXL refiner (OpenCLIP-G)",
    "StableCascadeClipModel": "Stable Cascade",
}


def sd1_text_model(clip: Any) -> torch.nn.Module:
    """The CLIP-L text transformer of an SD1.x CLIP, or an error naming what the CLIP is instead.

    The check is on ComfyUI's model classes, not on widths: SDXL also holds a 768-wide CLIP-L, but its UNet
    expects the CLIP-G half too, and F2D was trained for SD1.x alone.
    """
    import comfy.sd1_clip

    model = getattr(clip, "cond_stage_model", None)
    tokenizer = getattr(clip, "tokenizer", None)
    is_sd1 = (
        type(model) is comfy.sd1_clip.SD1ClipModel
        and getattr(model, "clip", None) == "clip_l"
        and isinstance(tokenizer, comfy.sd1_clip.SD1Tokenizer)
        and getattr(tokenizer, "clip", None) == "clip_l"
    )
    if not is_sd1:
        kind = type(model).__name__ if model is not None else type(clip).__name__
        family = _FAMILIES.get(kind, f"a '{kind}' text encoder")
        raise UnsupportedBaseModelError(
            f"Face2Diffusion works with SD1.x checkpoints only (CLIP-L text encoder); this CLIP is {family}. "
            "Load an SD1.x checkpoint (SD 1.4/1.5 or a fine-tune of them) and connect its CLIP."
            + (f" On SDXL-family checkpoints use FaceBooth's {SDXL_METHODS} instead." if kind == "SDXLClipModel" else "")
        )
    text_model = model.clip_l.transformer.text_model
    width = int(text_model.embeddings.token_embedding.weight.shape[-1])
    if width != SD1_WIDTH:
        raise UnsupportedBaseModelError(f"This CLIP-L text encoder is {width} wide, not {SD1_WIDTH}: it is not an SD1.x text encoder.")
    return text_model


def inject_identities(clip: Any, tokens: dict, identities: Sequence[F2DIdentity]) -> dict:
    """A copy of ComfyUI's tokenizer output with every identity's vectors as tensor tokens at its placeholder pair.

    Strength s blends, at the text encoder's input, between the plain-text pair (s = 0) and F2D's vectors
    (s = 1, the official replacement): h = t + s (S* - t), with t = token + position embedding of the typed
    words. s > 1 extrapolates. See :func:`~facebooth.pipelines.face2diffusion.identity.inject_weighted_tokens`.
    """
    text_model = sd1_text_model(clip)
    clip.load_model()  # patched weights are in place once loaded
    emb = text_model.embeddings
    chunks = inject_weighted_tokens(tokens["l"], identities, clip.tokenizer.clip_l.tokenizer,
                                    emb.position_embedding.weight, emb.token_embedding.weight)
    return {**tokens, "l": chunks}


def encode_prompt(clip: Any, text: str, identities: Sequence[F2DIdentity], start_at: float = 0.0, end_at: float = 1.0,
                  attn_mask: Optional[torch.Tensor] = None) -> list:
    """CONDITIONING for ``text`` with the identities injected (plain text when none of them has a face), acting in
    [start_at, end_at] of the sampling and under ``attn_mask`` (controls.schedule); the plain prompt elsewhere."""
    if clip is None:
        raise RuntimeError("The CLIP input is invalid: the checkpoint loader gave no text encoder.")
    sd1_text_model(clip)
    tokens = clip.tokenize(text)
    if not any(i.vectors is not None for i in identities):
        log.warning("FaceBooth Face2Diffusion: no face in any identity; encoding the prompt as plain text.")
        return clip.encode_from_tokens_scheduled(tokens)
    identity = clip.encode_from_tokens_scheduled(inject_identities(clip, tokens, identities))
    if (start_at, end_at) == (0.0, 1.0) and attn_mask is None:
        return identity
    return schedule(identity, clip.encode_from_tokens_scheduled(tokens), start_at, end_at, attn_mask)


# ----------------------------------------------------------------------------------------------------------
# nodes


def _identity_inputs(strength_tip: str) -> list:
    return [
        io.String.Input(
            "placeholder", default=DEFAULT_PLACEHOLDER,
            tooltip="The word that marks this person in the prompt; write it followed by one more word, as 'f l' "
            "(official). Both tokens are replaced by the two F2D vectors. Must be a single CLIP token.",
        ),
        io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05, tooltip=strength_tip),
        Faces.Input(
            "faces", optional=True,
            tooltip="Faces from Detect Faces (their ArcFace-aligned 112x112 crops are used). Several photos of one "
            "person: their identity vectors are averaged. No face with 'no face: pass through': plain text.",
        ),
        io.Image.Input(
            "face_crops", optional=True,
            tooltip="Instead of 'faces': square face crops already aligned to the ArcFace template (112x112; other sizes "
            "are resized). A batch is averaged as one person.",
        ),
        F2DExpressionType.Input(
            "expression", optional=True,
            tooltip="Optional expression reference (64 3DMM coefficients, Load Face2Diffusion Expression). Without it "
            "the learned neutral vector is used and the prompt decides the expression, as in the official release.",
        ),
        F2DIdentitiesType.Input(
            "identities", optional=True,
            tooltip="More people from Face2Diffusion Identity nodes (chain them). Each takes the first free "
            "occurrence of its placeholder, in order: this node's own faces first, then the chain.",
        ),
    ]


_STRENGTH_TIP = (
    "1 = the official Face2Diffusion vectors. Lower values blend the placeholder pair back toward the plain "
    "words at the text encoder's input (0 = the prompt as plain text); above 1 extrapolates."
)


def _chained(identities: Optional[list]) -> list[F2DIdentity]:
    return list(identities or [])


class F2DLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = _model_files()
        msid_files, mapping_files = _ordered(files, "msid"), _ordered(files, "mapping")
        return io.Schema(
            node_id="FaceBoothF2DLoader",
            display_name="Load Face2Diffusion",
            category=CATEGORY,
            description="Loads Face2Diffusion's MSID identity encoder and mapping networks from models/facebooth/"
            "face2diffusion: the official msid.pt + mapping.pt unchanged, or .safetensors files from FaceBooth's "
            "training scripts. For SD1.x checkpoints. Official weights: CC BY-NC-SA 4.0 (non-commercial).",
            inputs=[
                io.Combo.Input("msid_file", options=msid_files, default=msid_files[0] if msid_files else None,
                               tooltip="MSID encoder: official msid.pt, or msid.safetensors from train_f2d_msid."),
                io.Combo.Input("mapping_file", options=mapping_files, default=mapping_files[0] if mapping_files else None,
                               tooltip="Mapping networks: official mapping.pt, or mapping.safetensors from train_f2d_mapping."),
                io.Combo.Input("device", options=DEVICE_CHOICES, default="auto",
                               tooltip="Where the two small networks run. 'auto' uses ComfyUI's device."),
            ],
            outputs=[F2DModelType.Output(display_name="f2d", tooltip="Connect to Face2Diffusion Encode / Identity.")],
        )

    @classmethod
    def fingerprint_inputs(cls, msid_file: str = "", mapping_file: str = "", device: str = "", **kwargs) -> Any:
        return (named_file_fingerprint(FOLDER, msid_file), named_file_fingerprint(FOLDER, mapping_file), device)

    @classmethod
    def execute(cls, msid_file: str, mapping_file: str, device: str) -> io.NodeOutput:
        load = partial(load_f2d_models, device=device)
        return io.NodeOutput(_CACHE.get_files(FOLDER, [msid_file, mapping_file], load, device))


class F2DEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothF2DEncode",
            display_name="Face2Diffusion Encode",
            category=CATEGORY,
            description="Encodes a prompt with a person's face in it (Face2Diffusion, SD1.x only). Write the placeholder "
            "pair where the person goes: 'a photo of f l as a chef'. Use the result as the positive conditioning of any "
            "sampler; encode the negative prompt with a plain CLIP Text Encode (the official setting is empty).",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of an SD1.x checkpoint. SD2.x, SDXL and other families are refused."),
                F2DModelType.Input("f2d", tooltip="From Load Face2Diffusion."),
                io.String.Input(
                    "text", multiline=True, dynamic_prompts=True, default="a photo of f l person",
                    tooltip="The prompt, with the placeholder pair ('f l') once per person. Weights like (f l:1.2), "
                    "BREAK and embedding:NAME work as in CLIP Text Encode; keep a pair inside one 75-token chunk.",
                ),
                *_identity_inputs(_STRENGTH_TIP),
                *range_inputs(),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="Positive conditioning with the person's identity, for any sampler.")],
        )

    @classmethod
    def execute(cls, clip: Any, f2d: F2DModels, text: str, placeholder: str, strength: float,
                faces: Optional[FaceSet] = None, face_crops: Optional[torch.Tensor] = None,
                expression: Optional[torch.Tensor] = None, identities: Optional[list] = None, start_at: float = 0.0,
                end_at: float = 1.0, attn_mask: Optional[torch.Tensor] = None) -> io.NodeOutput:
        sd1_text_model(clip)  # refuse other families before any face work
        check_prompt_embeddings(clip, text, "Face2Diffusion Encode")
        check_range(start_at, end_at)
        people: list[F2DIdentity] = []
        if faces is not None or face_crops is not None:
            people.append(make_identity(f2d, faces, face_crops, expression, placeholder, strength, "Face2Diffusion Encode"))
        elif expression is not None:
            raise ValueError("Face2Diffusion Encode: 'expression' is connected but no faces: connect 'faces' or 'face_crops'.")
        people.extend(_chained(identities))
        if not people:
            raise ValueError(
                "Face2Diffusion Encode: connect 'faces' (from Detect Faces) or 'face_crops', or chain Face2Diffusion "
                "Identity nodes into 'identities'."
            )
        return io.NodeOutput(encode_prompt(clip, text, people, start_at, end_at, attn_mask))


class F2DIdentityNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothF2DIdentity",
            display_name="Face2Diffusion Identity",
            category=CATEGORY,
            description="One more person for Face2Diffusion Encode: several people in one prompt, one placeholder pair "
            "each ('f l and v l', or 'f l and f l' filled in order). Chain these nodes, then connect the last one to "
            "the Encode node's 'identities'.",
            inputs=[F2DModelType.Input("f2d", tooltip="From Load Face2Diffusion."), *_identity_inputs(_STRENGTH_TIP)],
            outputs=[F2DIdentitiesType.Output(display_name="identities",
                                              tooltip="The chained people so far, this one last. Connect to Encode or to the next Identity node.")],
        )

    @classmethod
    def execute(cls, f2d: F2DModels, placeholder: str, strength: float, faces: Optional[FaceSet] = None,
                face_crops: Optional[torch.Tensor] = None, expression: Optional[torch.Tensor] = None,
                identities: Optional[list] = None) -> io.NodeOutput:
        earlier = _chained(identities)
        who = f"Face2Diffusion Identity #{len(earlier) + 1} in the chain"
        return io.NodeOutput(earlier + [make_identity(f2d, faces, face_crops, expression, placeholder, strength, who)])


class F2DLoadExpression(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothF2DLoadExpression",
            display_name="Load Face2Diffusion Expression",
            category=CATEGORY,
            description="Loads 64 expression coefficients (3DMM/BFM expression basis, e.g. Deep3DFaceRecon's 'exp', the "
            "same .npy files the mapping training reads) from models/facebooth/face2diffusion/expressions.",
            inputs=[io.Combo.Input("expression_file", options=_expression_files(),
                                   tooltip="A .npy with 64 numbers, or a .safetensors with a tensor named 'expression'.")],
            outputs=[F2DExpressionType.Output(display_name="expression",
                                              tooltip="Connect to the 'expression' input of Face2Diffusion Encode / Identity.")],
        )

    @classmethod
    def fingerprint_inputs(cls, expression_file: str = "", **kwargs) -> Any:
        try:
            return (expression_file, file_key(_resolve_expression(expression_file)))
        except (FileNotFoundError, TypeError, ValueError):  # reported when the node runs
            return (expression_file, None)

    @classmethod
    def execute(cls, expression_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_expression(_resolve_expression(expression_file)))


NODES = [F2DLoader, F2DEncode, F2DIdentityNode, F2DLoadExpression]

__all__ = [
    "F2DIdentity",
    "F2DModels",
    "NODES",
    "UnsupportedBaseModelError",
    "encode_prompt",
    "identity_vectors",
    "inject_identities",
    "load_f2d_models",
    "make_identity",
    "sd1_text_model",
]
