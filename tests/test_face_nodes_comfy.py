"""Face nodes with ComfyUI imported as a library (skipped without COMFYUI_DIR): the face models are ComfyUI-managed
(ModelPatcher: loaded by load_models_gpu when a node runs, evicted by unload_all_models), the RetinaFace detector
choice loads a facexlib-layout file, and the InsightFace node offers the backend's provider list."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facebooth.devmodels.face_models import write_random_arcface, write_random_mtcnn, write_random_retinaface

COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or "/nonexistent").expanduser()
pytestmark = pytest.mark.skipif(
    not (COMFYUI_DIR / "comfy" / "model_patcher.py").is_file(),
    reason="needs ComfyUI's code: set COMFYUI_DIR to a ComfyUI source tree (e.g. ~/ComfyUI)",
)
needs_facexlib = pytest.mark.skipif(importlib.util.find_spec("facexlib") is None, reason="facexlib is not installed")
TINY = (8, 16, 16, 32)


@pytest.fixture(scope="module")
def comfy():
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import folder_paths

    from facebooth.nodes import face as node

    return SimpleNamespace(mm=mm, folder_paths=folder_paths, node=node)


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("face_models")
    write_random_mtcnn(folder / "mtcnn")
    write_random_arcface(folder / "arcface_tiny.safetensors", depth=18, widths=TINY)
    return folder


@pytest.fixture
def models(comfy, face_dir, monkeypatch) -> Path:
    # ComfyUI's executor fills the V3 hidden inputs (the node id for the progress bar); called directly, we do
    monkeypatch.setattr(comfy.node.DetectFaces, "hidden", SimpleNamespace(unique_id=None), raising=False)
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "facebooth/face", ([str(face_dir)], {".safetensors", ".pt", ".pth"}))
    return face_dir


def _loaded(comfy) -> list:
    return [m.model for m in comfy.mm.current_loaded_models]


def _crops(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 112, 112, 3, generator=torch.Generator().manual_seed(3))


def test_face_models_are_managed_by_comfy_and_evicted_by_unload(comfy, models):
    comfy.mm.unload_all_models()
    analyzer = comfy.node.FaceAnalyzerTorch.execute(detector="mtcnn", recognizer="arcface_tiny.safetensors",
                                                    face_parser="none (landmark hull)", min_face_size=20, device="cpu")[0]
    patchers = analyzer.patchers
    assert len(patchers) == 2  # MTCNN (three nets in one module) and ArcFace
    assert not any(p in _loaded(comfy) for p in patchers)  # loading the node loads nothing yet
    out = comfy.node.DetectFaces.execute(face_analyzer=analyzer, image=_crops(), mode="aligned crop", which_face="largest",
                                         face_index=0, no_face="error")
    assert out[1].count == 2
    loaded = _loaded(comfy)
    assert all(any(p is q for q in loaded) for p in patchers)
    comfy.mm.unload_all_models()
    assert not any(p is q for p in patchers for q in _loaded(comfy))


def test_no_module_level_cache_pins_a_tensor_on_the_load_device(comfy, models):
    """After unloading, the cached analyzer's weights sit on the offload device (CPU here; GPU tensors would be freed)."""
    analyzer = comfy.node.FaceAnalyzerTorch.execute(detector="mtcnn", recognizer="arcface_tiny.safetensors",
                                                    face_parser="none (landmark hull)", min_face_size=20, device="cpu")[0]
    analyzer.analyze(_crops(1), mode="aligned")
    comfy.mm.unload_all_models()
    for p in analyzer.patchers:
        assert all(t.device == p.offload_device for t in p.model.state_dict().values())


@needs_facexlib
def test_retinaface_detector_choice_runs_detect_faces(comfy, models):
    write_random_retinaface(models / "retinaface" / "detection_Resnet50_Final.pth", seed=1)
    comfy.mm.unload_all_models()
    analyzer = comfy.node.FaceAnalyzerTorch.execute(detector="retinaface (facexlib)", recognizer="arcface_tiny.safetensors",
                                                    face_parser="none (landmark hull)", min_face_size=20, device="cpu",
                                                    det_size=320)[0]
    from facebooth.pipelines.face.retinaface import RetinaFaceDetector

    assert isinstance(analyzer.detector, RetinaFaceDetector) and analyzer.det_size == 320
    image = torch.rand(1, 200, 240, 3, generator=torch.Generator().manual_seed(0))
    faces, identity, crops, masks, debug = comfy.node.DetectFaces.execute(
        face_analyzer=analyzer, image=image, mode="detect", which_face="all (left to right)", face_index=0, no_face="pass through")
    assert masks.shape == (1, 200, 240) and debug.shape[0] == 1
    assert any(p is analyzer.patchers[0] for p in _loaded(comfy))  # RetinaFace is ComfyUI-managed too
    comfy.mm.unload_all_models()


def test_retinaface_missing_file_names_the_folder(comfy, models, tmp_path, monkeypatch):
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "facebooth/face", ([str(tmp_path)], {".pth"}))
    with pytest.raises(FileNotFoundError, match=r"detection_Resnet50_Final.pth.*'retinaface' folder"):
        comfy.node.FaceAnalyzerTorch.execute(detector="retinaface (facexlib)", recognizer="none",
                                             face_parser="none (landmark hull)", min_face_size=20, device="cpu")


def test_one_provider_list(comfy):
    from facebooth.pipelines.face.insightface_backend import PROVIDER_CHOICES

    assert comfy.node.PROVIDERS == list(PROVIDER_CHOICES)
