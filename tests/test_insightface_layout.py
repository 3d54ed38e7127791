"""insightface pack layout checks: correct packs are found where insightface itself finds them, and each common
mistake is explained with a fix that really fixes it (the printed command is run and insightface then loads)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from facebooth.devmodels.insightface_packs import (
    PACK_FILES,
    write_insightface_pack,
    write_nested_mistake,
    write_pack_files,
)
from facebooth.pipelines.face.insightface_layout import (
    InsightFacePackError,
    find_pack,
    list_packs,
    locate_pack,
    onnx_file_problem,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="runs the printed POSIX command")


def _insightface_loads(root: str, pack: str) -> set[str]:
    """What insightface itself makes of FaceAnalysis(name=pack, root=root)."""
    app_mod = pytest.importorskip("insightface.app")
    app = app_mod.FaceAnalysis(name=pack, root=root, providers=["CPUExecutionProvider"])
    return set(app.models)


def _run_fix(message: str) -> None:
    """Run the shell command the error message gives (the indented line holding mv)."""
    cmd = next(line.strip() for line in message.splitlines() if line.startswith("  ") and " mv " in f" {line}")
    subprocess.run(["bash", "-c", cmd], check=True)


@pytest.fixture
def ins_root(tmp_path) -> Path:
    root = tmp_path / "ComfyUI" / "models" / "insightface"
    root.mkdir(parents=True)
    return root


def test_correct_pack_is_the_root_insightface_needs(ins_root):
    write_insightface_pack(ins_root, "antelopev2")
    root = find_pack([str(ins_root)], "antelopev2")
    assert root == str(ins_root)
    loc = locate_pack([str(ins_root)], "antelopev2")
    assert (loc.detection, loc.recognition) == PACK_FILES["antelopev2"]
    assert _insightface_loads(root, "antelopev2") >= {"detection", "recognition"}


def test_first_usable_root_wins_and_missing_roots_are_skipped(tmp_path, ins_root):
    other = tmp_path / "extra" / "insightface"
    write_insightface_pack(other, "buffalo_l")
    roots = [str(tmp_path / "nope"), str(ins_root), str(other)]
    assert find_pack(roots, "buffalo_l") == str(other)


def test_root_pointing_at_the_models_level_is_accepted(ins_root):
    # extra_model_paths.yaml pointing at .../insightface/models: insightface's ROOT is then its parent
    write_insightface_pack(ins_root, "buffalo_l")
    root = find_pack([str(ins_root / "models")], "buffalo_l")
    assert root == str(ins_root)
    assert "detection" in _insightface_loads(root, "buffalo_l")


@posix_only
def test_nested_zip_mistake_gives_the_exact_mv_that_fixes_it(ins_root):
    nested = write_nested_mistake(ins_root, "antelopev2")
    pack_dir = ins_root / "models" / "antelopev2"
    # this is the failure users see from insightface itself
    with pytest.raises(AssertionError):
        _insightface_loads(str(ins_root), "antelopev2")
    with pytest.raises(InsightFacePackError) as err:
        find_pack([str(ins_root)], "antelopev2")
    msg = str(err.value)
    assert "one folder too deep" in msg
    assert f"mv {nested}/* {pack_dir}/ && rmdir {nested}" in msg
    _run_fix(msg)
    assert find_pack([str(ins_root)], "antelopev2") == str(ins_root)
    assert _insightface_loads(str(ins_root), "antelopev2") >= {"detection", "recognition"}


@posix_only
def test_nested_mistake_with_spaces_in_the_path_is_quoted(tmp_path):
    root = tmp_path / "Comfy UI" / "models" / "insightface"
    write_nested_mistake(root, "antelopev2")
    with pytest.raises(InsightFacePackError) as err:
        find_pack([str(root)], "antelopev2")
    _run_fix(str(err.value))
    assert find_pack([str(root)], "antelopev2") == str(root)


@posix_only
@pytest.mark.parametrize("models_dir_exists", [False, True])
def test_pack_without_the_models_level(ins_root, models_dir_exists):
    write_pack_files(ins_root / "antelopev2", "antelopev2")
    if models_dir_exists:  # an empty target: a plain `mv dir target` would nest it, the fix must not
        (ins_root / "models" / "antelopev2").mkdir(parents=True)
    with pytest.raises(InsightFacePackError) as err:
        find_pack([str(ins_root)], "antelopev2")
    msg = str(err.value)
    assert f"{ins_root / 'antelopev2'}{os.sep}" in msg and f"{ins_root / 'models' / 'antelopev2'}{os.sep}" in msg
    _run_fix(msg)
    assert find_pack([str(ins_root)], "antelopev2") == str(ins_root)


@posix_only
def test_pack_without_models_level_and_nested(ins_root):
    write_pack_files(ins_root / "antelopev2" / "antelopev2", "antelopev2")
    with pytest.raises(InsightFacePackError) as err:
        find_pack([str(ins_root)], "antelopev2")
    _run_fix(str(err.value))
    assert find_pack([str(ins_root)], "antelopev2") == str(ins_root)
    assert not (ins_root / "antelopev2").exists()


def test_missing_pack_lists_what_exists_where_we_looked_and_how_to_get_it(tmp_path, ins_root):
    write_insightface_pack(ins_root, "buffalo_l")
    gone = tmp_path / "not_there"
    with pytest.raises(InsightFacePackError) as err:
        find_pack([str(ins_root), str(gone)], "antelopev2")
    msg = str(err.value)
    assert "'antelopev2' was not found" in msg
    assert str(ins_root) in msg and f"{gone} (does not exist)" in msg
    assert "Packs found there: buffalo_l" in msg
    assert "weights fetch antelopev2" in msg and "antelopev2.zip" in msg  # manifest id + download
    assert f"{ins_root / 'models' / 'antelopev2'}{os.sep}" in msg


def test_still_zipped_pack(ins_root):
    (ins_root / "models").mkdir()
    (ins_root / "models" / "antelopev2.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(InsightFacePackError, match=r"still zipped[\s\S]*unzip"):
        find_pack([str(ins_root)], "antelopev2")


@pytest.mark.parametrize("role", ["detection", "recognition"])
def test_missing_model_file(ins_root, role):
    pack_dir = write_insightface_pack(ins_root, "antelopev2")
    det, rec = PACK_FILES["antelopev2"]
    (pack_dir / (det if role == "detection" else rec)).unlink()
    with pytest.raises(InsightFacePackError) as err:
        find_pack([str(ins_root)], "antelopev2")
    msg = str(err.value)
    assert f"face {role} model is missing" in msg
    assert (det if role == "detection" else rec) in msg
    assert "Files there: " + (rec if role == "detection" else det) in msg


def test_zero_byte_and_truncated_files(ins_root):
    pack_dir = write_insightface_pack(ins_root, "antelopev2")
    det, rec = PACK_FILES["antelopev2"]
    data = (pack_dir / rec).read_bytes()
    (pack_dir / rec).write_bytes(data[: len(data) // 2])
    with pytest.raises(InsightFacePackError, match=rf"{re.escape(rec)}: is truncated"):
        find_pack([str(ins_root)], "antelopev2")
    (pack_dir / rec).write_bytes(data)
    (pack_dir / det).write_bytes(b"")
    with pytest.raises(InsightFacePackError, match=rf"{re.escape(det)}: is empty \(0 bytes\)"):
        find_pack([str(ins_root)], "antelopev2")


def test_extra_broken_file_in_pack_is_reported(ins_root):
    # insightface opens every .onnx in the pack folder, so a broken extra model breaks loading too
    pack_dir = write_insightface_pack(ins_root, "antelopev2")
    (pack_dir / "1k3d68.onnx").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(InsightFacePackError, match="1k3d68.onnx: is a Git LFS pointer"):
        find_pack([str(ins_root)], "antelopev2")


def test_truncation_check_agrees_with_onnx_parser(ins_root):
    onnx = pytest.importorskip("onnx")
    import numpy as np

    pack_dir = write_insightface_pack(ins_root, "antelopev2")
    for name in PACK_FILES["antelopev2"]:
        path = pack_dir / name
        data = path.read_bytes()
        assert onnx_file_problem(path) is None
        onnx.load(str(path))
        cut_file = ins_root / "cut.onnx"
        for cut in np.random.default_rng(0).integers(1, len(data) - 1, size=25):
            cut_file.write_bytes(data[: int(cut)])
            with pytest.raises(Exception):  # noqa: B017 -- any error: the real parser refuses every cut
                onnx.checker.check_model(onnx.load(str(cut_file)))
            assert onnx_file_problem(cut_file) is not None, f"cut at {cut} of {len(data)} not flagged"


def test_list_packs_orders_valid_then_broken_then_missing_defaults(tmp_path, ins_root):
    write_insightface_pack(ins_root, "buffalo_l")
    write_nested_mistake(ins_root, "antelopev2")
    other = tmp_path / "other"
    write_insightface_pack(other, "buffalo_s")
    packs = list_packs([str(ins_root), str(other), str(tmp_path / "missing")])
    assert packs == ["buffalo_l", "buffalo_s", "antelopev2"]
    assert list_packs([str(tmp_path / "empty")]) == ["antelopev2", "buffalo_l"]


def test_bad_pack_names_and_no_roots(ins_root):
    for bad in ["../antelopev2", "a/b", ""]:
        with pytest.raises(InsightFacePackError, match="not a plain folder name"):
            find_pack([str(ins_root)], bad)
    with pytest.raises(InsightFacePackError, match="No 'insightface' model folder"):
        find_pack([], "antelopev2")
