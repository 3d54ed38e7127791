"""API ⇄ UI workflow conversion: every node, link and widget value, the editor's widget rules, the layout.

The editor's own behaviour is checked in a real browser by tests/browser/; these tests pin the rules the
generator follows, written out from the frontend's code (widgets/useIntWidget: an INT input gets a
"control after generate" widget when ``control_after_generate`` says so, and by default when it is named
``seed`` or ``noise_seed``).
"""
from __future__ import annotations

import json

import pytest

from facebooth.runner import examples as ex
from facebooth.runner import placeholders, substitutions, ui_twins
from facebooth.runner.ui_workflow import api_to_ui, node_rects, overlaps, strip_meta, ui_to_api

OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"], "output_name": ["MODEL", "CLIP", "VAE"],
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
        "input_order": {"required": ["text", "clip"]},
        "output": ["CONDITIONING"], "output_name": ["CONDITIONING"],
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}], "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
            "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "positive", "negative", "denoise"]},
        "output": ["LATENT"], "output_name": ["LATENT"],
    },
    "LoadImage": {
        "input": {"required": {"image": [["x.png"], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"],
    },
    "PrimitiveInt": {
        "input": {"required": {"value": ["INT", {"default": 0}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"], "output_name": ["INT"],
    },
    # Seeds as custom nodes declare them: nothing said (the frontend adds a control), explicitly off, and an
    # INT with another name that asks for one.
    "Trainer": {
        "input": {"required": {
            "seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 10}],
            "noise_seed": ["INT", {"default": 0, "control_after_generate": False}],
            "variation": ["INT", {"default": 0, "control_after_generate": True}], "mode": [["a", "b"], {}]}},
        "input_order": {"required": ["seed", "steps", "noise_seed", "variation", "mode"]},
        "output": ["STRING"], "output_name": ["STRING"],
    },
}

API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}, "_meta": {"title": "Positive"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "PrimitiveInt", "inputs": {"value": 7}},
    "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": ["4", 0], "steps": 4, "positive": ["2", 0], "negative": ["3", 0], "denoise": 0.5}},
    "6": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
}


def test_round_trip_keeps_everything():
    ui = api_to_ui(API, OBJECT_INFO)
    assert len(ui["nodes"]) == 6 and len(ui["links"]) == 6
    assert ui_to_api(ui, OBJECT_INFO) == API


def test_widget_values_include_editor_extras_and_layout_flows_left_to_right():
    ui = api_to_ui(API, OBJECT_INFO)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[5]["widgets_values"] == [0, "fixed", 4, 0.5]  # linked seed keeps its default + control value
    assert nodes[6]["widgets_values"] == ["x.png", "image"]
    assert nodes[1]["pos"][0] < nodes[2]["pos"][0] < nodes[5]["pos"][0]
    assert nodes[1]["outputs"][1]["links"] and len(nodes[1]["outputs"][1]["links"]) == 2
    assert nodes[2]["title"] == "Positive"


def test_seed_control_follows_the_frontend_default():
    """``seed`` without a flag gets a control (the frontend's legacy default); False removes it; True adds one."""
    api = {"1": {"class_type": "Trainer", "inputs": {"seed": 3, "steps": 5, "noise_seed": 9, "variation": 2, "mode": "b"}}}
    (node,) = api_to_ui(api, OBJECT_INFO)["nodes"]
    assert node["widgets_values"] == [3, "fixed", 5, 9, 2, "fixed", "b"]
    assert ui_to_api({"nodes": [node], "links": []}, OBJECT_INFO)["1"]["inputs"] == api["1"]["inputs"]


def test_layout_groups_note_and_no_overlaps():
    layout = {"title": "T", "note": "What it does.\n\nDownload:\n- a file", "groups": [
        {"title": "1. Load", "nodes": ["1", "4", "6"]}, {"title": "2. Prompt", "nodes": ["2", "3"]},
        {"title": "3. Sample", "nodes": ["5"]}]}
    ui = api_to_ui(API, OBJECT_INFO, layout)
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and notes[0]["widgets_values"] == [layout["note"]]
    assert not overlaps(node_rects(ui))
    groups = {g["title"]: g["bounding"] for g in ui["groups"]}
    assert list(groups) == ["1. Load", "2. Prompt", "3. Sample"]
    assert groups["1. Load"][0] < groups["2. Prompt"][0] < groups["3. Sample"][0]  # stages left to right
    rects = node_rects(ui)
    for g in layout["groups"]:
        gx, gy, gw, gh = groups[g["title"]]
        for nid in g["nodes"]:
            x, y, w, h = rects[int(nid)]
            assert gx <= x and x + w <= gx + gw and gy < y and y + h <= gy + gh, (g["title"], nid)
    assert notes[0]["pos"][0] + notes[0]["size"][0] <= min(b[0] for b in groups.values())
    assert ui_to_api(ui, OBJECT_INFO) == API  # the Note is not queued


def test_layout_uses_measured_sizes_and_rejects_unknown_nodes():
    big = {1: [900, 700], 2: [500, 300]}
    ui = api_to_ui(API, OBJECT_INFO, {"groups": [{"title": "A", "nodes": ["1", "2"]}]}, sizes=big)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[1]["size"][0] == 900 and nodes[1]["size"][1] == 700
    assert not overlaps(node_rects(ui))
    with pytest.raises(ValueError, match="99"):
        api_to_ui(API, OBJECT_INFO, {"groups": [{"title": "A", "nodes": ["99"]}]})


def test_overlap_detection():
    assert overlaps({1: (0, 0, 10, 10), 2: (5, 5, 10, 10), 3: (10, 0, 5, 5)}) == [(1, 2, 25)]


def test_model_download_metadata_for_files_with_a_url():
    models = {"b.safetensors": {"url": "https://example.org/b.safetensors", "directory": "checkpoints"}}
    ui = api_to_ui(API, OBJECT_INFO, models=models)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert nodes[1]["properties"]["models"] == [{"name": "b.safetensors", "url": "https://example.org/b.safetensors",
                                                 "directory": "checkpoints"}]
    assert "models" not in nodes[6]["properties"]


def test_strip_meta():
    assert "_meta" not in strip_meta(API)["2"]


# ---------------------------------------------------------------------------------------- the shipped examples


def test_only_ui_workflows_at_the_top_level_each_with_a_thumbnail():
    """ComfyUI's template browser lists every *.json directly in example_workflows/: those must be UI files."""
    top = sorted(p for p in ex.EXAMPLES_DIR.glob("*.json"))
    expected = sorted(ui_twins.ui_twin_path(p) for p in ex.list_workflows())
    assert top == expected, "regenerate: python -m facebooth examples --write-ui --no-run"
    for path in top:
        data = json.loads(path.read_text())
        assert "nodes" in data and "links" in data, f"{path.name} is not a UI workflow"
        assert "_api" not in path.stem and not path.stem.islower(), f"{path.name}: the card name should read as a title"
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"
    assert (ex.PACK_DIR / "example_workflows").resolve() == ex.EXAMPLES_DIR.resolve()


TEST_SIZES = {"WIDTH": 64, "HEIGHT": 64, "STEPS": 4, "TRAIN_STEPS": 4, "TRAIN_RESOLUTION": 64}


@pytest.mark.parametrize("api_path", ex.list_workflows(), ids=ex.workflow_name)
def test_shipped_settings_are_real_and_test_sizes_come_from_placeholders(api_path):
    api = ex.load_workflow(api_path)
    editor = placeholders.substitute(api, ui_twins.editor_values(api, "x"))
    for nid, node in editor.items():
        ins = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            assert ins["width"] >= 512 and ins["height"] >= 512, nid
        if node["class_type"] == "KSampler":
            assert 20 <= ins["steps"] <= 30, nid
        if node["class_type"] == "FaceBoothCrossInitialization":
            native = 1024 if ex.workflow_name(api_path).endswith("_sdxl") else 512  # SDXL trains at 1024 px
            assert ins["preset"] == "fast" and ins["resolution"] == native
        if node["class_type"] == "FaceBoothDetectFaces" and ex.workflow_name(api_path) != "face_aligned_insightface":
            assert ins["mode"] == "detect", nid
    # The runner's test values reach the same inputs (so CI runs stay small).
    small = placeholders.substitute(api, {**ui_twins.editor_values(api, "x"), **substitutions.TEST_SIZE_VALUES})
    for node in small.values():
        if node["class_type"] == "EmptyLatentImage":
            assert node["inputs"]["height"] == 64
        if node["class_type"] == "KSampler":
            assert node["inputs"]["steps"] == 4
    names = placeholders.find_placeholders(api)
    defaults = placeholders.placeholder_defaults(api)
    if any(n["class_type"] == "KSampler" for n in api.values()):
        assert {"PROMPT", "SEED"} <= set(defaults), "examples take $PROMPT and $SEED with their own defaults"
    if "FACE_IMAGE" in names:
        assert "FACE_IMAGE" in defaults
