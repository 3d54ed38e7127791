"""Face nodes in a real ComfyUI on real photos that pip packages ship (insightface's t1.jpg, scikit-image's
astronaut): detector mode with the real MTCNN weights facenet-pytorch ships, and aligned-crop mode."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from facebooth.runner import placeholders

ANALYZER = {"class_type": "FaceBoothFaceAnalyzerTorch",
            "inputs": {"detector": "mtcnn", "recognizer": "$ARCFACE", "face_parser": "none (landmark hull)",
                       "min_face_size": 20, "device": "auto"}}


def _t1_jpg() -> Path:
    insightface = pytest.importorskip("insightface")
    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not path.is_file():
        pytest.skip("insightface's sample image t1.jpg is not installed")
    return path


def _astronaut_png() -> bytes:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def _real_mtcnn(comfy_base_dir: Path) -> None:
    mtcnn = comfy_base_dir / "models" / "facebooth" / "face" / "mtcnn"
    real = pytest.importorskip("facenet_pytorch")
    assert (mtcnn / "pnet.pt").exists(), "the runner should have placed MTCNN weights"
    # The demo setup copies facenet-pytorch's real weights when it is installed: same bytes as the wheel's.
    wheel = Path(real.__file__).parent / "data" / "pnet.pt"
    if (mtcnn / "pnet.pt").read_bytes() != wheel.read_bytes():
        pytest.skip("MTCNN weights in the test models dir are random, not facenet-pytorch's real ones")


def _run(client, graph: dict, values: dict) -> dict:
    api = placeholders.substitute(graph, values, name="test")
    prompt_id = client.queue_prompt(api)
    return client.wait(prompt_id, timeout=600)


def _similarity_report(entry: dict, node_id: str) -> dict:
    text = entry["outputs"][node_id]["text"]
    return json.loads(text[0] if isinstance(text, list) else text)


def test_detector_mode_on_a_group_photo_finds_every_face_left_to_right(comfy_server, comfy_base_dir, default_substitutions):
    _real_mtcnn(comfy_base_dir)
    client = comfy_server.client
    name = client.upload_image(_t1_jpg(), "facebooth_t1.jpg")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": ANALYZER,
        "3": {"class_type": "FaceBoothDetectFaces", "inputs": {"face_analyzer": ["2", 0], "image": ["1", 0], "mode": "detect",
              "which_face": "all (left to right)", "face_index": 0, "no_face": "error"}},
        "4": {"class_type": "FaceBoothIDSimilarity", "inputs": {"face_analyzer": ["2", 0], "reference": ["3", 1], "images": ["1", 0], "mode": "detect"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}},
    }
    entry = _run(client, graph, default_substitutions)
    report = _similarity_report(entry, "4")
    faces = report["faces"]
    assert len(faces) >= 6, report  # t1.jpg is a group photo of several people
    xs = [f["box"][0] for f in faces]
    assert xs == sorted(xs)
    # the reference is the mean of these very faces, so every face resembles it more than chance
    assert all(f["cosine"] > 0 for f in faces), report
    assert entry["outputs"]["5"]["images"], "debug image missing"


def test_largest_face_of_astronaut_and_self_similarity(comfy_server, comfy_base_dir, default_substitutions):
    _real_mtcnn(comfy_base_dir)
    client = comfy_server.client
    name = client.upload_image(_astronaut_png(), "facebooth_astronaut.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": ANALYZER,
        "3": {"class_type": "FaceBoothDetectFaces", "inputs": {"face_analyzer": ["2", 0], "image": ["1", 0], "mode": "detect",
              "which_face": "largest", "face_index": 0, "no_face": "error"}},
        "4": {"class_type": "FaceBoothIDSimilarity", "inputs": {"face_analyzer": ["2", 0], "reference": ["3", 1], "images": ["1", 0], "mode": "detect"}},
    }
    report = _similarity_report(_run(client, graph, default_substitutions), "4")
    assert len(report["faces"]) == 1
    x1, y1, x2, y2 = report["faces"][0]["box"]
    assert 150 < (x1 + x2) / 2 < 260 and 60 < (y1 + y2) / 2 < 200  # the astronaut's face, upper left of centre
    assert report["faces"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)  # same face, same crop: identical embedding


def test_aligned_crop_mode_on_real_face_crops(comfy_server, default_substitutions):
    client = comfy_server.client
    name = client.upload_image(_astronaut_png(), "facebooth_astronaut_aligned.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 150, "height": 150, "x": 130, "y": 50}},
        "3": ANALYZER,
        "4": {"class_type": "FaceBoothDetectFaces", "inputs": {"face_analyzer": ["3", 0], "image": ["2", 0], "mode": "aligned crop",
              "which_face": "largest", "face_index": 0, "no_face": "error"}},
        "5": {"class_type": "FaceBoothIDSimilarity", "inputs": {"face_analyzer": ["3", 0], "reference": ["4", 1], "images": ["2", 0], "mode": "aligned crop"}},
    }
    report = _similarity_report(_run(client, graph, default_substitutions), "5")
    assert len(report["faces"]) == 1 and report["faces"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)


def test_no_face_error_names_the_image(comfy_server, default_substitutions):
    from facebooth.runner.client import WorkflowFailedError
    from PIL import Image

    client = comfy_server.client
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 90, 200)).save(buf, format="PNG")
    name = client.upload_image(buf.getvalue(), "facebooth_blank.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": ANALYZER,
        "3": {"class_type": "FaceBoothDetectFaces", "inputs": {"face_analyzer": ["2", 0], "image": ["1", 0], "mode": "detect",
              "which_face": "largest", "face_index": 0, "no_face": "error"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}},
    }
    with pytest.raises(WorkflowFailedError, match=r"No face found in image 0"):
        _run(client, graph, default_substitutions)
    graph["3"]["inputs"]["no_face"] = "pass through"
    entry = _run(client, graph, default_substitutions)
    assert entry["outputs"]["4"]["images"]


def test_retinaface_detector_runs_in_a_real_workflow(comfy_server, comfy_base_dir, facebooth_cache_dir, default_substitutions):
    """facexlib's RetinaFace as the Face Analyzer (PyTorch) detector, in a real ComfyUI, with a random-weight
    detection_Resnet50_Final.pth in facexlib's layout written here (cached between runs)."""
    pytest.importorskip("facexlib")
    import shutil

    from facebooth.devmodels.face_models import write_random_retinaface

    cached = facebooth_cache_dir / "retinaface_random_seed1.pth"
    if not cached.is_file():
        write_random_retinaface(cached, seed=1, dtype=__import__("torch").float16)  # fp16: half the size to cache
    target = comfy_base_dir / "models" / "facebooth" / "face" / "retinaface" / "detection_Resnet50_Final.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, target)
    client = comfy_server.client
    name = client.upload_image(_t1_jpg(), "facebooth_t1_retina.jpg")
    analyzer = {"class_type": "FaceBoothFaceAnalyzerTorch",
                "inputs": {**ANALYZER["inputs"], "detector": "retinaface (facexlib)", "det_size": 320}}
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": analyzer,
        "3": {"class_type": "FaceBoothDetectFaces", "inputs": {"face_analyzer": ["2", 0], "image": ["1", 0], "mode": "detect",
              "which_face": "all (left to right)", "face_index": 0, "no_face": "pass through"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 3]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    entry = _run(client, graph, default_substitutions)
    # random weights: what it finds means nothing, but the detector ran on the photo and the node finished
    assert entry["outputs"]["4"]["images"] and entry["outputs"]["6"]["images"]
