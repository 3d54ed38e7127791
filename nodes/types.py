"""FaceBooth's own socket types. Each carries a plain pipelines/ object between nodes."""
from __future__ import annotations

from comfy_api.latest import io

FaceAnalyzer = io.Custom("FACEBOOTH_FACE_ANALYZER")  # pipelines.face.analyzer.FaceAnalyzer
Faces = io.Custom("FACEBOOTH_FACES")  # pipelines.face.types.FaceSet
Identity = io.Custom("FACEBOOTH_IDENTITY")  # pipelines.face.types.Identity
