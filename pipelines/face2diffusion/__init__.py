"""Face2Diffusion (Shiohara & Yamasaki, CVPR 2024): MSID identity encoder + expression-aware mapping networks
-> two CLIP word vectors that replace a placeholder pair ("f l") before the CLIP text encoder.

Host-independent torch; ComfyUI adapters live in ``nodes/``.
"""
from .expression import EXPRESSION_DIM, expression_dropout_mask, load_expression, prepare_expression
from .injection import (
    DEFAULT_PLACEHOLDER,
    IdentityTokens,
    PlaceholderError,
    encode_with_identities,
    find_identity_slots,
    placeholder_token_id,
    plan_chunked_injection,
    position_corrected,
    replace_identity_rows,
)
from .loading import F2DWeightsError, load_mapping, load_msid, save_mapping, save_msid
from .mapping import F2DMapping, F2DMappingConfig
from .msid import MSIDConfig, MSIDEncoder, encode_identity, preprocess_aligned

__all__ = [
    "DEFAULT_PLACEHOLDER",
    "EXPRESSION_DIM",
    "F2DMapping",
    "F2DMappingConfig",
    "F2DWeightsError",
    "IdentityTokens",
    "MSIDConfig",
    "MSIDEncoder",
    "PlaceholderError",
    "encode_identity",
    "encode_with_identities",
    "expression_dropout_mask",
    "find_identity_slots",
    "load_expression",
    "load_mapping",
    "load_msid",
    "placeholder_token_id",
    "plan_chunked_injection",
    "position_corrected",
    "prepare_expression",
    "preprocess_aligned",
    "replace_identity_rows",
    "save_mapping",
    "save_msid",
]
