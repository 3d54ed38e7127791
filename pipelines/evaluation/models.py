"""Find the evaluation models through the weights manifest (ComfyUI's models dir + extra_model_paths) and build
the scorers. A missing file gives a message naming it, where it goes and how to get it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ...utils.manifest import ModelDirs, load_manifest, resolve_entry
from ..face.analyzer import FaceAnalyzer
from .clip_score import ClipScorer, load_clip_scorer
from .identity import IdentityScorer
from .protocols import Protocol

ARCFACE_ENTRIES = ("arcface-ms1mv3-r100", "arcface-ms1mv3-r50")
FACENET_ENTRY = "facenet-vggface2"
MTCNN_ENTRIES = ("mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet")


class MissingModelError(FileNotFoundError):
    """A model file the evaluation needs is not where the manifest says it goes."""


def find_weight(entry_id: str, dirs: Optional[ModelDirs], override: Union[str, Path, None] = None) -> Path:
    """The file of manifest entry ``entry_id`` (single-file entries), or ``override`` when given."""
    manifest = load_manifest()
    entry = manifest.get(entry_id)
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise MissingModelError(f"{entry.description}: {path} does not exist.")
        return path
    if dirs is None:
        raise MissingModelError(
            f"{entry.description} ({entry_id}) is needed, but no models directory is known. Pass --models-dir "
            "(ComfyUI's models folder) or --comfyui-dir, set COMFYUI_DIR, or give the file directly."
        )
    (resolved,) = resolve_entry(entry, dirs)
    if resolved.path is not None:
        return resolved.path
    how = (f"Download it with `python -m facebooth weights fetch {entry_id}` ({entry.url})." if entry.url
           else (entry.manual or "").replace("{path}", str(resolved.default_path)))
    searched = ", ".join(str(d) for d in dirs.search_dirs(entry.folder))
    raise MissingModelError(
        f"Missing model file {resolved.relpath} ({entry.description}; license: {entry.license}). "
        f"It goes in {resolved.default_path} (searched: {searched}). {how}"
    )


def build_clip(protocol: Protocol, dirs: Optional[ModelDirs], *, weights: Union[str, Path, None] = None,
               model_name: Optional[str] = None, config: Union[str, Path, None] = None,
               device: Union[str, torch.device] = "cpu") -> ClipScorer:
    """The protocol's CLIP model from its manifest entry, or ``model_name`` + ``weights`` (a local file)."""
    path = Path(weights) if weights is not None else find_weight(protocol.clip_weights, dirs)
    return load_clip_scorer(model_name or protocol.clip_model, path, config=config, device=device)


def build_analyzer(dirs: Optional[ModelDirs], *, backend: str = "torch", arcface: Union[str, Path, None] = None,
                   pack: str = "antelopev2", mtcnn_dir: Union[str, Path, None] = None, need_recognizer: bool = True,
                   device: Union[str, torch.device] = "cpu") -> FaceAnalyzer:
    """The pack's face analysis for scoring: torch (MTCNN + ArcFace file) or an InsightFace pack."""
    if backend == "insightface":
        from ..face.insightface_backend import InsightFaceBackend

        roots = [str(d) for d in dirs.search_dirs("insightface")] if dirs is not None else []
        ins = InsightFaceBackend(roots, pack=pack, providers=["CUDA" if str(device).startswith("cuda") else "CPU"])
        return FaceAnalyzer(detector=ins, recognizer=ins, name=f"insightface:{pack}")
    if backend != "torch":
        raise ValueError(f"Unknown face backend {backend!r}; choose torch or insightface.")
    from ..face.arcface import load_arcface
    from ..face.mtcnn import load_mtcnn

    if mtcnn_dir is None:
        mtcnn_dir = find_weight(MTCNN_ENTRIES[0], dirs).parent
    detector = load_mtcnn(mtcnn_dir, device=device)
    recognizer = None
    if need_recognizer:
        if arcface is None:
            errors = []
            for entry in ARCFACE_ENTRIES:
                try:
                    arcface = find_weight(entry, dirs)
                    break
                except MissingModelError as exc:
                    errors.append(str(exc))
            else:
                raise MissingModelError(errors[0])
        recognizer = load_arcface(arcface, device=device, name=f"arcface:{Path(arcface).name}")
    return FaceAnalyzer(detector=detector, recognizer=recognizer, name=f"torch:mtcnn+{Path(arcface).name if arcface else 'none'}")


def build_identity(protocol: Protocol, analyzer: FaceAnalyzer, dirs: Optional[ModelDirs], *,
                   facenet: Union[str, Path, None] = None, mode: str = "detect",
                   device: Union[str, torch.device] = "cpu") -> IdentityScorer:
    rec = None
    if protocol.identity_model == "facenet":
        from .facenet import load_facenet

        rec = load_facenet(find_weight(FACENET_ENTRY, dirs, facenet), device=device)
    return IdentityScorer(analyzer=analyzer, model=protocol.identity_model, score=protocol.identity_score,
                          no_face=protocol.no_face, clamp_min=protocol.identity_clamp_min, facenet=rec, mode=mode)
