"""InsightFace backend on a random-weight pack: our adapter must agree with insightface's own FaceAnalysis and
with plain onnxruntime, keep colour order and pixel coordinates right, pick providers sensibly and stay lazy."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

from facebooth.devmodels.insightface_packs import PACK_FILES, write_insightface_pack, write_nested_mistake  # noqa: E402
from facebooth.pipelines.face.insightface_backend import (  # noqa: E402
    InsightFaceBackend,
    InsightFaceUnavailableError,
    resolve_providers,
    retry_sizes,
)
from facebooth.pipelines.face.insightface_layout import InsightFacePackError, find_pack  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage deprecation inside insightface

H, W = 300, 420
SQUARE = (300, 200, 380, 280)  # x1, y1, x2, y2: right and low, so un-rescaled boxes would fall outside


@pytest.fixture(scope="module")
def ins_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "insightface"
    write_insightface_pack(root, "antelopev2")
    return root


@pytest.fixture(scope="module")
def backend(ins_root):
    return InsightFaceBackend([str(ins_root)], "antelopev2", providers=["CPU"], det_size=640, det_thresh=0.5)


@pytest.fixture(scope="module")
def reference_app(ins_root):
    """insightface used the way its README shows, independently of our backend."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="antelopev2", root=find_pack([str(ins_root)], "antelopev2"), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(640, 640))
    return app


