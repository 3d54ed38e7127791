"""What the example runner fills into the workflows' placeholders (syntax: runner/placeholders.py).

==================  =====================================================================================
``CHECKPOINT``      checkpoint file name as ComfyUI lists it (the random SD1.5 one, or ``--checkpoint``)
``FACE_IMAGE``      uploaded input face, a name for ``LoadImage`` (``--face``; a drawn face by default)
``FACE_IMAGE_2``    second face for multi-subject workflows (second ``--face``; a second drawn face)
``SEED``            integer seed (``--seed``, default 0)
``WORKFLOW``        the workflow's name (file stem without ``_api``), handy in ``filename_prefix``
``ARCFACE``         ArcFace backbone in ``models/facebooth/face`` (the random r18 written for the run)
``INSIGHTFACE_PACK`` insightface pack name (``antelopev2``, random weights written for the run)
``F2D_MSID``        Face2Diffusion MSID file in ``models/facebooth/face2diffusion`` (random, official layout)
``F2D_MAPPING``     Face2Diffusion mapping file (random, official layout)
``INSTANTBOOTH_MODEL`` InstantBooth heads + adapters in ``models/facebooth/instantbooth`` (random)
``CLIP_VISION``     CLIP ViT-L/14 image encoder in ``models/clip_vision`` (random, ComfyUI's layout)
``FASTCOMPOSER``    FastComposer-layout ``pytorch_model.bin`` in ``models/facebooth/portraitbooth`` (random)
``PORTRAITBOOTH_STEA`` PortraitBooth STEA safetensors in ``models/facebooth/portraitbooth`` (random)
``SDXL_CHECKPOINT`` an SDXL-family checkpoint (the random KOALA-like one, or ``--set SDXL_CHECKPOINT=NAME``)
==================  =====================================================================================

With the random test checkpoint the runner also fills the test-size knobs of ``TEST_SIZE_VALUES`` (64 px,
4 steps, Cross Initialization preset "custom", Detect Faces "aligned crop" for the drawn faces, ...); with a
real ``--checkpoint`` the workflows' own defaults apply. A new workflow with a costly knob adds its test-size
value here.

``--set NAME=VALUE`` adds or overrides any of them (VALUE parsed as JSON when it parses, else a string).
The random models behind ``ARCFACE`` ... ``PORTRAITBOOTH_STEA`` are written by runner/demo_models.py.
"""
from __future__ import annotations

from typing import Any

# Test-size values the runner fills in when it runs the random test checkpoint: the shipped workflows keep
# real settings as their defaults (see the module docstring).
TEST_SIZE_VALUES: dict[str, Any] = {
    "WIDTH": 64, "HEIGHT": 64, "STEPS": 4,
    "PANORAMA_WIDTH": 128, "MD_WINDOW": 64, "MD_STRIDE": 32,
    "DETECT_MODE": "aligned crop",  # the drawn faces are already crops; random detectors find nothing
    "CROSS_INIT_PRESET": "custom", "TRAIN_STEPS": 4, "TRAIN_RESOLUTION": 64, "TRAIN_BATCH": 2, "TRAIN_WARMUP": 2,
    "PERSONAMAGIC_RESOLUTION": 128, "PERSONAMAGIC_BINS": 25,
    "SDXL_TRAIN_STEPS": 2, "SDXL_TRAIN_BATCH": 1,  # a CLIP-G fwd+bwd costs seconds per sample on CPU
}
