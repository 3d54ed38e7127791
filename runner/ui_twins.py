"""Regenerate the UI workflows (the templates artists open) and their thumbnails from the API examples.

For each ``examples_workflows/api/<name>_api.json`` (with ``<name>.layout.json``):

1. build the UI twin from the live /object_info with estimated node sizes (runner/ui_workflow.py);
2. drop it into the real editor in headless Chromium and read the size the frontend gives each node;
3. lay the graph out again with those sizes and write ``examples_workflows/<title>.json``;
4. drop the final file in again, check that no two nodes overlap, and save ``<title>.jpg`` (the graph as the
   editor draws it) for the template browser.

Without a browser (``browser=False``) only step 1 runs and no thumbnail is written.
Entry point: ``python -m facebooth examples --write-ui --no-run [--only NAME]`` (see docs/workflows.md).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..utils.files import atomic_write
from .examples import LAYOUT_SUFFIX, PACK_DIR, load_workflow, workflow_name
from .placeholders import find_placeholders, placeholder_defaults, substitute
from .ui_workflow import api_to_ui, load_layout, overlaps, strip_meta

log = logging.getLogger(__name__)

# Values used when a UI twin is generated for the editor: the model files users download (names as the
# weights manifest has them). Everything else in the editor copy comes from the placeholders' defaults.
EDITOR_DEFAULTS: dict[str, Any] = {
    "CHECKPOINT": "v1-5-pruned-emaonly.safetensors",
    "ARCFACE": "arcface_ms1mv3_r100.pth",
    "INSIGHTFACE_PACK": "antelopev2",
    "F2D_MSID": "msid.pt",
    "F2D_MAPPING": "mapping.pt",
    "INSTANTBOOTH_MODEL": "instantbooth_sd15.safetensors",
    "CLIP_VISION": "clip-vit-large-patch14.safetensors",
    "FASTCOMPOSER": "fastcomposer/pytorch_model.bin",
    "PORTRAITBOOTH_STEA": "portraitbooth_stea.safetensors",
    "SDXL_CHECKPOINT": "sd_xl_base_1.0.safetensors",
}


def layout_path(api_path: str | os.PathLike) -> Path:
    api_path = Path(api_path)
    return api_path.with_name(workflow_name(api_path) + LAYOUT_SUFFIX)


def workflow_title(api_path: str | os.PathLike) -> str:
    """The card title in the template browser: the layout's ``title``, else the name."""
    title = load_layout(layout_path(api_path)).get("title") or workflow_name(api_path)
    if any(c in title for c in '/\\?#%*:"<>|'):
        raise ValueError(f"title {title!r} of {Path(api_path).name} cannot be a file name (no /\\?#%*:\"<>|)")
    return title


def ui_twin_path(api_path: str | os.PathLike, examples_dir: str | os.PathLike | None = None) -> Path:
    """``examples_workflows/<title>.json``: the UI twin of ``api/<name>_api.json`` (its thumbnail: ``.jpg``)."""
    api_path = Path(api_path)
    folder = Path(examples_dir) if examples_dir else api_path.parent.parent
    return folder / (workflow_title(api_path) + ".json")


def editor_values(workflow: Mapping, name: str) -> dict[str, Any]:
    """Placeholder values for the editor copy: the defaults, model file names; unknown ones stay visible."""
    values: dict[str, Any] = {n: "$" + n for n in find_placeholders(workflow)}
    values.update(placeholder_defaults(workflow))
    values.update(EDITOR_DEFAULTS)
    values["WORKFLOW"] = name
    return values


def expected_ui_api(api_path: str | os.PathLike) -> dict:
    """What the editor should queue from the UI twin: the API workflow with editor values, no ``_meta``."""
    api = load_workflow(api_path)
    name = workflow_name(api_path)
    return strip_meta(substitute(api, editor_values(api, name), name=name))


def downloadable_models(manifest: str | os.PathLike = PACK_DIR / "weights_manifest.json") -> dict[str, dict]:
    """File name (as a loader's list shows it) -> {"url", "directory"} for manifest entries with a direct URL.

    The editor's missing-models dialog offers these (node ``properties.models``). Archives are left out:
    the dialog downloads one file, it does not unpack.
    """
    data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    found: dict[str, dict] = {}
    for method in data.get("methods", {}).values():
        for entry in method.get("entries", []):
            url, folder, name = entry.get("url"), entry.get("folder"), entry.get("filename")
            if not url or not folder or not name or entry.get("archive"):
                continue
            # An entry in a subfolder keeps it in the name: the loader lists "sub/file.bin".
            if entry.get("subfolder"):
                name = f"{entry['subfolder']}/{name}"
            found.setdefault(name, {"url": url, "directory": folder})
    return found


def _write_json(target: Path, data: dict) -> None:
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def build_ui_twin(api_path: str | os.PathLike, object_info: dict, sizes: Mapping | None = None) -> dict:
    """The UI workflow for one API example: placeholders filled with editor values, laid out (see ui_workflow)."""
    api_path = Path(api_path)
    name = workflow_name(api_path)
    api = load_workflow(api_path)
    return api_to_ui(substitute(api, editor_values(api, name), name=name), object_info,
                     load_layout(layout_path(api_path)), sizes=sizes, models=downloadable_models())


def write_ui_twin(api_path: str | os.PathLike, object_info: dict, sizes: Mapping | None = None,
                  examples_dir: str | os.PathLike | None = None) -> Path:
    """(Re)generate ``<title>.json`` for the ComfyUI editor next to ``api/`` (atomic write).

    ``sizes`` (node id -> [w, h]) are the frontend's sizes from a browser pass (runner/browser.py); without them
    the sizes are estimated. ``python -m facebooth examples --write-ui`` does both passes and the thumbnails.
    """
    target = ui_twin_path(api_path, examples_dir)
    _write_json(target, build_ui_twin(api_path, object_info, sizes))
    return target


def regenerate(url: str, object_info: dict, workflows: Iterable[str | Path], *, browser: bool = True,
               examples_dir: str | Path | None = None) -> list[Path]:
    """Write the UI twin (and, with ``browser``, its thumbnail) of each API workflow; return the twins' paths."""
    written: list[Path] = []
    session = None
    if browser:
        from .browser import EditorSession

        session = EditorSession(url).__enter__()
    try:
        for api_path in workflows:
            api_path = Path(api_path)
            target = ui_twin_path(api_path, examples_dir)
            ui = build_ui_twin(api_path, object_info)
            if session is not None:
                state = session.drop_workflow(ui, target.name)
                sizes = {n["id"]: n["min_size"] or n["size"] for n in state}
                ui = build_ui_twin(api_path, object_info, sizes)
                state = session.drop_workflow(ui, target.name)
                clashes = overlaps({n["id"]: n["rect"] for n in state})
                if clashes:
                    raise RuntimeError(f"{target.name}: nodes overlap in the editor after layout: {clashes}")
            _write_json(target, ui)
            written.append(target)
            log.info("UI twin written: %s", target)
            if session is not None:
                thumb = session.graph_thumbnail(target.with_suffix(".jpg"))
                log.info("Thumbnail written: %s", thumb)
    finally:
        if session is not None:
            session.close()
    return written
