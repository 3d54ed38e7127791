"""The example workflows: where they live, how they are named, listed and loaded.

A workflow is registered by putting ``<name>_api.json`` (API format) with ``<name>.layout.json`` into
``examples_workflows/api/``; ``list_workflows`` finds it there. The rest of the runner is split by job:

* runner/placeholders.py: the ``$NAME`` / ``${NAME:-DEFAULT}`` syntax and filling it in;
* runner/substitutions.py: the names the runner provides and the test-size values (``TEST_SIZE_VALUES``);
* runner/demo_models.py: the random checkpoints and face models, cached;
* runner/local_setup.py: a temporary ComfyUI base dir with the pack and those models linked in;
* runner/run.py: queueing a workflow on a server and reading its images; runner/drawn_face.py: the input face;
* runner/ui_twins.py: the editor copies (UI twins) and their thumbnails.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Iterable

PACK_DIR = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = PACK_DIR / "examples_workflows"  # UI workflows + thumbnails: what the template browser lists
API_DIR = EXAMPLES_DIR / "api"  # API-format twins and their layout files (a subfolder the browser skips)
API_SUFFIX = "_api.json"
LAYOUT_SUFFIX = ".layout.json"


def workflow_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    return name[: -len(API_SUFFIX)] if name.endswith(API_SUFFIX) else Path(name).stem


def list_workflows(folder: str | os.PathLike = API_DIR, only: Iterable[str] | None = None) -> list[Path]:
    """The API-format workflows in ``folder``, sorted; ``only`` keeps those whose name matches a glob."""
    paths = sorted(Path(folder).glob("*" + API_SUFFIX))
    patterns = list(only or [])
    if patterns:
        paths = [p for p in paths if any(fnmatch.fnmatch(workflow_name(p), pat) or fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    return paths


def load_workflow(path: str | os.PathLike) -> dict:
    """Read an API-format workflow; a UI-format file gets a message that says which file to use."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"{path} is a UI-format workflow; the runner needs the API-format twin (*{API_SUFFIX}).")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path} is not an API-format workflow (a map of node id -> {{class_type, inputs}}).")
    return data

