"""ComfyUI imported as a library inside the test process (``$COMFYUI_DIR``), and the random SD1.5 checkpoint
loaded through ``comfy.sd.load_checkpoint_guess_config`` the way CheckpointLoaderSimple loads it: under
``torch.inference_mode()``, as ComfyUI runs every node, so the weights are inference tensors as in a server.

Tests take the session fixture ``comfy`` (tests/conftest.py) to import ComfyUI or skip, and use the helpers
here: ``from helpers import comfy_inprocess``.
"""
from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import tiny_sd as _tiny_sd

_CACHE: dict = {}


def _release() -> None:
    # Drop ComfyUI's model objects while its modules still exist (their __del__ needs them at exit).
    import gc

    _CACHE.pop("ckpt", None)
    gc.collect()


atexit.register(_release)


def comfyui_dir() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    return path if (path / "comfy" / "sd.py").is_file() else None


def import_comfy():
    """Put ComfyUI on sys.path (CPU mode, arguments not parsed) or skip the test."""
    root = comfyui_dir()
    if root is None:
        pytest.skip("in-process ComfyUI tests need COMFYUI_DIR (a ComfyUI source tree, e.g. ~/ComfyUI)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args  # parses no arguments when imported as a library

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True  # device choice happens when model_management is imported
    import comfy.model_management
    import comfy.sd

    return comfy


def tiny_sd():
    """tests/helpers/tiny_sd.py: the checkpoint's models as diffusers / transformers references."""
    return _tiny_sd


def embeddings_dir() -> Path:
    """The folder the loaded CLIP's tokenizer looks up ``embedding:NAME`` in (one per test process)."""
    if "emb" not in _CACHE:
        _CACHE["emb"] = Path(tempfile.mkdtemp(prefix="facebooth-test-embeddings-"))
    return _CACHE["emb"]


def load_checkpoint():
    """(MODEL, CLIP, VAE) of the random SD1.5 checkpoint, loaded once per test process."""
    key = "ckpt"
    if key not in _CACHE:
        import_comfy()
        import torch

        import comfy.sd

        path = tiny_sd().checkpoint_file()
        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), embedding_directory=[str(embeddings_dir())])[:3]
        _CACHE[key] = (model, clip, vae)
    return _CACHE[key]
