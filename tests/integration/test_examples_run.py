"""Example workflows run headless in a real ComfyUI, through the runner API and through the CLI.

The checks that need no ComfyUI are in tests/test_runner_workflows.py, tests/test_examples_cli.py and
tests/test_runner_client.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facebooth.runner import examples as ex
from facebooth.runner import placeholders, ui_twins
from facebooth.runner.client import WorkflowFailedError, WorkflowRejectedError
from facebooth.runner.ui_workflow import ui_to_api, strip_meta
from helpers.declared_defaults import drop_declared_defaults
from helpers.examples_cli import examples_cli as _cli

BASIC = ex.API_DIR / "basic_txt2img_api.json"


# ---------------------------------------------------------------------------------------- runner API


@pytest.fixture(scope="module")
def basic_images(comfy_server, run_workflow):
    return run_workflow(comfy_server.client, BASIC)


def test_basic_workflow_returns_a_64x64_image(basic_images):
    assert len(basic_images) == 1
    img = basic_images[0]
    assert img.size == (64, 64) and img.mode == "RGB"
    arr = np.asarray(img, dtype=np.float32)
    # Random weights give noise, but numerically tame noise: neither flat nor saturated.
    assert arr.std() > 5.0
    assert ((arr >= 254) | (arr <= 1)).mean() < 0.5


def test_checkpoint_loaded_with_every_key_used(basic_images, comfy_server):
    text = comfy_server.log_text()
    assert "model_type EPS" in text
    for warning in ("unet missing", "unet unexpected", "Missing VAE keys", "clip missing"):
        assert warning not in text, f"ComfyUI logged '{warning}' while loading the random checkpoint"


@pytest.mark.slow
def test_seed_placeholder_reaches_the_sampler(basic_images, comfy_server, run_workflow):
    other = run_workflow(comfy_server.client, BASIC, {"SEED": 1})
    assert other[0].size == (64, 64)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(basic_images[0]))


def test_invalid_workflow_is_rejected_with_the_node_named(comfy_server, default_substitutions):
    api = placeholders.substitute(ex.load_workflow(BASIC), {**default_substitutions, "WORKFLOW": "x"})
    api["4"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(WorkflowRejectedError) as info:
        comfy_server.client.queue_prompt(api)
    message = str(info.value)
    assert "node 4 (CheckpointLoaderSimple)" in message and "no_such_model.safetensors" in message
    assert "4" in info.value.node_errors


def test_node_failure_during_execution_is_reported(comfy_server, random_checkpoint_name):
    # A 1x1 image is cropped to 0x0 before VAE encoding: validation passes, execution raises.
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": random_checkpoint_name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    prompt_id = comfy_server.client.queue_prompt(api)
    with pytest.raises(WorkflowFailedError) as info:
        comfy_server.client.wait(prompt_id, timeout=120)
    assert info.value.details.get("node_id") in ("3", "4")
    assert "ComfyUI failed in node" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("api_path", ex.list_workflows(), ids=ex.workflow_name)
def test_every_example_workflow_runs_and_saves_images(api_path, comfy_server, run_workflow):
    images = run_workflow(comfy_server.client, api_path)
    assert images, f"{api_path.name} ran but no output node reported an image"
    for img in images:
        assert img.width > 0 and img.height > 0


@pytest.mark.parametrize("api_path", ex.list_workflows(), ids=ex.workflow_name)
def test_ui_twin_queues_the_same_graph(api_path, comfy_server):
    twin = ui_twins.ui_twin_path(api_path)
    assert twin.is_file(), f"{twin.name} is missing: generate it with `python -m facebooth examples --write-ui`"
    import json

    ui = json.loads(twin.read_text())
    info = comfy_server.client.object_info()
    expected = ui_twins.expected_ui_api(api_path)
    assert drop_declared_defaults(strip_meta(ui_to_api(ui, info)), expected, info) == expected, (
        f"{twin.name} drifted from {api_path.name}: regenerate with `python -m facebooth examples --write-ui`"
    )


# ---------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_runs_basic_example_end_to_end(comfyui_dir, facebooth_cache_dir, tmp_path):
    """The main job as users run it: the CLI starts its own ComfyUI with the embedded random models."""
    out = tmp_path / "out"
    proc = _cli("--only", "basic_txt2img", "--out", str(out),
                env={"COMFYUI_DIR": str(comfyui_dir), "FACEBOOTH_CACHE": str(facebooth_cache_dir)}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 workflows ran" in proc.stdout
    assert "node 3 KSampler 4/4" in proc.stderr  # per-node progress
    with Image.open(out / "basic_txt2img_01.png") as img:
        assert img.size == (64, 64)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 64 and sheet.height > 64


def test_cli_against_a_running_server(comfy_server, random_checkpoint_name, tmp_path):
    out = tmp_path / "out"
    # A checkpoint named on the command line counts as a real one (real settings), so ask for test sizes.
    sizes = [arg for name in ("WIDTH=64", "HEIGHT=64", "STEPS=4") for arg in ("--set", name)]
    proc = _cli("--server", comfy_server.url, "--checkpoint", random_checkpoint_name, *sizes, "--only", "basic_*",
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "basic_txt2img_01.png").is_file() and (out / "contact_sheet.png").is_file()


def test_cli_failing_workflow_exits_1_with_comfyui_error(comfy_server, random_checkpoint_name, tmp_path):
    wf_dir = tmp_path / "wf"
    wf_dir.mkdir()
    (wf_dir / "broken_api.json").write_text('{"1": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}}')
    (wf_dir / "basic_txt2img_api.json").write_text(BASIC.read_text())
    # A checkpoint named on the command line counts as a real one (real settings), so ask for test sizes.
    sizes = [arg for name in ("WIDTH=64", "HEIGHT=64", "STEPS=4") for arg in ("--set", name)]
    proc = _cli("--server", comfy_server.url, "--checkpoint", random_checkpoint_name, *sizes,
                "--workflows-dir", str(wf_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "FAILED" in proc.stdout and "NoSuchNodeAnywhere" in proc.stdout
    assert "1/2 workflows ran" in proc.stdout  # the other workflow still ran


def test_cli_missing_checkpoint_on_server_exits_2(comfy_server, tmp_path):
    proc = _cli("--server", comfy_server.url, "--checkpoint", "not_there.safetensors", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "no checkpoint named 'not_there.safetensors'" in proc.stderr


def test_cli_unknown_placeholder_fails_that_workflow(comfy_server, random_checkpoint_name, tmp_path):
    wf_dir = tmp_path / "wf"
    wf_dir.mkdir()
    (wf_dir / "needs_x_api.json").write_text(BASIC.read_text().replace('"blurry, low quality"', '"$NEGATIVE_X"'))
    proc = _cli("--server", comfy_server.url, "--checkpoint", random_checkpoint_name,
                "--workflows-dir", str(wf_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "$NEGATIVE_X" in proc.stdout
