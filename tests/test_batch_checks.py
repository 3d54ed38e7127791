"""Dry-run checks: every problem of every job, at once, from an /object_info in ComfyUI's format."""
from __future__ import annotations

from facebooth.runner.batch.checks import check_jobs, coerce, typed_values
from facebooth.runner.batch.jobs import Job

# The shape ComfyUI 0.3.x serves: V1 combos as a list, V3 combos as "COMBO" with options, numbers with min/max.
OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["face.png", "facebooth_batch/abc.png"], {"image_upload": True}]}}},
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["random.safetensors"], {}]}}},
    "KSampler": {"input": {"required": {
        "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
        "sampler_name": ["COMBO", {"options": ["euler", "ddim"]}],
    }}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}]}}},
}

WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$FACE_IMAGE"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "$CHECKPOINT"}},
    "3": {"class_type": "KSampler", "inputs": {"seed": "$SEED", "steps": "${STEPS:-20}", "cfg": 7.0,
                                               "sampler_name": "euler", "model": ["4", 0]}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "$PROMPT"}},
}
BASE = {"CHECKPOINT": "random.safetensors"}


def test_a_clean_batch_has_no_problem(tmp_path):
    face = tmp_path / "anna.png"
    face.write_bytes(b"x")
    jobs = [Job(0, {"FACE_IMAGE": str(face), "PROMPT": "p", "SEED": "3"}),
            Job(1, {"FACE_IMAGE": "face.png", "PROMPT": "123", "SEED": 4, "3.steps": "8"})]
    assert check_jobs(WORKFLOW, jobs, OBJECT_INFO, BASE).lines(2) == []


def test_all_problems_are_listed_in_one_pass(tmp_path):
    workflow = dict(WORKFLOW, **{"8": {"class_type": "NoSuchNode", "inputs": {}}})
    jobs = [
        Job(0, {"FACE_IMAGE": "missing.png", "PROMPT": "p", "SEED": 1}),  # file nowhere
        Job(1, {"FACE_IMAGE": "gone.png", "SEED": 2}),  # PROMPT unfilled, and its file missing too
        Job(2, {"FACE_IMAGE": "face.png", "PROMPT": "p", "SEED": 3, "3.steps": 0}),  # out of range
        Job(3, {"FACE_IMAGE": "face.png", "PROMPT": "p", "SEED": 4, "3.sampler_name": "nope", "NEGATIVE": "x"}),
        Job(4, {"FACE_IMAGE": "face.png", "PROMPT": "p", "SEED": "many"}),
    ]
    problems = check_jobs(workflow, jobs, OBJECT_INFO, BASE)
    lines = problems.lines(len(jobs))
    text = "\n".join(lines)
    assert "missing node type: node 8 is 'NoSuchNode'" in text
    assert "missing file: node 1 (LoadImage) input 'image' = 'missing.png'" in text and "(job 1)" in text
    assert "unfilled placeholder: $PROMPT" in text and "(job 2)" in text
    assert "input 'image' = 'gone.png' is neither a file here nor in the server's input folder (job 2)" in text
    assert "out of range: node 3 (KSampler) input 'steps' = 0 (allowed 1 .. 10000) (job 3)" in text
    assert "input 'sampler_name' = 'nope' is not one the server lists" in text
    assert "unused column: 'NEGATIVE'" in text
    assert "not a number: node 3 (KSampler) input 'seed' = 'many'" in text
    assert len(lines) == 8


def test_problems_shared_by_jobs_are_grouped():
    jobs = [Job(i, {"FACE_IMAGE": "face.png", "SEED": i}) for i in range(5)]
    lines = check_jobs(WORKFLOW, jobs, OBJECT_INFO, {}).lines(5)
    assert "unfilled placeholder: $PROMPT (give it a column, --set PROMPT=VALUE, or a matrix option) (all jobs)" in lines
    assert any("$CHECKPOINT" in line for line in lines)
    some = check_jobs(WORKFLOW, jobs[:2] + [Job(9, {"FACE_IMAGE": "face.png", "SEED": 9, "PROMPT": "p"})],
                      OBJECT_INFO, BASE).lines(3)
    assert some == ["unfilled placeholder: $PROMPT (give it a column, --set PROMPT=VALUE, or a matrix option) (job 1-2)"]


def test_cells_take_the_type_of_the_input_they_fill():
    assert coerce("5", "INT") == 5 and coerce("0.5", "FLOAT") == 0.5 and coerce(12, "STRING") == "12"
    assert coerce("true", "BOOLEAN") is True and coerce("x", "INT") == "x"
    typed = typed_values(WORKFLOW, OBJECT_INFO, {"SEED": "3", "PROMPT": 42, "3.steps": "8", "3.cfg": "2"})
    assert typed == {"SEED": 3, "PROMPT": "42", "3.steps": 8, "3.cfg": 2.0}
