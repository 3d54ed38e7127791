"""Batch outputs (names, atomic files, PNG metadata) and the report + manifest."""
from __future__ import annotations

import csv
import io
import json

from facebooth.runner.batch import outputs, report
from facebooth.runner.batch.journal import Row
from facebooth.runner.batch.scoring import scores_from_history
from facebooth.runner.client import OutputImage
from PIL import Image, PngImagePlugin


def _png(color=(200, 10, 10), text: dict | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_metadata_is_added_without_touching_pixels():
    data = _png(text={"prompt": '{"1": {}}'})
    out = outputs.with_png_text(data, {"prompt": "other", "facebooth_job": '{"key": "k"}'})
    img = Image.open(io.BytesIO(out))
    img.load()
    assert img.text == {"prompt": '{"1": {}}', "facebooth_job": '{"key": "k"}'}  # existing chunk kept
    assert img.getpixel((3, 3)) == (200, 10, 10)
    assert outputs.png_text(out) == img.text
    assert outputs.with_png_text(b"\xff\xd8jpeg", {"a": "b"}) == b"\xff\xd8jpeg"


def test_job_outputs_have_deterministic_names_and_replace_on_rewrite(tmp_path):
    images = [OutputImage("9", "ComfyUI_00001_.png", "", "output", _png()),
              OutputImage("9", "ComfyUI_00002_.png", "", "output", _png((0, 0, 255)))]
    meta = outputs.job_metadata({"SEED": 1}, "k1", "job-a")
    files = outputs.write_job_outputs(tmp_path, "job-a", images, {"3": {"inputs": {"seed": 1}}}, meta)
    assert files == ["images/job-a_01.png", "images/job-a_02.png"]
    again = outputs.write_job_outputs(tmp_path, "job-a", images, {"3": {"inputs": {"seed": 1}}}, meta)
    assert again == files and sorted(p.name for p in (tmp_path / "images").iterdir()) == ["job-a_01.png", "job-a_02.png"]
    text = Image.open(tmp_path / files[1]).text
    assert json.loads(text["facebooth_job"]) == {"key": "k1", "name": "job-a", "values": {"SEED": 1}}
    assert json.loads(text["prompt"]) == {"3": {"inputs": {"seed": 1}}}
    (tmp_path / "images" / ".job-b_01.png.x1.tmp").write_bytes(b"half")
    assert outputs.remove_partial_files(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["job-a_01.png", "job-a_02.png"]


def _row(key, identity, prompt, seed, status, files=(), scores=None, error=None):
    return Row(key, 0, f"{identity}-{prompt}-{seed}", identity, prompt, seed, {"SEED": seed}, status, "http://a",
               None, list(files), 1.0, error, 1, scores)


def test_report_grid_sorted_by_similarity_and_failures_listed(tmp_path):
    rows = [
        _row("a1", "anna", "p1", 0, "done", ["images/a1.png"], [0.2]),
        _row("a2", "anna", "p1", 1, "done", ["images/a2.png"], [0.6]),
        _row("b1", "ben", "p1", 0, "done", ["images/b1.png"], [0.9]),
        _row("b2", "ben", "p1", 1, "failed", error="ComfyUI failed in node 3: NoFaceError: No face found"),
    ]
    page = report.render_html(rows, "t")
    assert page.index("<th>ben</th>") < page.index("<th>anna</th>")  # higher mean ID similarity first
    assert page.index("images/a2.png") < page.index("images/a1.png")  # best image first within a cell
    assert "NoFaceError: No face found" in page and "Failed jobs (1)" in page
    csv_path, jsonl_path = report.write_manifest(tmp_path, rows)
    with open(csv_path, newline="") as f:
        records = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["file"], r["id_similarity"]) for r in records] == [
        ("a1", "done", "images/a1.png", "0.2000"), ("a2", "done", "images/a2.png", "0.6000"),
        ("b1", "done", "images/b1.png", "0.9000"), ("b2", "failed", "", "")]
    lines = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert lines[3]["error"].endswith("No face found") and lines[0]["values"] == {"SEED": 0}


def test_scores_from_the_id_similarity_node():
    workflow = {"10": {"class_type": "FaceBoothIDSimilarity", "inputs": {}}}
    entry = {"outputs": {"10": {"text": [json.dumps({"mean": 0.3, "faces": [
        {"image": 0, "face": 0, "cosine": 0.1}, {"image": 0, "face": 1, "cosine": 0.5}, {"image": 2, "face": 0, "cosine": 0.3}]})]}}}
    assert scores_from_history(entry, workflow, 3) == [0.5, None, 0.3]
    assert scores_from_history(entry, {"1": {"class_type": "SaveImage"}}, 3) is None
