"""Shared pytest setup. Tests import the pack as ``facebooth`` (installed editable by the test command)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import comfy_inprocess

# The real-ComfyUI session fixtures, shared by tests/integration and tests/browser (one server per session).
pytest_plugins = ["helpers.comfy_fixtures"]

# Tests in these folders need a real ComfyUI: they are marked by where they live, not file by file.
_NEEDS_COMFYUI = tuple(Path(__file__).resolve().parent / d for d in ("integration", "browser"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(folder in item.path.parents for folder in _NEEDS_COMFYUI):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in this process (CPU, no arguments parsed), or the test is skipped without COMFYUI_DIR.

    Helpers that load models through it are in helpers/comfy_inprocess.py (``load_checkpoint``, ...).
    """
    return comfy_inprocess.import_comfy()


# Keep CPU tests deterministic and light on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
