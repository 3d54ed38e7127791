"""The example workflows in the real ComfyUI web editor (headless Debian Chromium driven by playwright).

Each UI workflow is dropped on the canvas as an artist drags the file in. The editor then applies its own
widget rules and sizes the nodes; these tests read the result back from the page:

* every node type is known and no page error is raised;
* every widget holds the value the API twin gives that input (by name, so a widget list shifted by a missing or
  extra "control after generate" slot fails), and the positional values equal the file's ``widgets_values``;
* no two nodes' rectangles overlap as the editor sized them;
* the prompt the editor would queue (its own ``graphToPrompt``) equals the API twin with the same placeholder
  values (the runner's substitution, not our UI converter);
* one cheap workflow queued from the editor finishes in ComfyUI;
* the template browser lists exactly the UI workflows, each with a thumbnail that is a picture of a graph.

Screenshots go to ``$FACEBOOTH_ARTIFACTS`` (or a pytest temp folder, printed in the report).
"""
from __future__ import annotations

import io
import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from facebooth.runner import examples as ex
from facebooth.runner import ui_twins
from facebooth.runner.ui_workflow import overlaps
from helpers.declared_defaults import drop_declared_defaults

WORKFLOWS = ex.list_workflows()
CHEAP = ex.API_DIR / "basic_txt2img_api.json"


def _browser_or_skip() -> None:
    from facebooth.runner.browser import BrowserUnavailableError, chromium_path

    try:
        chromium_path()
        import playwright.sync_api  # noqa: F401
    except (BrowserUnavailableError, ImportError) as exc:
        if os.environ.get("FACEBOOTH_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests required here but unavailable: {exc}")
        pytest.skip(f"browser tests need Debian's chromium and the playwright package: {exc}")


def _timing(artifacts: Path, line: str) -> None:
    print(line)
    with open(artifacts / "timings.txt", "a") as f:
        f.write(line + "\n")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("FACEBOOTH_ARTIFACTS") or tmp_path_factory.mktemp("browser-artifacts"))
    folder = folder / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser test screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def editor(comfy_server, artifacts):
    _browser_or_skip()
    from facebooth.runner.browser import EditorSession

    start = time.monotonic()
    with EditorSession(comfy_server.url) as session:
        _timing(artifacts, f"editor open in {time.monotonic() - start:.1f} s")
        yield session


def loaded_object_info(got: dict) -> dict:
    return got["object_info"]


@pytest.fixture(scope="module")
def loaded(editor, artifacts, comfy_server) -> dict[str, dict]:
    """Every UI workflow dropped on the canvas once: what the editor made of it."""
    object_info = comfy_server.client.object_info()
    results = {}
    start = time.monotonic()
    for api_path in WORKFLOWS:
        twin = ui_twins.ui_twin_path(api_path)
        if not twin.is_file():  # fails that workflow's tests, not the others'
            results[ex.workflow_name(api_path)] = {"missing": f"{twin.name} is missing: python -m facebooth "
                                                              "examples --write-ui --no-run"}
            continue
        ui = json.loads(twin.read_text())
        editor.clear_errors()
        state = editor.drop_workflow(ui, twin.name)
        editor.page.keyboard.press("Escape")  # the missing-models dialog (this server has none of the real files)
        results[ex.workflow_name(api_path)] = {
            "object_info": object_info, "ui": ui, "state": state, "prompt": editor.graph_to_prompt(), "errors": list(editor.errors),
            "screenshot": editor.screenshot(artifacts / f"{twin.stem}.png"),
        }
    _timing(artifacts, f"{len(WORKFLOWS)} workflows dropped and read back in {time.monotonic() - start:.1f} s")
    summary = {k: {"errors": v.get("errors"), "nodes": v.get("state")} for k, v in results.items()}  # noqa
    (artifacts / "loaded.json").write_text(json.dumps(summary, indent=1, default=str))
    return results


def _ids(path: Path) -> str:
    return ex.workflow_name(path)


def _got(loaded: dict, api_path: Path) -> dict:
    got = loaded[ex.workflow_name(api_path)]
    assert "missing" not in got, got.get("missing")
    return got


@pytest.mark.parametrize("api_path", WORKFLOWS, ids=_ids)
def test_every_node_type_is_known_and_nothing_throws(loaded, api_path):
    got = _got(loaded, api_path)
    missing = [(n["id"], n["type"]) for n in got["state"] if not n["registered"] or n["has_errors"]]
    assert not missing, f"node types the editor does not know: {missing}"
    thrown = [e for e in got["errors"] if e.startswith("pageerror")]
    ours = [e for e in got["errors"] if "FaceBooth" in e]
    assert not thrown and not ours, "\n".join(thrown + ours)


