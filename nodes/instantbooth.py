"""InstantBooth nodes: load the trained heads + adapters, and apply them (concept token + gated adapters).

The math lives in ``pipelines/instantbooth``; here only ComfyUI's objects are turned into tensors and back:
CLIP_VISION -> CLIP features, CLIP -> tokens and text-encoder output, MODEL -> a clone with a ``middle_patch``.
"""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..pipelines.face.types import FaceSet
from ..pipelines.instantbooth import (
    APPLY_TO,
    AdapterPatch,
    IdentifierError,
    InstantBoothModel,
    ReferenceError,
    check_coverage,
    comfy_block_map,
    identifier_rows,
    inject_concept,
    insert_identifier,
    load_instantbooth,
    references_from_faces,
    references_from_images,
)
from . import model_folders
from .common import (
    ModelCache,
    check_prompt_embeddings,
    load_managed,
    managed,
    named_file_fingerprint,
    placeholder_image,
    require_family,
)
from .types import Faces

log = logging.getLogger(__name__)
CATEGORY = "FaceBooth/InstantBooth"
FOLDER = "facebooth/instantbooth"
InstantBoothType = io.Custom("FACEBOOTH_INSTANTBOOTH")  # ModelPatcher over a pipelines.instantbooth.InstantBoothModel
_CACHE = ModelCache(max_items=2)


class InstantBoothLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothInstantBoothLoader",
            display_name="Load InstantBooth",
            category=CATEGORY,
            description="Loads InstantBooth weights (concept and patch FC heads + one gated adapter per UNet transformer "
            "block) from models/facebooth/instantbooth. There are no public weights: train them with "
            "training/train_instantbooth.py.",
            inputs=[
                io.Combo.Input("instantbooth_file", options=model_folders.list_files(FOLDER),
                               tooltip="An InstantBooth .safetensors file made by train_instantbooth.py for this model family (SD1.x)."),
            ],
            outputs=[InstantBoothType.Output(display_name="instantbooth", tooltip="Connect to Apply InstantBooth.")],
        )

    @classmethod
    def fingerprint_inputs(cls, instantbooth_file: str = "", **kwargs):
        return named_file_fingerprint(FOLDER, instantbooth_file)

    @classmethod
    def execute(cls, instantbooth_file: str) -> io.NodeOutput:
        # the socket and the cache hold ComfyUI's ModelPatcher (model on the offload device), never a bare module
        return io.NodeOutput(_CACHE.get_files(FOLDER, [instantbooth_file], lambda path: managed(load_instantbooth(path))))


# --- ComfyUI objects -> tensors ------------------------------------------------------------------------------


def model_transformer_blocks(model) -> dict[str, int]:
    """LDM path -> width of every transformer block of a ComfyUI MODEL (its module names are LDM paths)."""
    unet = model.get_model_object("diffusion_model")
    return {
        name: int(module.norm1.normalized_shape[0])
        for name, module in unet.named_modules()
        if type(module).__name__ == "BasicTransformerBlock"
    }


def reference_crops(size: int, reference=None, reference_mask=None, faces: FaceSet | None = None) -> torch.Tensor:
    """Masked object crops of every reference: the faces of a FaceSet first, then the reference images."""
    parts = []
    if faces is not None:
        parts.append(references_from_faces(faces, size=size))
    if reference is not None:
        parts.append(references_from_images(reference, reference_mask, size=size))
    if not parts:
        raise ReferenceError("Give the reference photos: connect 'reference' (IMAGE, optionally with 'reference_mask') or 'faces' (Detect Faces).")
    return torch.cat(parts)


