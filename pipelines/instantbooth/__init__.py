"""InstantBooth (Shi et al., 2023): personalization without test-time finetuning, built from the paper.

- concept encoder (CLIP global feature -> FC -> one text-space vector replacing the identifier's text-encoder
  output, scaled by alpha): :mod:`.encoders`, :mod:`.prompt`;
- patch encoder (CLIP's 257 tokens per image -> FC, concatenated over the N references): :mod:`.encoders`;
- gated self-attention adapters, one per UNet transformer block, ``y += beta * tanh(gamma) * S([y, f_p])``:
  :mod:`.adapter`, as a host callable :mod:`.patch` (ComfyUI ``middle_patch``) and as diffusers hooks
  :mod:`.diffusers_hooks` (training);
- where the adapters sit in each host's UNet naming: :mod:`.layout`; files: :mod:`.files`;
- reference preprocessing (object crop, masked background, training augmentation, CLIP pixels): :mod:`.references`.
"""
from .adapter import GatedSelfAttentionAdapter, PreparedAdapter, attend, gated_delta, prepare
from .diffusers_hooks import DiffusersAdapterHooks, diffusers_layout, diffusers_transformer_blocks
from .encoders import ConceptEncoder, PatchEncoder
from .files import InstantBoothFileError, load_instantbooth, save_instantbooth
from .layout import SD15_LAYOUT, LayoutError, check_coverage, comfy_block_map, diffusers_to_ldm, parse_ldm_path, sd_unet_layout
from .model import InstantBoothConfig, InstantBoothModel
from .patch import APPLY_TO, AdapterPatch
from .prompt import DEFAULT_IDENTIFIER, PERSON_NOUNS, IdentifierError, identifier_rows, inject_concept, insert_identifier
from .references import (
    AugmentConfig,
    ReferenceError,
    augment_reference,
    clip_preprocess,
    masked_object_crop,
    references_from_faces,
    references_from_images,
)

__all__ = [
    "APPLY_TO", "AdapterPatch", "AugmentConfig", "ConceptEncoder", "DEFAULT_IDENTIFIER", "DiffusersAdapterHooks",
    "GatedSelfAttentionAdapter", "IdentifierError", "InstantBoothConfig", "InstantBoothFileError", "InstantBoothModel",
    "LayoutError", "PERSON_NOUNS", "PatchEncoder", "PreparedAdapter", "ReferenceError", "SD15_LAYOUT", "attend",
    "augment_reference", "check_coverage", "clip_preprocess", "comfy_block_map", "diffusers_layout",
    "diffusers_to_ldm", "diffusers_transformer_blocks", "gated_delta", "identifier_rows", "inject_concept",
    "insert_identifier", "load_instantbooth", "masked_object_crop", "parse_ldm_path", "prepare",
    "references_from_faces", "references_from_images", "save_instantbooth", "sd_unet_layout",
]
