"""``python -m facebooth examples`` where it must stop before running anything (no ComfyUI needed), and the
ComfyUI it picks when the pack sits inside one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from facebooth.runner.server import find_free_port
from helpers.examples_cli import REPO
from helpers.examples_cli import examples_cli as _cli


def test_cli_exits_2_for_a_missing_face_image(tmp_path):
    proc = _cli("--face", str(tmp_path / "nope.png"), "--comfyui-dir", str(tmp_path), "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "Face image not found" in proc.stderr


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
