"""``--score``: ID similarity of each output image to its job's face, with the pack's face analysis.

A random small ArcFace (narrow widths) stands in for real weights; with 'aligned' mode each image is scored as a
face crop. Properties that hold for any recognizer: an image scored against itself has cosine 1, another image
less, and the journal and manifest carry the figures.
"""
from __future__ import annotations

import csv

from facebooth.devmodels.face_models import write_random_arcface
from facebooth.runner import drawn_face
from facebooth.runner.batch import report
from facebooth.runner.batch.jobs import Job
from facebooth.runner.batch.journal import Journal
from facebooth.runner.batch.scoring import LocalScorer, score_journal


def test_score_journal_puts_id_similarity_per_image_into_journal_and_manifest(tmp_path):
    models = tmp_path / "models"
    write_random_arcface(models / "facebooth" / "face" / "arcface_tiny.safetensors", widths=(8, 16, 16, 32))
    faces = tmp_path / "faces"
    faces.mkdir()
    drawn_face.synthetic_face(0, size=112).save(faces / "anna.png")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    drawn_face.synthetic_face(0, size=112).save(out / "images" / "same.png")
    drawn_face.synthetic_face(5, size=112).save(out / "images" / "other.png")

    journal = Journal(out)
    job = Job(0, {"FACE_IMAGE": str(faces / "anna.png"), "SEED": 0})
    no_face = Job(1, {"SEED": 1})
    journal.add_jobs([job, no_face])
    journal.mark_done(job.key, ["images/same.png", "images/other.png"], 1.0)
    journal.mark_done(no_face.key, ["images/other.png"], 1.0)

    scorer = LocalScorer(models, mode="aligned")
    assert score_journal(journal, out, scorer) == 1  # the job without a face file is left unscored
    same, other = journal.row(job.key).scores
    assert abs(same - 1.0) < 1e-3 and other < same
    assert journal.row(no_face.key).scores is None
    assert score_journal(journal, out, scorer) == 0  # scored once

    csv_path, _ = report.write_manifest(out, journal.rows())
    with open(csv_path, newline="") as f:
        values = [r["id_similarity"] for r in csv.DictReader(f)]
    assert values[0] == f"{same:.4f}" and values[2] == ""
