"""The pack loads in a real ComfyUI from a symlinked custom_nodes folder, and its nodes document themselves."""
from __future__ import annotations

from facebooth.runner.server import pack_import_problems


def test_pack_is_installed_as_a_symlink_and_imports_without_error(comfy_server, comfy_base_dir):
    link = comfy_base_dir / "custom_nodes" / "FaceBooth"
    assert link.is_symlink()
    startup = comfy_server.startup_log()
    # ComfyUI lists every pack it imported, with the time it took.
    assert any(line.strip().endswith(str(link)) for line in startup.splitlines()), startup[-3000:]
    problems = pack_import_problems(startup)
    assert not problems, "FaceBooth import problems in ComfyUI's startup log:\n" + "\n".join(problems)


def test_every_facebooth_node_has_tooltips_on_all_inputs_and_outputs(comfy_server):
    info = comfy_server.client.object_info()
    nodes = {name: spec for name, spec in info.items() if name.startswith("FaceBooth")}
    assert nodes, "ComfyUI lists no FaceBooth* node; see the startup log:\n" + comfy_server.startup_log()[-3000:]
    missing = []
    for name, spec in nodes.items():
        for section in ("required", "optional"):
            for input_name, input_spec in spec.get("input", {}).get(section, {}).items():
                opts = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
                if not str(opts.get("tooltip") or "").strip():
                    missing.append(f"{name}: input {input_name}")
        outputs = spec.get("output", [])
        tips = spec.get("output_tooltips") or []
        for k, _out_type in enumerate(outputs):
            if k >= len(tips) or not str(tips[k] or "").strip():
                out_name = (spec.get("output_name") or outputs)[k]
                missing.append(f"{name}: output {k} ({out_name})")
    assert not missing, "missing tooltips:\n" + "\n".join(missing)


def test_facebooth_nodes_live_under_the_facebooth_category(comfy_server):
    info = comfy_server.client.object_info()
    wrong = [f"{n}: {s.get('category')}" for n, s in info.items()
             if n.startswith("FaceBooth") and not str(s.get("category", "")).startswith("FaceBooth")]
    assert not wrong, wrong


def test_random_checkpoint_is_listed(comfy_server, random_checkpoint_name):
    assert random_checkpoint_name in comfy_server.client.models("checkpoints")


def test_import_problem_detection_on_real_log_lines():
    """No ComfyUI needed: the detector flags the lines ComfyUI and our nodes/__init__ write on failures."""
    ok_log = (
        "Import times for custom nodes:\n"
        "   0.1 seconds: /tmp/base/custom_nodes/FaceBooth\n"
        "   0.0 seconds: /tmp/base/custom_nodes/websocket_image_save.py\n"
    )
    assert pack_import_problems(ok_log) == []
    failed_pack = (
        "Cannot import /tmp/base/custom_nodes/FaceBooth module for custom nodes: No module named 'x'\n"
        "   0.0 seconds (IMPORT FAILED): /tmp/base/custom_nodes/FaceBooth\n"
    )
    assert len(pack_import_problems(failed_pack)) == 2
    failed_module = (
        "FaceBooth: the face nodes could not be loaded and are disabled\n"
        "Traceback (most recent call last):\n"
        '  File "/tmp/base/custom_nodes/FaceBooth/nodes/__init__.py", line 19, in collect_nodes\n'
    )
    assert len(pack_import_problems(failed_module)) == 2
    other_pack = "   0.0 seconds (IMPORT FAILED): /tmp/base/custom_nodes/SomethingElse\n"
    assert pack_import_problems(other_pack) == []