def _image(channel: int = 0, seed: int = 0) -> torch.Tensor:
    """RGB float image: dim noise with one coloured square (channel 0 = red)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(H, W, 3, generator=g) * 0.15
    x1, y1, x2, y2 = SQUARE
    img[y1:y2, x1:x2] = 0.0
    img[y1:y2, x1:x2, channel] = 1.0
    return img


def _to_bgr(img: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((img.numpy() * 255).round().astype(np.uint8)[:, :, ::-1])


def test_dev_pack_is_routed_like_a_real_pack(backend):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(backend._det, SCRFD) and backend._det.use_kps and backend._det._feat_stride_fpn == [8, 16, 32]
    assert isinstance(backend._rec, ArcFaceONNX) and backend._rec.input_mean == 127.5
    assert backend.name == "insightface/antelopev2/glintr100"
    assert (backend.input_size, backend.embedding_dim) == (112, 512)
    assert set(backend._app.models) == {"detection", "recognition"}


def test_detect_matches_insightface_face_analysis(backend, reference_app):
    img = _image()
    ours = backend.detect(img)
    theirs = reference_app.get(_to_bgr(img))
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.box, b.bbox, rtol=0, atol=1e-4)
        assert a.score == pytest.approx(float(b.det_score), abs=1e-6)
        assert a.landmarks.shape == (5, 2) and a.landmarks.dtype == torch.float32
        np.testing.assert_allclose(a.landmarks.numpy(), b.kps, rtol=0, atol=1e-4)


def test_boxes_are_in_original_pixels_and_colour_order_is_kept(backend):
    faces = backend.detect(_image(channel=0))
    assert faces
    x1, y1, x2, y2 = SQUARE
    for f in faces:  # every box holds its anchor centre, which lies in (or at the edge of) the red square
        bx1, by1, bx2, by2 = f.box
        assert bx1 < x2 + 32 and bx2 > x1 - 32 and by1 < y2 + 32 and by2 > y1 - 32, f.box
    # the detector fires on red only: a blue square must give nothing (it would if RGB/BGR were swapped)
    assert backend.detect(_image(channel=2)) == []


def test_embed_matches_insightface_get_feat(backend, reference_app):
    crops = torch.randint(0, 256, (3, 112, 112, 3), generator=torch.Generator().manual_seed(1)).float() / 255
    ours = backend.embed(crops)
    rec = reference_app.models["recognition"]
    theirs = np.asarray(rec.get_feat([_to_bgr(c) for c in crops]))
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    assert ours.shape == (3, 512)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_embed_matches_plain_onnxruntime_with_rgb_input(backend, ins_root):
    # independent of insightface: the model is fed RGB, (x*255 - 127.5) / 127.5, NCHW
    import onnxruntime as ort

    path = ins_root / "models" / "antelopev2" / PACK_FILES["antelopev2"][1]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    crops = torch.randint(0, 256, (2, 112, 112, 3), generator=torch.Generator().manual_seed(2)).float() / 255
    x = ((crops * 255 - 127.5) / 127.5).permute(0, 3, 1, 2).contiguous().numpy()
    ref = F.normalize(torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x})[0]), dim=-1)
    torch.testing.assert_close(backend.embed(crops), ref, atol=1e-5, rtol=0)
    # and the channel order matters for this model, so the check above can fail
    assert (backend.embed(crops.flip(-1)) - ref).abs().max() > 1e-3


def test_embed_of_insightface_aligned_crop_equals_face_analysis_embedding(backend, reference_app):
    from insightface.utils import face_align

    img = _image()
    bgr = _to_bgr(img)
    face = reference_app.get(bgr)[0]
    crop_bgr = face_align.norm_crop(bgr, landmark=face.kps, image_size=112)
    crop_rgb = torch.from_numpy(crop_bgr[:, :, ::-1].copy()).float() / 255
    ours = backend.embed(crop_rgb[None])[0]
    np.testing.assert_allclose(ours.numpy(), face.normed_embedding, rtol=0, atol=1e-5)


def test_detection_retries_smaller_sizes_only_when_nothing_found(ins_root, monkeypatch):
    assert retry_sizes(640) == [480, 320]
    for retry, image, expected in [
        (True, torch.zeros(H, W, 3), [640, 480, 320]),
        (False, torch.zeros(H, W, 3), [640]),
        (True, _image(), [640]),
    ]:
        b = InsightFaceBackend([str(ins_root)], "antelopev2", retry_smaller=retry)
        sizes, real = [], b._det.detect

        def recording(img, input_size=None, _sizes=sizes, _real=real, **kw):
            _sizes.append(input_size[0])
            return _real(img, input_size=input_size, **kw)

        monkeypatch.setattr(b._det, "detect", recording)
        found = b.detect(image)
        assert sizes == expected
        assert bool(found) == (image.max() > 0)


def test_input_validation(backend):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        backend.detect(torch.zeros(1, H, W, 3))
    with pytest.raises(ValueError, match="arcface_112"):
        backend.embed(torch.zeros(2, 224, 224, 3))
    assert backend.embed(torch.zeros(0, 112, 112, 3)).shape == (0, 512)
    with pytest.raises(ValueError, match="multiple of 32"):
        InsightFaceBackend(["/nowhere"], "antelopev2", det_size=600)


def test_buffalo_l_pack(tmp_path):
    write_insightface_pack(tmp_path, "buffalo_l", seed=3)
    b = InsightFaceBackend([str(tmp_path)], "buffalo_l")
    assert b.name == "insightface/buffalo_l/w600k_r50"
    assert b.detect(_image())


def test_custom_pack_is_routed_by_insightface_not_by_file_names(tmp_path):
    pack_dir = write_insightface_pack(tmp_path, "mypack")
    (pack_dir / "det_10g.onnx").rename(pack_dir / "face_detector.onnx")
    (pack_dir / "w600k_r50.onnx").rename(pack_dir / "my_arcface.onnx")
    b = InsightFaceBackend([str(tmp_path)], "mypack")
    assert b.name == "insightface/mypack/my_arcface" and b.detect(_image())
    (pack_dir / "my_arcface.onnx").unlink()
    with pytest.raises(InsightFacePackError, match="no face recognition model"):
        InsightFaceBackend([str(tmp_path)], "mypack")


def test_misplaced_pack_error_comes_through_the_backend(tmp_path):
    write_nested_mistake(tmp_path, "antelopev2")
    with pytest.raises(InsightFacePackError, match=r"mv .*antelopev2/antelopev2/\* "):
        InsightFaceBackend([str(tmp_path)], "antelopev2")


def test_provider_mapping(caplog):
    cpu = "CPUExecutionProvider"
    with caplog.at_level(logging.WARNING, logger="facebooth"):
        chosen, warnings = resolve_providers(["CUDA"], [cpu])
    assert chosen == [cpu]
    assert "CUDAExecutionProvider" in caplog.text and "onnxruntime-gpu" in caplog.text and "CPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facebooth"):
        chosen, warnings = resolve_providers("Quantum", [cpu])
    assert chosen == [cpu] and "Unknown onnxruntime provider 'Quantum'" in caplog.text
    assert resolve_providers(["directml"], ["DmlExecutionProvider", cpu])[0] == ["DmlExecutionProvider", cpu]
    assert resolve_providers(["ROCM", "CUDA"], ["CUDAExecutionProvider", "ROCMExecutionProvider", cpu])[0] == [
        "ROCMExecutionProvider", "CUDAExecutionProvider", cpu]
    assert resolve_providers(["OpenVINOExecutionProvider"], ["OpenVINOExecutionProvider", cpu])[0][0] == "OpenVINOExecutionProvider"
    assert resolve_providers(["CoreML", "CPU"], [cpu]) == ([cpu], resolve_providers(["CoreML"], [cpu])[1])


def test_unavailable_provider_falls_back_to_cpu_in_the_sessions(ins_root, caplog):
    with caplog.at_level(logging.WARNING, logger="facebooth"):
        b = InsightFaceBackend([str(ins_root)], "antelopev2", providers=["CUDA", "NoSuchThing"])
    assert b.providers == ["CPUExecutionProvider"] and len(b.warnings) == 2
    assert b._det.session.get_providers() == ["CPUExecutionProvider"]
    assert b._rec.session.get_providers() == ["CPUExecutionProvider"]
    assert "CUDA" in caplog.text and "NoSuchThing" in caplog.text


def test_missing_insightface_says_what_to_install(ins_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(InsightFaceUnavailableError) as err:
        InsightFaceBackend([str(ins_root)], "antelopev2")
    msg = str(err.value)
    assert "insightface is not installed" in msg
    assert "pip install insightface onnxruntime" in msg and "PyTorch" in msg
    assert isinstance(err.value, ImportError)


def test_missing_onnxruntime_says_what_to_install(ins_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(InsightFaceUnavailableError, match=r"onnxruntime is not installed[\s\S]*pip install insightface onnxruntime"):
        InsightFaceBackend([str(ins_root)], "antelopev2")


@pytest.mark.slow  # a fresh interpreter importing torch: 6-18 s on the shared 2-core machine
def test_import_is_lazy(ins_root):
    code = textwrap.dedent(f"""
        import sys, torch
        import facebooth.pipelines.face.insightface_backend as m
        import facebooth.pipelines.face.insightface_layout
        heavy = [n for n in ("insightface", "onnxruntime", "onnx", "cv2") if n in sys.modules]
        assert not heavy, heavy
        m.InsightFaceBackend([{str(ins_root)!r}], "antelopev2")
        assert "insightface" in sys.modules and "onnxruntime" in sys.modules
    """)
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)
