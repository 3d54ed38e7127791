"""The example workflows without a ComfyUI: placeholders, listing and loading, and the local base dir."""
from __future__ import annotations

import pytest

from facebooth.runner import examples as ex
from facebooth.runner import local_setup, placeholders, substitutions, ui_twins
from helpers.examples_cli import REPO

BASIC = ex.API_DIR / "basic_txt2img_api.json"


def test_placeholders_are_found_and_filled_with_their_json_type():
    wf = {
        "1": {"class_type": "A", "inputs": {"seed": "$SEED", "name": "$CHECKPOINT", "prefix": "out/${WORKFLOW}_x",
                                            "link": ["2", 0], "literal": "$lower is not a placeholder"}},
        "2": {"class_type": "B", "inputs": {"items": ["$FACE_IMAGE", 3]}},
    }
    assert placeholders.find_placeholders(wf) == {"SEED", "CHECKPOINT", "WORKFLOW", "FACE_IMAGE"}
    out = placeholders.substitute(wf, {"SEED": 7, "CHECKPOINT": "m.safetensors", "WORKFLOW": "w", "FACE_IMAGE": "f.png"})
    assert out["1"]["inputs"] == {"seed": 7, "name": "m.safetensors", "prefix": "out/w_x", "link": ["2", 0],
                                  "literal": "$lower is not a placeholder"}
    assert out["2"]["inputs"]["items"] == ["f.png", 3]
    assert wf["1"]["inputs"]["seed"] == "$SEED"  # the original is untouched


def test_missing_placeholder_names_it_and_says_how_to_set_it():
    with pytest.raises(placeholders.PlaceholderError) as info:
        placeholders.substitute({"1": {"class_type": "A", "inputs": {"x": "$NOPE", "y": "$SEED"}}}, {"SEED": 1}, name="demo")
    assert "demo" in str(info.value) and "$NOPE" in str(info.value) and "--set NOPE=" in str(info.value)


def test_workflow_listing_and_loading(tmp_path):
    for name in ("a_one_api.json", "a_two_api.json", "b_api.json", "b.json"):
        (tmp_path / name).write_text(BASIC.read_text())
    assert [p.name for p in ex.list_workflows(tmp_path)] == ["a_one_api.json", "a_two_api.json", "b_api.json"]
    assert [ex.workflow_name(p) for p in ex.list_workflows(tmp_path, ["a_*"])] == ["a_one", "a_two"]
    assert ex.list_workflows(tmp_path, ["zzz"]) == []
    ui = tmp_path / "ui.json"
    ui.write_text('{"nodes": [], "links": []}')
    with pytest.raises(ValueError, match="UI-format"):
        ex.load_workflow(ui)
    assert ex.load_workflow(BASIC)["3"]["class_type"] == "KSampler"


def test_every_example_workflow_is_api_format_with_known_placeholders():
    """Placeholders without a default are ones the runner fills; test-size knobs all have real defaults."""
    known = set(ui_twins.EDITOR_DEFAULTS) | {"WORKFLOW"}
    for path in ex.list_workflows():
        api = ex.load_workflow(path)
        unknown = placeholders.find_placeholders(api, required_only=True) - known
        assert not unknown, f"{path.name} uses placeholders the runner does not provide: {sorted(unknown)}"
        assert placeholders.find_placeholders(api) - known <= set(placeholders.placeholder_defaults(api)), path.name
    used = set().union(*(placeholders.find_placeholders(ex.load_workflow(p)) for p in ex.list_workflows()))
    assert set(substitutions.TEST_SIZE_VALUES) <= used, "a test-size value no example uses"


def test_placeholder_defaults_fill_when_nothing_provides_the_name():
    wf = {"1": {"class_type": "A", "inputs": {
        "steps": "${STEPS:-25}", "text": "${PROMPT:-a photo, of a person}", "mode": "${MODE:-detect}",
        "prefix": "x/${NAME:-anon}_${WORKFLOW}", "w": "${WIDTH:-512}"}}}
    assert placeholders.find_placeholders(wf, required_only=True) == {"WORKFLOW"}
    assert placeholders.placeholder_defaults(wf) == {"STEPS": 25, "PROMPT": "a photo, of a person", "MODE": "detect",
                                           "NAME": "anon", "WIDTH": 512}
    out = placeholders.substitute(wf, {"WORKFLOW": "w", "WIDTH": 64})["1"]["inputs"]
    assert out == {"steps": 25, "text": "a photo, of a person", "mode": "detect", "prefix": "x/anon_w", "w": 64}
    with pytest.raises(placeholders.PlaceholderError, match="WORKFLOW"):
        placeholders.substitute(wf, {})


def test_prepare_base_dir_links_pack_and_user_checkpoint(tmp_path):
    """--checkpoint as a path or as a name from the user's ComfyUI; no random models needed for this."""
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"x")
    setup = local_setup.prepare_base_dir(tmp_path / "base", checkpoint=ckpt, face_models=False)
    link = setup.base_dir / "custom_nodes" / "FaceBooth"
    assert link.is_symlink() and link.resolve() == REPO
    assert setup.checkpoint_name == "mine.safetensors" == setup.substitutions["CHECKPOINT"]
    assert (setup.base_dir / "models" / "checkpoints" / "mine.safetensors").resolve() == ckpt
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    (comfy / "models" / "checkpoints" / "named.safetensors").write_bytes(b"y")
    setup2 = local_setup.prepare_base_dir(tmp_path / "base2", checkpoint="named.safetensors", comfyui_dir=comfy, face_models=False)
    assert setup2.checkpoint_name == "named.safetensors"
    with pytest.raises(local_setup.MissingModelError, match="not_there.safetensors"):
        local_setup.prepare_base_dir(tmp_path / "base3", checkpoint="not_there.safetensors", comfyui_dir=comfy, face_models=False)
