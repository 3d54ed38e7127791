"""ID similarity per output image: read from the workflow's ID Similarity node, or computed with ``--score``.

* In the workflow: ``FaceBoothIDSimilarity`` reports ``{"mean", "faces": [{"image", "cosine"}]}`` as its UI text in
  ``/history``; each saved image gets the best cosine of the faces found in it.
* ``--score``: the pack's face analysis (``pipelines/face``: MTCNN + ArcFace) embeds the job's face image and every
  output image in this process, after the batch, and the journal keeps the cosines.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from .journal import Journal

log = logging.getLogger(__name__)

ID_SIMILARITY_NODE = "FaceBoothIDSimilarity"


def scores_from_history(entry: Mapping, workflow: Mapping, n_images: int) -> list | None:
    """Best cosine per image from the first ID Similarity node of the workflow; None when it has none."""
    ids = [nid for nid, node in workflow.items() if node.get("class_type") == ID_SIMILARITY_NODE]
    for nid in ids:
        texts = (entry.get("outputs", {}).get(nid) or {}).get("text") or []
        if not texts:
            continue
        try:
            report = json.loads(texts[0])
        except (TypeError, ValueError):
            continue
        best: dict[int, float] = {}
        for face in report.get("faces", []):
            i, cos = int(face.get("image", 0)), float(face.get("cosine"))
            best[i] = max(cos, best.get(i, float("-inf")))
        return [best.get(i) for i in range(n_images)]
    return None


class LocalScorer:
    """MTCNN + ArcFace from a ComfyUI ``models`` folder (``facebooth/face/mtcnn`` and an ArcFace file)."""

    def __init__(self, models_dir: Path, arcface: str | None = None, mode: str = "detect", device: str = "cpu"):
        from ...pipelines.face.analyzer import FaceAnalyzer
        from ...pipelines.face.arcface import load_arcface
        from ...pipelines.face.mtcnn import load_mtcnn

        face_dir = Path(models_dir) / "facebooth" / "face"
        if arcface is None:
            found = sorted(p for p in face_dir.glob("*") if p.suffix in (".safetensors", ".pth", ".pt") and p.is_file())
            if not found:
                raise FileNotFoundError(
                    f"--score needs an ArcFace file in {face_dir} (see `python -m facebooth weights list`), "
                    "or pass --score-arcface PATH.")
            arcface_path = found[0]
        else:
            arcface_path = Path(arcface) if Path(arcface).is_file() else face_dir / arcface
        detector = load_mtcnn(face_dir / "mtcnn", device=device) if mode == "detect" else None
        self.analyzer = FaceAnalyzer(detector, load_arcface(arcface_path, device=device))
        self.mode = "detect" if mode == "detect" else "aligned"
        self._references: dict[str, object] = {}

    def _load(self, path: Path):
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr)[None]

    def reference(self, face_path: str):
        """The identity of a job's face image (cached per file), or None when no face is found in it."""
        from ...pipelines.face.analyzer import identity_from_faces

        if face_path not in self._references:
            faces = self.analyzer.analyze(self._load(Path(face_path)), mode=self.mode, select="largest", no_face="skip",
                                          crops=("arcface_112",))
            self._references[face_path] = identity_from_faces(faces, self.analyzer.recognizer_name)
        return self._references[face_path]

    def score(self, face_path: str, image_paths: list[Path]) -> list:
        import torch

        from ...pipelines.face.analyzer import cosine_similarity

        identity = self.reference(face_path)
        out = []
        for path in image_paths:
            faces = self.analyzer.analyze(self._load(path), mode=self.mode, select="all", no_face="skip",
                                          crops=("arcface_112",))
            if identity is None or not faces.faces:
                out.append(None)
                continue
            sims = cosine_similarity(identity, torch.stack([f.embedding for f in faces.faces]))
            out.append(round(float(sims.max()), 4))
        return out


def score_journal(journal: Journal, out_dir: Path, scorer: LocalScorer, face_key: str = "FACE_IMAGE") -> int:
    """Score every done job that has a local face file and no scores yet; returns how many were scored."""
    n = 0
    for row in journal.rows("done"):
        face = row.values.get(face_key)
        if row.scores is not None or not isinstance(face, str) or not Path(face).is_file():
            continue
        journal.set_scores(row.key, scorer.score(face, [out_dir / f for f in row.files]))
        n += 1
    return n
