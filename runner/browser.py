"""Drive the real ComfyUI web editor in headless Chromium (the system's Debian ``chromium``).

Used by the browser tests (tests/browser/) and by ``python -m facebooth examples --write-ui``, which measures
the frontend's own node sizes for the layout and takes the template thumbnails. Playwright's Python package
drives the browser; it is pointed at ``/usr/bin/chromium`` (``$FACEBOOTH_CHROMIUM``), never at a browser
that ``playwright install`` downloads.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)
# Editor settings for a quiet, reproducible page: no first-run template dialog, no minimap over the graph.
EDITOR_SETTINGS = {
    "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
    # Thumbnails are zoomed out: keep drawing titles and widgets instead of the low-quality boxes.
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}
THUMBNAIL_SIZE = (800, 450)


class BrowserUnavailableError(RuntimeError):
    """No Chromium or no playwright package: the message says what to install."""


def chromium_path() -> str:
    path = os.environ.get("FACEBOOTH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        raise BrowserUnavailableError(
            f"No Chromium at {path}. Install Debian's browser (apt-get install -y chromium; ./dev does it) "
            "or point FACEBOOTH_CHROMIUM at one."
        )
    return path


def _post_json(url: str, payload: Mapping) -> None:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


# Reads the graph the way the editor holds it (after its own widget handling and sizing).
_GRAPH_STATE_JS = """() => {
  const g = window.app.graph;
  window.app.canvas.draw(true, true);
  return g._nodes.map(n => ({
    id: n.id, type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    rect: Array.from(n.boundingRect || [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
    min_size: n.computeSize ? Array.from(n.computeSize()) : null,
    registered: !!window.LiteGraph.registered_node_types[n.type],
    has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => [w.name, w.value === undefined ? null : w.value]),
  }));
}"""

_DROP_JS = """async ([text, name]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  const canvas = document.querySelector('#graph-canvas') || document.querySelector('canvas');
  for (const type of ['dragenter', 'dragover', 'drop']) {
    canvas.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
  }
}"""

_FIT_JS = """() => {
  const c = window.app.canvas, g = window.app.graph;
  const w = c.canvas.clientWidth, h = c.canvas.clientHeight;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const grow = r => { x0 = Math.min(x0, r[0]); y0 = Math.min(y0, r[1]); x1 = Math.max(x1, r[0] + r[2]); y1 = Math.max(y1, r[1] + r[3]); };
  for (const n of g._nodes) grow(n.boundingRect);
  for (const gr of (g._groups || [])) grow(gr._bounding || gr.bounding);
  const pad = 30, scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0), 1.0);
  c.ds.scale = scale;
  c.ds.offset[0] = (w / scale - (x1 - x0)) / 2 - x0;
  c.ds.offset[1] = (h / scale - (y1 - y0)) / 2 - y0;
  c.setDirty(true, true); c.draw(true, true);
  return scale;
}"""


class EditorSession:
    """One headless Chromium page on a running ComfyUI's editor. Use as a context manager.

    ``errors``: page errors (uncaught exceptions, with their stack) and console errors since the last
    ``clear_errors()``.
    """

    def __init__(self, url: str, *, viewport: tuple[int, int] = (1600, 900), timeout: float = 180.0):
        self.url = url.rstrip("/")
        self.viewport = viewport
        self.timeout = timeout
        self.errors: list[str] = []
        self._pw = self._browser = self.page = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "EditorSession":
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            raise BrowserUnavailableError(
                "The playwright Python package is missing: pip install playwright (never `playwright install`: "
                "the system Chromium is used)."
            ) from exc
        executable = chromium_path()
        _post_json(self.url + "/settings", EDITOR_SETTINGS)
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_FLAGS))
            self.page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}\n{getattr(e, 'stack', '') or ''}"))
            self.page.on("console", lambda m: self.errors.append(f"console.error: {m.text}") if m.type == "error" else None)
            self.page.goto(self.url, timeout=self.timeout * 1000)
            self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.canvas",
                                        timeout=self.timeout * 1000)
            self.page.keyboard.press("Escape")  # any dialog a first start shows
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for obj, method in ((self._browser, "close"), (self._pw, "stop")):
            if obj is not None:
                try:
                    getattr(obj, method)()
                except Exception:  # closing a dead browser: nothing left to free
                    pass
        self._browser = self._pw = self.page = None

    def clear_errors(self) -> None:
        self.errors.clear()

    # -- graph ------------------------------------------------------------------------------------

    def drop_workflow(self, ui: Mapping, filename: str = "workflow.json") -> list[dict]:
        """Drop a UI workflow on the canvas as a user drags a file in; return the graph state once loaded."""
        self.page.evaluate("() => window.app.graph.clear()")
        self.page.evaluate(_DROP_JS, [json.dumps(ui), filename])
        expected = len(ui["nodes"])
        self.page.wait_for_function(f"window.app.graph._nodes.length === {expected}", timeout=self.timeout * 1000)
        self.page.wait_for_timeout(300)  # DOM widgets (prompt boxes) settle their sizes on the next frame
        return self.graph_state()

    def graph_state(self) -> list[dict]:
        return self.page.evaluate(_GRAPH_STATE_JS)

    def groups(self) -> list[dict]:
        return self.page.evaluate("() => (window.app.graph._groups || []).map(g => ({title: g.title, "
                                  "bounding: Array.from(g._bounding || g.bounding)}))")

    def graph_to_prompt(self) -> dict:
        """The API prompt the editor would queue (its own graphToPrompt)."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def set_widget(self, node_id: int, name: str, value: Any) -> None:
        self.page.evaluate("""([id, name, value]) => {
          const n = window.app.graph.getNodeById(id); const w = n.widgets.find(w => w.name === name);
          if (!w) throw new Error(`node ${id} has no widget ${name}`);
          w.value = value; w.callback?.(value);
        }""", [node_id, name, value])

    def queue(self) -> None:
        """Press Queue: the editor converts the graph and posts it to /prompt."""
        self.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")

    def run_command(self, command_id: str) -> None:
        self.page.evaluate("async (id) => { await window.app.extensionManager.command.execute(id); }", command_id)

    # -- pictures ---------------------------------------------------------------------------------

    def screenshot(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def graph_thumbnail(self, path: str | os.PathLike, size: tuple[int, int] = THUMBNAIL_SIZE) -> Path:
        """A JPEG of the whole graph as the editor draws it, fitted into ``size`` (the template card picture)."""
        from PIL import Image

        self.page.evaluate(_FIT_JS)
        self.page.wait_for_timeout(300)
        canvas = self.page.locator("#graph-canvas")
        # Only the canvas: the sidebars, menus and toasts are hidden for the picture.
        style = self.page.add_style_tag(content=(
            "body > *:not(#vue-app), .side-tool-bar-container, .comfyui-menu, .p-toast, .graph-canvas-panel > *:not(canvas),"
            ".comfy-menu, .comfyui-body-top, .comfyui-body-left, .actionbar, .bottom-panel, .p-dialog-mask,"
            "[class*='minimap'], [class*='Minimap'], .graph-canvas-container ~ *, .splitter-overlay > *:not(.graph-canvas-panel)"
            " { visibility: hidden !important; }"))
        try:
            png = canvas.screenshot()
        finally:
            self.page.evaluate("(el) => el.remove()", style)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        image.thumbnail(size, Image.LANCZOS)
        canvas_img = Image.new("RGB", size, image.getpixel((0, 0)))
        canvas_img.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        canvas_img.save(tmp, format="JPEG", quality=85)
        os.replace(tmp, path)
        return path


def wait_for_history(url: str, known: set[str], timeout: float = 300.0) -> tuple[str, dict]:
    """Wait until a prompt not in ``known`` is finished in /history; return (prompt id, entry)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url.rstrip("/") + "/history", timeout=30) as r:
            history = json.loads(r.read())
        for pid, entry in history.items():
            if pid not in known and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return pid, entry
        time.sleep(1.0)
    raise TimeoutError(f"no new prompt finished within {timeout:.0f} s")
