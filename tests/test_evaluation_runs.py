"""Reading what to evaluate: batch manifests (CSV with JSON values), prompts sidecars, captions, bad folders."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from facebooth.pipelines.evaluation.runs import RunError, read_run


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i:02d}.png")


def test_batch_manifest_csv_with_json_values(tmp_path):
    run = tmp_path / "run"
    _images(run / "images", 2)
    face = tmp_path / "alice.png"
    Image.new("RGB", (8, 8)).save(face)
    with (run / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "identity", "prompt", "seed", "status", "file", "values"])
        w.writeheader()
        for i in range(2):
            w.writerow({"job": i, "identity": "alice", "prompt": "sks on the moon", "seed": i, "status": "done",
                        "file": f"images/{i:02d}.png", "values": json.dumps({"FACE_IMAGE": str(face), "setting": "beta=0.3"})})
        w.writerow({"job": 9, "identity": "alice", "prompt": "x", "seed": 0, "status": "failed", "file": "", "values": "{}"})
    items = read_run(run, method="instantbooth")
    assert [it.file.name for it in items] == ["00.png", "01.png"]
    assert all(it.method == "instantbooth" and it.subject == "alice" and it.seed in ("0", "1") for it in items)
    # the CSV's values column is JSON text: the face and the setting come from it
    assert all(it.face == face and it.setting == "beta=0.3" for it in items)
    other = tmp_path / "bob.png"
    assert all(it.face == face and it.method == "run" for it in read_run(run, reference=other))  # rows' own face wins


def test_prompts_txt_and_captions(tmp_path):
    a = tmp_path / "a"
    _images(a, 3)
    (a / "prompts.txt").write_text("one\ntwo\nthree\n")
    assert [it.prompt for it in read_run(a)] == ["one", "two", "three"]
    (a / "prompts.txt").write_text("same for all\n")
    assert {it.prompt for it in read_run(a)} == {"same for all"}
    (a / "prompts.txt").write_text("one\ntwo\n")
    with pytest.raises(RunError, match="2 prompts for 3 images"):
        read_run(a)
    b = tmp_path / "b"
    _images(b, 2)
    (b / "00.txt").write_text("a caption\n")
    assert [(it.file.name, it.prompt) for it in read_run(b)] == [("00.png", "a caption")]


def test_bad_runs_say_what_is_expected(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        read_run(tmp_path / "nope")
    empty = tmp_path / "empty"
    _images(empty, 1)
    with pytest.raises(RunError, match="manifest.jsonl"):
        read_run(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "prompts.jsonl").write_text('{"file": "missing.png", "prompt": "x"}\n')
    with pytest.raises(RunError, match="do not exist"):
        read_run(bad)
    (bad / "prompts.jsonl").write_text('{"file": "missing.png", \n')
    with pytest.raises(RunError, match="line 1"):
        read_run(bad)
