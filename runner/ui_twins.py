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
from pathlib import Path
from typing import Iterable

from . import examples as ex
from .ui_workflow import overlaps

log = logging.getLogger(__name__)


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
            target = ex.ui_twin_path(api_path, examples_dir)
            ui = ex.build_ui_twin(api_path, object_info)
            if session is not None:
                state = session.drop_workflow(ui, target.name)
                sizes = {n["id"]: n["min_size"] or n["size"] for n in state}
                ui = ex.build_ui_twin(api_path, object_info, sizes)
                state = session.drop_workflow(ui, target.name)
                clashes = overlaps({n["id"]: n["rect"] for n in state})
                if clashes:
                    raise RuntimeError(f"{target.name}: nodes overlap in the editor after layout: {clashes}")
            ex._atomic_write_text(target, json.dumps(ui, indent=1) + "\n")
            written.append(target)
            log.info("UI twin written: %s", target)
            if session is not None:
                thumb = session.graph_thumbnail(target.with_suffix(".jpg"))
                log.info("Thumbnail written: %s", thumb)
    finally:
        if session is not None:
            session.close()
    return written
