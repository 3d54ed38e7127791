"""API ⇄ UI workflow conversion keeps every node, link and widget value."""
from __future__ import annotations

from facebooth.runner.ui_workflow import api_to_ui, strip_meta, ui_to_api

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


def test_strip_meta():
    assert "_meta" not in strip_meta(API)["2"]
