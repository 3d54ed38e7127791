"""``python -m facebooth eval`` end to end on random weights: two methods' runs (folders with a prompts sidecar,
and a manifest in the layout ``facebooth batch`` writes) -> metrics.csv, table.md, tradeoff.png, report.html.

Models: facenet-pytorch's MTCNN (real detector, so the real photo has a face and the noise images have none),
a small random ArcFace, a tiny random open_clip model given through a model-config JSON. The numbers mean
nothing; every code path runs and each file is checked for what it must hold.
"""
from __future__ import annotations

import csv
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")
skimage = pytest.importorskip("skimage")

from facebooth.cli.main import main  # noqa: E402
from facebooth.pipelines.evaluation.protocols import load_protocol  # noqa: E402
from facebooth.pipelines.evaluation.runs import read_run  # noqa: E402

TINY = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import save_file

    from facebooth.devmodels.face_models import copy_or_write_mtcnn, write_random_arcface

    root = tmp_path_factory.mktemp("models")
    copy_or_write_mtcnn(root / "facebooth" / "face" / "mtcnn")
    write_random_arcface(root / "facebooth" / "face" / "arcface_ms1mv3_r50.pth", depth=18, widths=(8, 16, 16, 32))
    cfg = root / "FaceBoothEvalTinyCLIP.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    model = open_clip.create_model("FaceBoothEvalTinyCLIP", pretrained=None)
    torch.manual_seed(0)
    state = {k: (v + 0.02 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    weights = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return root, cfg, weights


def _save(img: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Method A: a folder + prompts.jsonl; method B: a batch-style output folder with manifest.jsonl."""
    base = tmp_path_factory.mktemp("runs")
    photo = Image.fromarray(skimage.data.astronaut())
    ref = base / "faces" / "astronaut.png"
    _save(photo, ref)
    prompts = ["sks with a sad expression", "sks on the beach", "sks latte art"]
    rng = np.random.default_rng(0)

    def variants(k: int) -> list[Image.Image]:
        out = [photo.resize((256 + 32 * k, 256 + 32 * k)), photo.transpose(Image.FLIP_LEFT_RIGHT).resize((300, 300))]
        out.append(Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)))  # no face
        return out

    a = base / "method_a"
    rows = []
    for i, p in enumerate(prompts):
        for j, im in enumerate(variants(i)):
            rows.append({"file": _save(im, a / f"{i}_{j}.png"), "prompt": p, "face": str(ref), "seed": j})
    (a / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    b = base / "batch_out"
    records = []
    for i, p in enumerate(prompts):
        for j, im in enumerate(variants(i)[1:]):
            rel = f"images/job{i}_{j:02d}.png"
            _save(im.rotate(5 * (j + 1)), b / rel)
            records.append({"job": f"k{i}{j}", "name": f"astronaut_{i}", "identity": "astronaut", "prompt": p, "seed": j,
                            "status": "done", "file": rel, "id_similarity": None,
                            "values": {"FACE_IMAGE": str(ref), "PROMPT": p, "SEED": j}})
    records.append({"job": "kf", "name": "x", "identity": "astronaut", "prompt": prompts[0], "seed": 9, "status": "failed",
                    "file": "", "values": {"FACE_IMAGE": str(ref), "PROMPT": prompts[0], "SEED": 9}})
    (b / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return a, b, ref


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_batch_manifest_rows_are_read(runs):
    _, b, ref = runs
    items = read_run(b)
    assert len(items) == 6  # the failed job is skipped
    assert all(it.face == ref and it.subject == "astronaut" and it.method == "batch_out" for it in items)
    assert items[0].file == b / "images/job0_00.png" and items[0].file.is_file()


def test_eval_end_to_end_writes_table_plot_and_page(models, runs, tmp_path):
    root, cfg, weights = models
    a, b, _ = runs
    out = tmp_path / "eval"
    rc, stdout, stderr = _run(["eval", f"Method A={a}", f"Method B={b}", "--protocol", "cross_init", "--trigger", "sks",
                               "--models-dir", str(root), "--clip-config", str(cfg), "--clip-weights", str(weights),
                               "--out", str(out), "--batch-size", "4"])
    assert rc == 0, stderr
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 9 + 6
    assert {r["method"] for r in rows} == {"Method A", "Method B"}
    # the placeholder became the protocol's class word for the CLIP sentence, and the category was recognised
    sad = [r for r in rows if r["prompt"] == "sks with a sad expression"]
    assert {r["text_prompt"] for r in sad} == {"person with a sad expression"} and {r["category"] for r in sad} == {"expression"}
    # stylization prompts leave the identity score (Cross Initialization), but keep their text score
    art = [r for r in rows if r["category"] == "style"]
    assert art and all(r["identity"] == "" and r["text"] != "" for r in art)
    # the noise images have no face: excluded from the identity mean under cross_init's rule
    noise = [r for r in rows if r["file"].endswith("_2.png") and r["method"] == "Method A"]
    assert noise and all(r["face_found"] == "False" and r["identity"] == "" for r in noise)
    photos = [r for r in rows if r["face_found"] == "True" and r["category"] != "style"]
    assert photos and all(-1.0 <= float(r["identity"]) <= 1.0 for r in photos)
    # per-method table: our two rows, the paper's six, the protocol's column labels
    table = (out / "table.md").read_text()
    assert "| Identity ↑ | Prompt ↑ |" in table and "| Method A |" in table and "| Method B |" in table
    assert "| Celeb Basis | – | 0.2070 | 0.2683 |" in table and "| Ours (320 steps) | – | 0.2517 | 0.2859 |" in table
    mean_a = np.mean([float(r["identity"]) for r in rows if r["method"] == "Method A" and r["identity"] != ""])
    assert f"{mean_a:.4f}" in table
    det_a = np.mean([r["face_found"] == "True" for r in rows if r["method"] == "Method A"])
    assert f"{100 * det_a:.1f}%" in table
    assert stdout == table
    png = Image.open(out / "tradeoff.png")
    assert png.format == "PNG" and png.size[0] > 400
    page = (out / "report.html").read_text()
    assert page.count("<h2>") == 2 and "tradeoff.png" in page and page.count("<img loading") == 2 * 8


def test_text_score_in_metrics_is_the_clip_score_of_the_class_word_sentence(models, runs, tmp_path):
    from facebooth.pipelines.evaluation.clip_score import load_clip_scorer

    root, cfg, weights = models
    a, _, _ = runs
    out = tmp_path / "eval"
    rc, _, stderr = _run(["eval", str(a), "--protocol", "personamagic", "--trigger", "sks", "--face-backend", "none",
                          "--clip-config", str(cfg), "--clip-weights", str(weights), "--out", str(out), "--no-plot"])
    assert rc == 0, stderr
    row = next(csv.DictReader((out / "metrics.csv").open()))
    assert row["text_prompt"] == "face with a sad expression"  # PersonaMagic: S* -> "face"
    scorer = load_clip_scorer("x", weights, config=cfg)
    expected = 2.5 * max(float(scorer.text_scores([Image.open(row["file"])], ["face with a sad expression"])[0]), 0.0)
    assert float(row["text"]) == pytest.approx(expected, abs=1e-5)
    assert row["identity"] == "" and row["face_found"] == ""  # identity off
    assert not (out / "tradeoff.png").exists()


def test_missing_model_file_is_named_with_its_place(runs, tmp_path):
    a, _, _ = runs
    models = tmp_path / "models"
    models.mkdir()
    rc, _, stderr = _run(["eval", str(a), "--protocol", "cross_init", "--models-dir", str(models)])
    assert rc == 2
    assert "open_clip/ViT-B-32-quickgelu.openai.safetensors" in stderr
    assert str(models / "facebooth" / "evaluation" / "open_clip") in stderr
    assert "weights fetch open-clip-vit-b-32-openai" in stderr


def test_write_prompts_for_batch(tmp_path):
    path = tmp_path / "prompts.txt"
    rc, stdout, _ = _run(["eval", "--protocol", "instantbooth", "--trigger", "sks", "--write-prompts", str(path)])
    assert rc == 0 and stdout.strip() == str(path)
    lines = path.read_text().splitlines()
    p = load_protocol("instantbooth")
    assert len(lines) == len(p.prompts) == 17
    assert lines[0] == "a photo of sks person in the swimming pool"
    assert p.text_prompt(lines[0], triggers=["sks"]) == "a photo of person in the swimming pool"
    assert math.isclose(p.reported[2].values["identity"], 1.1901)
