"""Batch job spec: tables, matrix, stable keys and names, filling a workflow."""
from __future__ import annotations

import json

import pytest
from facebooth.runner.batch import jobs

WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$FACE_IMAGE"}},
    "3": {"class_type": "KSampler", "inputs": {"seed": "${SEED:-7}", "steps": 20, "model": ["4", 0]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "$PROMPT", "clip": ["4", 1]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "FaceBooth/${WORKFLOW}"}},
}


def test_csv_table_keys_files_and_labels(tmp_path):
    (tmp_path / "anna.png").write_bytes(b"x")
    table = tmp_path / "jobs.csv"
    table.write_text("identity,$FACE_IMAGE,PROMPT,SEED,3.steps\n"
                     "Anna,anna.png,a photo of a person,1,4\n"
                     "Ben,ben.png,a painting,2,\n", encoding="utf-8")
    found = jobs.load_table(table)
    assert [j.position for j in found] == [0, 1]
    a, b = found
    # A relative path to a file beside the table becomes absolute; one that does not exist stays as written.
    assert a.values["FACE_IMAGE"] == str((tmp_path / "anna.png").resolve())
    assert b.values["FACE_IMAGE"] == "ben.png"
    assert a.values["3.steps"] == "4" and "3.steps" not in b.values  # empty cell: the workflow's own value
    assert a.identity == "Anna" and b.identity == "Ben"
    assert a.prompt == "a photo of a person" and a.seed == "1"
    assert a.key != b.key and len(a.key) == 16
    assert a.name.startswith("anna_a-photo-of-a-person_s1_") and a.name.endswith(a.key[:8])


def test_jsonl_table_keeps_types(tmp_path):
    table = tmp_path / "jobs.jsonl"
    table.write_text(json.dumps({"PROMPT": "x", "SEED": 3}) + "\n\n" + json.dumps({"PROMPT": "y", "SEED": 4}) + "\n")
    found = jobs.load_table(table)
    assert [j.values for j in found] == [{"PROMPT": "x", "SEED": 3}, {"PROMPT": "y", "SEED": 4}]


def test_bad_tables_say_what_is_wrong(tmp_path):
    bad = tmp_path / "jobs.csv"
    bad.write_text("prompt text\nx\n")
    with pytest.raises(ValueError, match="neither a placeholder"):
        jobs.load_table(bad)
    other = tmp_path / "jobs.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        jobs.load_table(other)
    with pytest.raises(FileNotFoundError):
        jobs.load_table(tmp_path / "nope.csv")


def test_key_is_stable_and_depends_only_on_values():
    a = jobs.Job(0, {"PROMPT": "p", "SEED": 1})
    b = jobs.Job(5, {"SEED": 1, "PROMPT": "p"})
    c = jobs.Job(0, {"PROMPT": "p", "SEED": 2})
    assert a.key == b.key and a.name == b.name
    assert a.key != c.key


def test_matrix_is_faces_x_prompts_x_seeds(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    faces = jobs.find_faces(str(tmp_path))
    assert [f.name for f in faces] == ["a.jpg", "b.png"]
    assert [f.name for f in jobs.find_faces(str(tmp_path / "*.png"))] == ["b.png"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# comment\nfirst\n\nsecond\n")
    prompts = jobs.read_prompts(prompts_file)
    assert prompts == ["first", "second"]
    found = jobs.matrix_jobs(faces, prompts, seeds=3, seed_base=10)
    assert len(found) == 2 * 2 * 3
    assert len({j.key for j in found}) == 12
    assert found[0].values == {"SEED": 10, "FACE_IMAGE": str(faces[0]), "PROMPT": "first"}
    assert [j.seed for j in found[:3]] == [10, 11, 12]
    assert jobs.duplicate_keys(found) == []
    assert jobs.duplicate_keys(found + [jobs.Job(99, dict(found[1].values))]) == [(1, 99)]
    with pytest.raises(FileNotFoundError):
        jobs.find_faces(str(tmp_path / "*.webp"))


def test_fill_sets_placeholders_then_node_inputs():
    api = jobs.fill(WORKFLOW, {"WORKFLOW": "demo", "FACE_IMAGE": "base.png"},
                    {"PROMPT": "hello", "FACE_IMAGE": "up/x.png", "3.steps": 4}, name="demo")
    assert api["6"]["inputs"]["text"] == "hello"
    assert api["1"]["inputs"]["image"] == "up/x.png"  # the job's value wins over the base value
    assert api["3"]["inputs"]["seed"] == 7  # the workflow's default, typed
    assert api["3"]["inputs"]["steps"] == 4
    assert api["9"]["inputs"]["filename_prefix"] == "FaceBooth/demo"
    assert WORKFLOW["6"]["inputs"]["text"] == "$PROMPT"  # the template is untouched
    with pytest.raises(KeyError, match="no node '42'"):
        jobs.fill(WORKFLOW, {"WORKFLOW": "d", "FACE_IMAGE": "f"}, {"PROMPT": "p", "42.steps": 1}, name="demo")
