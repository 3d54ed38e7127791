"""Example workflows run headless in a real ComfyUI, through the runner API and through the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facebooth.runner import examples as ex
from facebooth.runner import local_setup, placeholders, substitutions, ui_twins
from facebooth.runner.client import WorkflowFailedError, WorkflowRejectedError
from facebooth.runner.server import find_free_port
from facebooth.runner.ui_workflow import ui_to_api, strip_meta
from helpers.declared_defaults import drop_declared_defaults

BASIC = ex.API_DIR / "basic_txt2img_api.json"
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "facebooth", "examples", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
    )


# ---------------------------------------------------------------------------------------- placeholders (no ComfyUI)


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


def test_cli_exits_2_for_a_missing_face_image(tmp_path):
    proc = _cli("--face", str(tmp_path / "nope.png"), "--comfyui-dir", str(tmp_path), "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "Face image not found" in proc.stderr


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    import struct

    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        return head + bytes([n]) + payload
    if n < 65536:
        return head + bytes([126]) + struct.pack(">H", n) + payload
    return head + bytes([127]) + struct.pack(">Q", n) + payload


def test_event_socket_reads_text_fragmented_and_long_frames_and_answers_pings():
    import json
    import socket

    from facebooth.runner.client import _EventSocket

    a, b = socket.socketpair()
    try:
        ev = _EventSocket(a, b"")
        long_msg = {"type": "progress", "data": {"value": 1, "pad": "x" * 70000}}
        b.sendall(
            _frame(0x1, json.dumps({"type": "status"}).encode())
            + _frame(0x2, b"\x00preview")  # binary preview: skipped
            + _frame(0x1, b'{"type": "exe', fin=False) + _frame(0x0, b'cuting"}')
            + _frame(0x9, b"hi")  # ping
            + _frame(0x1, json.dumps(long_msg).encode())
        )
        got = [ev.receive(1.0) for _ in range(6)]
        assert got[0] == {"type": "status"}
        assert got[1] is None  # binary message
        assert got[2] is None and got[3] == {"type": "executing"}  # fragment, then the completed message
        assert got[4] is None  # ping
        assert got[5] == long_msg  # 8-byte length form
        pong = b.recv(64)
        assert pong[0] == 0x8A and pong[1] & 0x80  # FIN+pong, masked as clients must
        assert ev.receive(0.1) is None  # nothing pending: times out quietly
        b.sendall(_frame(0x8, b""))
        with pytest.raises(OSError):
            ev.receive(1.0)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------- runner API


@pytest.fixture(scope="module")
def basic_images(comfy_server, run_workflow):
    return run_workflow(comfy_server.client, BASIC)


@pytest.mark.integration
def test_basic_workflow_returns_a_64x64_image(basic_images):
    assert len(basic_images) == 1
    img = basic_images[0]
    assert img.size == (64, 64) and img.mode == "RGB"
    arr = np.asarray(img, dtype=np.float32)
    # Random weights give noise, but numerically tame noise: neither flat nor saturated.
    assert arr.std() > 5.0
    assert ((arr >= 254) | (arr <= 1)).mean() < 0.5


@pytest.mark.integration
def test_checkpoint_loaded_with_every_key_used(basic_images, comfy_server):
    text = comfy_server.log_text()
    assert "model_type EPS" in text
    for warning in ("unet missing", "unet unexpected", "Missing VAE keys", "clip missing"):
        assert warning not in text, f"ComfyUI logged '{warning}' while loading the random checkpoint"


@pytest.mark.integration
@pytest.mark.slow
def test_seed_placeholder_reaches_the_sampler(basic_images, comfy_server, run_workflow):
    other = run_workflow(comfy_server.client, BASIC, {"SEED": 1})
    assert other[0].size == (64, 64)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(basic_images[0]))


@pytest.mark.integration
def test_invalid_workflow_is_rejected_with_the_node_named(comfy_server, default_substitutions):
    api = placeholders.substitute(ex.load_workflow(BASIC), {**default_substitutions, "WORKFLOW": "x"})
    api["4"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(WorkflowRejectedError) as info:
        comfy_server.client.queue_prompt(api)
    message = str(info.value)
    assert "node 4 (CheckpointLoaderSimple)" in message and "no_such_model.safetensors" in message
    assert "4" in info.value.node_errors


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("api_path", ex.list_workflows(), ids=ex.workflow_name)
def test_every_example_workflow_runs_and_saves_images(api_path, comfy_server, run_workflow):
    images = run_workflow(comfy_server.client, api_path)
    assert images, f"{api_path.name} ran but no output node reported an image"
    for img in images:
        assert img.width > 0 and img.height > 0


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_cli_against_a_running_server(comfy_server, random_checkpoint_name, tmp_path):
    out = tmp_path / "out"
    # A checkpoint named on the command line counts as a real one (real settings), so ask for test sizes.
    sizes = [arg for name in ("WIDTH=64", "HEIGHT=64", "STEPS=4") for arg in ("--set", name)]
    proc = _cli("--server", comfy_server.url, "--checkpoint", random_checkpoint_name, *sizes, "--only", "basic_*",
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "basic_txt2img_01.png").is_file() and (out / "contact_sheet.png").is_file()


@pytest.mark.integration
def test_cli_failing_workflow_exits_1_with_comfyui_error(comfy_server, random_checkpoint_name, tmp_path):
    wf_dir = tmp_path / "wf"
    wf_dir.mkdir()
    (wf_dir / "broken_api.json").write_text('{"1": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}}')
    (wf_dir / "basic_txt2img_api.json").write_text(BASIC.read_text())
    proc = _cli("--server", comfy_server.url, "--checkpoint", random_checkpoint_name,
                "--workflows-dir", str(wf_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "FAILED" in proc.stdout and "NoSuchNodeAnywhere" in proc.stdout
    assert "1/2 workflows ran" in proc.stdout  # the other workflow still ran


@pytest.mark.integration
def test_cli_missing_checkpoint_on_server_exits_2(comfy_server, tmp_path):
    proc = _cli("--server", comfy_server.url, "--checkpoint", "not_there.safetensors", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "no checkpoint named 'not_there.safetensors'" in proc.stderr


@pytest.mark.integration
def test_cli_unknown_placeholder_fails_that_workflow(comfy_server, random_checkpoint_name, tmp_path):
    wf_dir = tmp_path / "wf"
    wf_dir.mkdir()
    (wf_dir / "needs_x_api.json").write_text(BASIC.read_text().replace('"blurry, low quality"', '"$NEGATIVE_X"'))
    proc = _cli("--server", comfy_server.url, "--checkpoint", random_checkpoint_name,
                "--workflows-dir", str(wf_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "$NEGATIVE_X" in proc.stdout


def test_cli_exits_2_when_comfyui_dir_points_nowhere(tmp_path):
    proc = _cli("--only", "basic_txt2img", "--out", str(tmp_path), env={"COMFYUI_DIR": str(tmp_path / "nowhere")}, timeout=120)
    assert proc.returncode == 2
    assert "is not a ComfyUI folder" in proc.stderr and "--comfyui-dir" in proc.stderr


def test_cli_exits_2_when_comfyui_is_not_given(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"}
    proc = subprocess.run([sys.executable, "-m", "facebooth", "examples", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "COMFYUI_DIR" in proc.stderr


def test_cli_exits_2_when_the_server_is_unreachable(tmp_path):
    proc = _cli("--server", f"http://127.0.0.1:{find_free_port()}", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "Cannot reach ComfyUI" in proc.stderr


# ---------------------------------------------------------------------------------------- found where it lives


def _fake_comfyui(folder: Path) -> Path:
    (folder / "comfy").mkdir(parents=True)
    (folder / "main.py").write_text("raise SystemExit('fake ComfyUI')\n")
    return folder


def _cli_from(pack_parent: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    """Run the CLI with ``facebooth`` imported from ``pack_parent/facebooth`` (a link to this repo), as when the
    pack is cloned into a ComfyUI's custom_nodes."""
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from facebooth.cli.main import main; "
            "import facebooth; assert facebooth.__file__.startswith(sys.path[0]), facebooth.__file__; "
            "raise SystemExit(main(sys.argv[1:]))")
    full_env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "FACEBOOTH_MODELS_DIR")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code, str(pack_parent), *args], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=pack_parent)


