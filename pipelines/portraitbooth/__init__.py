"""PortraitBooth (Peng et al., CVPR 2024) on FastComposer's published weights.

STEA fuses identity features into the subject word's text output (``stea``), FastComposer's checkpoint
loads through ``fastcomposer_loading``, subject words are located in host-tokenized prompts by
``token_positions``, and the training losses (masked noise, DIP identity, ECAC localization) are in
``losses``. Host-independent torch; ComfyUI adapters live in ``nodes/portraitbooth.py``.
"""
from .stea import (
    ARCFACE_LAYERS,
    DEFAULT_ARCFACE_LAYERS,
    STEAConfig,
    STEAError,
    STEAFuse,
    STEAModel,
    SubjectFeatures,
    arcface_features,
    clip_image_features,
    clip_image_input,
    fuse_subject_rows,
)
from .token_positions import SubjectMatch, SubjectWordError, find_subject_positions, parse_subject_words

__all__ = [
    "ARCFACE_LAYERS",
    "DEFAULT_ARCFACE_LAYERS",
    "STEAConfig",
    "STEAError",
    "STEAFuse",
    "STEAModel",
    "SubjectFeatures",
    "SubjectMatch",
    "SubjectWordError",
    "arcface_features",
    "clip_image_features",
    "clip_image_input",
    "find_subject_positions",
    "fuse_subject_rows",
    "parse_subject_words",
]