@pytest.mark.parametrize("api_path", WORKFLOWS, ids=_ids)
def test_widget_values_equal_the_workflow_after_the_editors_widget_handling(loaded, api_path):
    got = _got(loaded, api_path)
    by_id = {n["id"]: n for n in got["state"]}
    # Positional: the editor kept each stored value (nothing reset or clamped).
    for node in got["ui"]["nodes"]:
        values = [v for _, v in by_id[node["id"]]["widgets"]]
        assert values == node["widgets_values"], (node["id"], node["type"], by_id[node["id"]]["widgets"])
    # By name: each widget holds what the API twin says for that input; seed controls stay "fixed".
    expected = ui_twins.expected_ui_api(api_path)
    for nid, node in expected.items():
        widgets = dict(by_id[int(nid)]["widgets"])
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                continue  # a link
            assert name in widgets, f"node {nid} ({node['class_type']}) has no widget {name}: {sorted(widgets)}"
            assert widgets[name] == value, f"node {nid} ({node['class_type']}) {name}: editor {widgets[name]!r}, file {value!r}"
        if "control_after_generate" in widgets:
            assert widgets["control_after_generate"] == "fixed", nid


@pytest.mark.parametrize("api_path", WORKFLOWS, ids=_ids)
def test_no_two_nodes_overlap_as_the_editor_sized_them(loaded, api_path):
    got = _got(loaded, api_path)
    clashes = overlaps({(n["id"], n["title"]): n["rect"] for n in got["state"]})
    assert not clashes, f"overlapping nodes (a, b, area px²): {clashes}; screenshot {got['screenshot']}"


@pytest.mark.parametrize("api_path", WORKFLOWS, ids=_ids)
def test_the_graph_the_editor_queues_equals_the_api_twin(loaded, api_path):
    got = _got(loaded, api_path)
    expected = ui_twins.expected_ui_api(api_path)
    queued = drop_declared_defaults(got["prompt"], expected, loaded_object_info(got))
    assert queued == expected


def test_a_workflow_queued_from_the_editor_finishes(editor, comfy_server, random_checkpoint_name, artifacts):
    """The cheap example, switched to the random checkpoint at test size in the editor's widgets, then Queue."""
    from facebooth.runner.browser import wait_for_history

    twin = ui_twins.ui_twin_path(CHEAP)
    state = editor.drop_workflow(json.loads(twin.read_text()), twin.name)
    # The checkpoint is not on this server: the editor offers the download from properties.models.
    dialog = editor.page.locator(".p-dialog", has_text="Missing Models").first
    dialog.get_by_text("v1-5-pruned-emaonly.safetensors").first.wait_for(timeout=30000)
    assert dialog.get_by_text("Download").count() > 0
    editor.screenshot(artifacts / "missing_models_dialog.png")
    editor.page.keyboard.press("Escape")
    by_type = {n["type"]: n["id"] for n in state}
    editor.set_widget(by_type["CheckpointLoaderSimple"], "ckpt_name", random_checkpoint_name)
    for name in ("width", "height"):
        editor.set_widget(by_type["EmptyLatentImage"], name, 64)
    editor.set_widget(by_type["KSampler"], "steps", 4)
    known = set(comfy_server.client.get_json("/history"))
    editor.clear_errors()
    editor.queue()
    prompt_id, entry = wait_for_history(comfy_server.url, known, timeout=300)
    editor.page.wait_for_timeout(1000)
    editor.screenshot(artifacts / "queued_from_editor.png")
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and images[0]["filename"].startswith(ex.workflow_name(CHEAP))
    assert not [e for e in editor.errors if e.startswith("pageerror")], editor.errors


def _get(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read(), r.headers.get("Content-Type", "")


def test_template_browser_lists_only_ui_workflows_with_thumbnails(editor, comfy_server, artifacts):
    from PIL import Image

    listed, _ = _get(comfy_server.url + "/api/workflow_templates")
    ours = json.loads(listed).get("FaceBooth", [])
    titles = sorted(ui_twins.workflow_title(p) for p in WORKFLOWS)
    assert sorted(ours) == titles, "the template browser must list exactly the UI workflows"
    for title in ours:
        base = f"{comfy_server.url}/api/workflow_templates/FaceBooth/{urllib.parse.quote(title)}"
        data, _ = _get(base + ".json")
        assert "nodes" in json.loads(data), f"{title}: the card would open a non-UI file"
        data, kind = _get(base + ".jpg")
        image = Image.open(io.BytesIO(data)).convert("RGB")
        # A picture of a graph: mostly the editor's flat background, not noise.
        colors = image.getcolors(image.width * image.height)
        background = max(colors)[0] / (image.width * image.height)
        assert background > 0.3, f"{title}.jpg does not look like a screenshot ({background:.0%} background)"
    # The dialog itself, as an artist opens it: Custom Nodes -> FaceBooth.
    editor.run_command("Comfy.BrowseTemplates")
    editor.page.get_by_text("FaceBooth", exact=True).first.click()
    for title in titles:
        editor.page.get_by_text(title, exact=True).first.wait_for(timeout=30000)
    # Card pictures are our thumbnails (alt = card title); the first row must have loaded, none may be broken.
    loaded_js = """(titles) => {
      const imgs = [...document.querySelectorAll('img')].filter(i => titles.includes(i.alt) && i.src);
      const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
      return ok.length >= 3 && !imgs.some(i => i.complete && i.naturalWidth === 0);
    }"""
    editor.page.wait_for_function(loaded_js, arg=titles, timeout=30000)
    editor.screenshot(artifacts / "template_browser.png")
    editor.page.keyboard.press("Escape")