def test_a_pack_inside_a_comfyui_uses_it_unless_told_otherwise(tmp_path):
    from facebooth.runner.server import find_enclosing_comfyui

    comfy = _fake_comfyui(tmp_path / "ComfyUI")
    other = _fake_comfyui(tmp_path / "OtherComfyUI")
    nodes = comfy / "custom_nodes"
    nodes.mkdir()
    (nodes / "facebooth").symlink_to(REPO, target_is_directory=True)
    assert find_enclosing_comfyui(nodes / "facebooth" / "runner") == comfy
    assert find_enclosing_comfyui(tmp_path / "elsewhere" / "pack") is None

    # examples: the enclosing ComfyUI is used with no setting (the run then stops at the missing checkpoint).
    missing = "missing.safetensors"  # a bare name is looked up in the ComfyUI's models/checkpoints
    proc = _cli_from(nodes, "examples", "--checkpoint", missing, "--out", str(tmp_path / "o"), env={})
    assert proc.returncode == 2, proc.stderr
    assert f"Using the ComfyUI this pack is in: {comfy}" in proc.stderr
    assert str(comfy / "models" / "checkpoints") in proc.stderr
    for override in ({"COMFYUI_DIR": str(other)}, {}):
        args = () if override else ("--comfyui-dir", str(other))
        proc = _cli_from(nodes, "examples", *args, "--checkpoint", missing, "--out", str(tmp_path / "o"), env=override)
        assert proc.returncode == 2 and "Using the ComfyUI this pack is in" not in proc.stderr, proc.stderr
        assert str(other / "models" / "checkpoints") in proc.stderr  # looked up in the given ComfyUI
    # weights: the models folder of the enclosing ComfyUI, unless COMFYUI_DIR / --comfyui-dir say otherwise.
    proc = _cli_from(nodes, "weights", "list", env={})
    assert proc.returncode == 0, proc.stderr
    assert f"models dir: {comfy / 'models'}" in proc.stdout
    proc = _cli_from(nodes, "weights", "list", env={"COMFYUI_DIR": str(other)})
    assert f"models dir: {other / 'models'}" in proc.stdout
    proc = _cli_from(nodes, "weights", "list", "--comfyui-dir", str(other), env={})
    assert f"models dir: {other / 'models'}" in proc.stdout
