"""Real-ComfyUI fixtures (a pytest plugin registered in tests/conftest.py): one real ComfyUI per test session, with this pack installed as users install it.

ComfyUI comes from ``$COMFYUI_DIR`` (tests skip, saying so, when it is unset). The session base directory
has ``custom_nodes/FaceBooth`` as a symlink to this repository, the random SD1.5 checkpoint and the random
face models linked into ``models/`` (generated once into ``$FACEBOOTH_TEST_CACHE`` or
``~/.cache/facebooth-test``, then reused), and two drawn faces uploaded as inputs.

Fixtures for workflow tests:

* ``comfy_server``: the running ``ComfyServer``; ``comfy_server.client`` is its ``ComfyClient``,
  ``comfy_server.log_text()`` its log.
* ``comfy_base_dir``: the ComfyUI base directory (models/, input/, output/, custom_nodes/).
* ``random_checkpoint_name``: the checkpoint's name as ComfyUI lists it.
* ``default_substitutions``: placeholder values (CHECKPOINT, FACE_IMAGE, FACE_IMAGE_2, SEED, ARCFACE, ...).
* ``run_workflow(client, api_json_path_or_dict, substitutions=None, timeout=600) -> list[PIL.Image]``:
  fills placeholders (defaults above, then ``substitutions``), queues, waits, and returns the output images.
  Node errors raise ``WorkflowRejectedError`` / ``WorkflowFailedError`` with ComfyUI's message.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import pytest

from facebooth.runner import examples as ex
from facebooth.runner import local_setup, run
from facebooth.runner.server import ComfyServer, ComfyUINotFoundError, check_comfyui_dir


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("integration tests need a real ComfyUI: set COMFYUI_DIR to a ComfyUI source tree (e.g. ~/ComfyUI)")
    try:
        return check_comfyui_dir(value)
    except ComfyUINotFoundError as exc:
        pytest.fail(f"COMFYUI_DIR is set but unusable: {exc}")


@pytest.fixture(scope="session")
def facebooth_cache_dir() -> Path:
    path = Path(os.environ.get("FACEBOOTH_TEST_CACHE") or Path.home() / ".cache" / "facebooth-test").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def comfy_setup(comfyui_dir, facebooth_cache_dir, tmp_path_factory) -> local_setup.LocalSetup:
    base = tmp_path_factory.mktemp("comfy-base")
    return local_setup.prepare_base_dir(base, cache_dir=facebooth_cache_dir, comfyui_dir=comfyui_dir)


@pytest.fixture(scope="session")
def comfy_base_dir(comfy_setup) -> Path:
    return comfy_setup.base_dir


@pytest.fixture(scope="session")
def random_checkpoint_name(comfy_setup) -> str:
    return comfy_setup.checkpoint_name


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfy_base_dir):
    server = ComfyServer(comfyui_dir, comfy_base_dir, startup_timeout=300)
    server.start()
    try:
        yield server
    finally:
        server.client.close()
        server.stop()


@pytest.fixture(scope="session")
def default_substitutions(comfy_server, comfy_setup) -> dict[str, Any]:
    faces = run.upload_faces(comfy_server.client, None)
    return {**comfy_setup.substitutions, "SEED": 0, **faces}


@pytest.fixture(scope="session")
def run_workflow(default_substitutions):
    def _run(client, workflow: Mapping | str | os.PathLike, substitutions: Mapping[str, Any] | None = None,
             timeout: float = 600.0):
        values = dict(default_substitutions)
        values["WORKFLOW"] = "test" if isinstance(workflow, Mapping) else ex.workflow_name(workflow)
        values.update(substitutions or {})
        return run.to_pil(run.run_workflow(client, workflow, values, timeout=timeout))

    return _run
