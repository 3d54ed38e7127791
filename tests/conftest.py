"""Shared pytest setup. Tests import the pack as ``facebooth`` (installed editable by the test command)."""
from __future__ import annotations

import os

import pytest

# The real-ComfyUI session fixtures, shared by tests/integration and tests/browser (one server per session).
pytest_plugins = ["helpers.comfy_fixtures"]

# Keep CPU tests deterministic and light on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