def encode_references(clip_vision, crops: torch.Tensor, ib: InstantBoothModel) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP features of the crops: (N, T, hidden) last-layer tokens and (N, global) image embeddings."""
    out = clip_vision.encode_image(crops, crop=True)
    hidden, embeds = out["last_hidden_state"].float().cpu(), out["image_embeds"].float().cpu()
    cfg = ib.config
    if hidden.shape[-1] != cfg.clip_hidden_dim or embeds.shape[-1] != cfg.clip_global_dim:
        raise ValueError(
            f"This CLIP vision model gives {hidden.shape[-1]}-wide tokens and {embeds.shape[-1]}-wide image embeddings, but the "
            f"InstantBooth file was trained on a CLIP vision model with {cfg.clip_hidden_dim} / {cfg.clip_global_dim} "
            "(ViT-L/14: 1024 / 768). Load the CLIP vision model it was trained with."
        )
    return hidden, embeds


def _identifier_token(clip, identifier: str) -> tuple[str, int]:
    """(tokenizer key, token id) of the identifier word in this CLIP's tokenizer; it must be one token."""
    word = clip.tokenize(identifier)
    empty = clip.tokenize("")
    key = next(iter(word))
    ids = [t[0] for t in word[key][0]]
    end = empty[key][0][1][0]  # "" -> [start, end, pad ...]
    body = ids[1: ids.index(end, 1)] if end in ids[1:] else ids[1:2]
    if len(body) != 1:
        raise IdentifierError(f"The identifier '{identifier}' is {len(body)} tokens in this CLIP tokenizer; InstantBooth replaces exactly one.")
    return key, int(body[0])


def encode_prompt(clip, text: str, ib: InstantBoothModel, concept: torch.Tensor) -> list:
    """CONDITIONING for ``text`` (identifier inserted before the class noun if missing) with the text-encoder
    output at the identifier replaced by the concept vector."""
    cfg = ib.config
    prompt = insert_identifier(text, cfg.identifier, cfg.class_nouns)
    if prompt != text:
        log.info("InstantBooth: prompt with identifier: %r", prompt)
    key, ident = _identifier_token(clip, cfg.identifier)
    tokens = clip.tokenize(prompt)
    chunks = [[t[0] for t in chunk] for chunk in tokens[key]]
    rows = identifier_rows(chunks, ident)
    out = []
    for cond, extra in clip.encode_from_tokens_scheduled(tokens):
        if cond.shape[1] != sum(len(c) for c in chunks):
            raise IdentifierError(f"The text encoder returned {cond.shape[1]} rows for {sum(len(c) for c in chunks)} tokens; cannot place the concept token.")
        out.append([inject_concept(cond, rows, concept), dict(extra)])
    return out


def apply_instantbooth(
    model, clip, clip_vision, ib, text: str, *, beta: float = 0.3, alpha: float = 0.4,
    start_at: float = 0.0, end_at: float = 1.0, apply_to: str = "both",
    reference=None, reference_mask=None, faces: FaceSet | None = None, attn_mask=None,
):
    """(patched MODEL clone, CONDITIONING, reference crops) — the Apply node's work, callable from tests.

    ``ib``: the loader's ModelPatcher over an InstantBoothModel (a bare InstantBoothModel is wrapped here). The
    heads run where ComfyUI loads it; the patch lists it in ``models()``, so samplers load it with the UNet.
    """
    require_family("InstantBooth", model=model, clip=clip)
    patcher = managed(ib) if isinstance(ib, InstantBoothModel) else ib
    ib = patcher.model
    if end_at < start_at:
        raise ValueError(f"end_at ({end_at}) is before start_at ({start_at}).")
    unused = check_coverage(ib.config.adapters, model_transformer_blocks(model))
    if unused:
        log.info("InstantBooth: %d adapters of the file have no block in this model and stay unused.", len(unused))
    size = int(getattr(clip_vision, "image_size", 224))
    crops = reference_crops(size, reference, reference_mask, faces)
    hidden, embeds = encode_references(clip_vision, crops, ib)
    load_managed(patcher)
    dev = patcher.load_device
    with torch.no_grad():
        concept = ib.concept(embeds.to(dev), alpha).cpu()
        patch_tokens = ib.patch_tokens(hidden.to(dev)).cpu()
    conditioning = encode_prompt(clip, text, ib, concept)
    sampling = model.get_model_object("model_sampling")
    sigma_range = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
    patch = AdapterPatch(ib, patch_tokens, comfy_block_map(ib.config.adapters), beta=beta, sigma_range=sigma_range,
                         attn_mask=attn_mask, apply_to=apply_to, host_models=[patcher])
    patched = model.clone()
    patched.set_model_patch(patch, "middle_patch")
    log.info("InstantBooth: %d reference(s), %d patch tokens, beta %.2f, alpha %.2f", crops.shape[0], patch_tokens.shape[0], beta, alpha)
    return patched, conditioning, crops


class InstantBoothApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceBoothInstantBoothApply",
            display_name="Apply InstantBooth",
            category=CATEGORY,
            description="InstantBooth without test-time finetuning: the reference photos become a concept token at the "
            "identifier ('sks person') and rich patch features that gated adapters in every transformer block attend to. "
            "Use the MODEL and the positive CONDITIONING in any sampler; encode the negative prompt as usual.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x model to patch (the adapters follow its transformer blocks)."),
                io.Clip.Input("clip", tooltip="The model's CLIP text encoder; encodes the positive prompt."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the InstantBooth file was trained with (ViT-L/14 for the paper's setup)."),
                InstantBoothType.Input("instantbooth", tooltip="From Load InstantBooth."),
                io.String.Input("text", multiline=True, default="a photo of sks person",
                                tooltip="Positive prompt. The identifier ('sks' unless the file says otherwise) goes right before the class "
                                "noun; if missing it is put before the first of person/man/woman/boy/girl/..."),
                io.Float.Input("beta", default=0.3, min=0.0, max=2.0, step=0.01,
                               tooltip="Adapter weight β: identity detail vs prompt following. Paper: 0.3 (1 in training). 0 leaves the model unchanged."),
                io.Float.Input("alpha", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Concept-token renormalisation α: scales the concept vector so it does not dominate cross-attention. Paper: 0.4."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Adapters act from this fraction of the sampling on."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Adapters stop after this fraction of the sampling."),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="both",
                               tooltip="'both': the adapters are part of the model in the conditional and unconditional passes, so CFG steers "
                               "only the text (the paper's model has no image-free branch). 'cond only': only the conditional pass; "
                               "CFG then amplifies the identity as well."),
                io.Image.Input("reference", optional=True, tooltip="Reference photos of the subject (a batch = several references, any number)."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="Subject mask for the reference photos (one, or one per photo): the subject is cropped and its background blacked out."),
                Faces.Input("faces", optional=True, tooltip="Faces from Detect Faces: their aligned crops with the face masks become references."),
                io.Mask.Input("attn_mask", optional=True, tooltip="Where in the generated image the adapters act (white = on)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the InstantBooth adapters."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt with the concept token in place of the identifier."),
                io.Image.Output(display_name="references", tooltip="The masked reference crops the encoders saw."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, clip_vision, instantbooth, text: str, beta: float, alpha: float, start_at: float,
                end_at: float, apply_to: str, reference=None, reference_mask=None, faces=None, attn_mask=None) -> io.NodeOutput:
        check_prompt_embeddings(clip, text, "Apply InstantBooth")
        if faces is not None and not faces.faces and faces.no_face_policy == "pass_through":
            if reference is None:  # Detect Faces' promise: downstream nodes leave their input unchanged
                note = ("InstantBooth passed through: Detect Faces found no face (policy 'pass through'); the MODEL is "
                        "unchanged and the prompt is encoded as plain text.")
                log.warning(note)
                plain = clip.encode_from_tokens_scheduled(clip.tokenize(text))
                return io.NodeOutput(model, plain, placeholder_image(), ui=ui.PreviewText(note))
            faces = None  # no face found, but reference photos are connected: use those
        patched, conditioning, crops = apply_instantbooth(
            model, clip, clip_vision, instantbooth, text, beta=beta, alpha=alpha, start_at=start_at, end_at=end_at,
            apply_to=apply_to, reference=reference, reference_mask=reference_mask, faces=faces, attn_mask=attn_mask,
        )
        return io.NodeOutput(patched, conditioning, crops)


NODES = [InstantBoothLoader, InstantBoothApply]
