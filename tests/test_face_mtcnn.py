"""Our torch MTCNN against facenet-pytorch's MTCNN with the same (real) weights on real photos."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facebooth.devmodels.face_models import copy_or_write_mtcnn, facenet_pytorch_data_dir
from facebooth.pipelines.face.mtcnn import MTCNNDetector, crop_resize_area, load_mtcnn, nms

HAVE_FACENET = facenet_pytorch_data_dir() is not None and importlib.util.find_spec("torchvision") is not None
needs_facenet = pytest.mark.skipif(
    not HAVE_FACENET, reason="facenet_pytorch (with torchvision) is not installed: no real MTCNN weights or reference"
)


def _insightface_image(name: str) -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface is not installed: its sample photo t1.jpg is not available")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB."""
    if name == "astronaut":
        skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photo")
        return np.ascontiguousarray(skimage_data.astronaut()[..., :3])
    from PIL import Image

    return np.asarray(Image.open(_insightface_image(name)).convert("RGB")).copy()


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).float() / 255.0


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    if not HAVE_FACENET:
        pytest.skip("facenet_pytorch is not installed: no real MTCNN weights")
    folder = tmp_path_factory.mktemp("mtcnn_real")
    paths = copy_or_write_mtcnn(folder)
    assert all(p.suffix == ".pt" for p in paths.values())
    return folder


@pytest.fixture(scope="module")
def detector(real_folder) -> MTCNNDetector:
    return load_mtcnn(real_folder)


@pytest.fixture(scope="module")
def reference():
    if not HAVE_FACENET:
        pytest.skip("facenet_pytorch is not installed")
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, device="cpu")


@pytest.fixture(scope="module")
def ours_on(detector):
    """Our detections per photo, computed once per module (t1.jpg costs about a second on CPU)."""
    cache: dict[str, list] = {}

    def get(photo: str):
        if photo not in cache:
            cache[photo] = detector.detect(_as_tensor(_photo(photo)))
        return cache[photo]

    return get


def _reference_faces(reference, arr: np.ndarray):
    from PIL import Image

    boxes, probs, points = reference.detect(Image.fromarray(arr), landmarks=True)
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    return np.asarray(boxes, dtype=np.float64), np.asarray(probs, dtype=np.float64), np.asarray(points, dtype=np.float64)


def _assert_same_faces(ours, ref, box_tol=2.0, mark_tol=2.0, score_tol=1e-3):
    ref_boxes, ref_scores, ref_points = ref
    assert len(ours) == len(ref_boxes), f"ours found {len(ours)} faces, facenet-pytorch {len(ref_boxes)}"
    our_boxes = np.array([f.box for f in ours]).reshape(-1, 4)
    used = set()
    for i in range(len(ref_boxes)):
        j = int(np.argmin(np.abs(our_boxes - ref_boxes[i]).max(axis=1)))
        assert j not in used, "two reference faces matched the same detection"
        used.add(j)
        face = ours[j]
        assert np.abs(our_boxes[j] - ref_boxes[i]).max() < box_tol
        assert np.abs(face.landmarks.numpy() - ref_points[i]).max() < mark_tol
        assert abs(face.score - ref_scores[i]) < score_tol
        assert face.landmarks.shape == (5, 2)


@needs_facenet
@pytest.mark.parametrize("photo", [pytest.param("t1.jpg", marks=pytest.mark.slow), "astronaut"])
def test_matches_facenet_pytorch_on_real_photos(ours_on, reference, photo):
    ref = _reference_faces(reference, _photo(photo))
    assert len(ref[0]) >= 1  # both photos show faces
    ours = ours_on(photo)
    _assert_same_faces(ours, ref)
    # best score first
    assert [f.score for f in ours] == sorted((f.score for f in ours), reverse=True)


@needs_facenet
def test_t1_has_several_faces_with_sane_landmarks(ours_on):
    faces = ours_on("t1.jpg")
    assert len(faces) >= 5
    for face in faces:
        x1, y1, x2, y2 = face.box
        lm = face.landmarks
        # eyes above the mouth corners, left-in-image before right-in-image, all inside the box (loosely)
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
        assert max(lm[0, 1], lm[1, 1]) < min(lm[3, 1], lm[4, 1])
        pad = 0.1 * (x2 - x1)
        assert (lm[:, 0] > x1 - pad).all() and (lm[:, 0] < x2 + pad).all()
        assert (lm[:, 1] > y1 - pad).all() and (lm[:, 1] < y2 + pad).all()


@needs_facenet
def test_grayscale_inputs_match_facenet_on_gray_photo(detector, reference):
    rgb = _photo("astronaut")
    gray = np.round(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    gray3 = np.repeat(gray[..., None], 3, axis=2)
    t = _as_tensor(gray3)
    _assert_same_faces(detector.detect(t), _reference_faces(reference, gray3))  # grayscale given as RGB
    small = t[::2, ::2]
    want = [f.box for f in detector.detect(small)]
    assert len(want) == 1
    assert [f.box for f in detector.detect(small[..., :1])] == want  # single channel
    assert [f.box for f in detector.detect(small[..., 0])] == want  # (H, W)


@needs_facenet
def test_rgba_alpha_is_ignored(detector, ours_on):
    rgb = _as_tensor(_photo("astronaut"))
    alpha = torch.rand(rgb.shape[0], rgb.shape[1], 1)
    plain = ours_on("astronaut")
    with_alpha = detector.detect(torch.cat([rgb, alpha], dim=2))
    assert len(plain) == len(with_alpha) == 1
    assert plain[0].box == with_alpha[0].box
    assert torch.equal(plain[0].landmarks, with_alpha[0].landmarks)


@needs_facenet
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_blank_image_has_no_faces(detector, value):
    assert detector.detect(torch.full((240, 320, 3), value)) == []


@needs_facenet
def test_tiny_image_gives_no_faces_instead_of_failing(detector):
    assert detector.detect(torch.rand(16, 16, 3)) == []


@needs_facenet
def test_uint8_and_batch_inputs(detector, ours_on):
    arr = _photo("astronaut")
    float_faces = ours_on("astronaut")
    assert [f.box for f in detector.detect(torch.from_numpy(arr))] == [f.box for f in float_faces]
    small = torch.from_numpy(arr[::2, ::2].copy()).float() / 255
    batch = torch.stack([small, torch.zeros_like(small), small.flip(1)])
    per_image = detector.detect_batch(batch)
    assert len(per_image) == 3 and per_image[1] == []
    for got, single in zip((per_image[0], per_image[2]), (small, small.flip(1))):
        want = detector.detect(single)
        assert len(got) == len(want) >= 1
        assert np.allclose([f.box for f in got], [f.box for f in want], atol=1e-3)


@needs_facenet
def test_min_face_size_and_thresholds_are_honoured(real_folder, ours_on):
    img = _as_tensor(_photo("t1.jpg"))
    base = ours_on("t1.jpg")
    # O-Net's threshold acts before its NMS, and a box is only suppressed by a higher-scoring one,
    # so a stricter last threshold keeps exactly the confident part of the default result.
    strict = load_mtcnn(real_folder, thresholds=(0.6, 0.7, 0.9999)).detect(img)
    assert 0 < len(strict) < len(base)
    assert [f.box for f in strict] == [f.box for f in base if f.score > 0.9999]
    # Faces smaller than min_face_size are not searched for.
    big_only = load_mtcnn(real_folder, min_face_size=120).detect(img)
    assert len(big_only) < len(base)
    assert all(f.box[2] - f.box[0] > 60 for f in big_only)


def test_bad_inputs_and_settings_raise_clear_errors(tmp_path):
    paths = copy_or_write_mtcnn(tmp_path, prefer_real=False)
    det = load_mtcnn(tmp_path)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        det.detect(torch.rand(3, 64, 64, 3))
    with pytest.raises(ValueError, match="NaN"):
        det.detect(torch.full((64, 64, 3), float("nan")))
    with pytest.raises(ValueError, match="thresholds"):
        load_mtcnn(tmp_path, thresholds=(0.6, 1.5, 0.7))
    with pytest.raises(ValueError, match="min_face_size"):
        load_mtcnn(tmp_path, min_face_size=0)
    assert set(paths) == {"pnet", "rnet", "onet"}


def test_random_weight_fallback_writes_loadable_safetensors(tmp_path):
    paths = copy_or_write_mtcnn(tmp_path, prefer_real=False)
    assert all(p.suffix == ".safetensors" for p in paths.values())
    det = load_mtcnn(tmp_path)
    faces = det.detect(torch.rand(96, 128, 3))
    assert isinstance(faces, list)
    for f in faces:
        assert f.landmarks.shape == (5, 2) and 0.0 <= f.score <= 1.0


@needs_facenet
def test_safetensors_copy_gives_identical_results(real_folder, tmp_path):
    from facebooth.utils.files import atomic_save_safetensors, load_state_dict_file

    for name in ("pnet", "rnet", "onet"):
        state, _ = load_state_dict_file(real_folder / f"{name}.pt")
        atomic_save_safetensors(state, tmp_path / f"{name}.safetensors")
    img = _as_tensor(_photo("astronaut"))
    a, b = load_mtcnn(real_folder).detect(img), load_mtcnn(tmp_path).detect(img)
    assert [f.box for f in a] == [f.box for f in b]


def test_loader_names_missing_file_and_folder(tmp_path):
    copy_or_write_mtcnn(tmp_path, prefer_real=False)
    (tmp_path / "onet.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_mtcnn(tmp_path)
    assert "onet" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mtcnn(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="rnet"):
        load_mtcnn({"pnet": tmp_path / "pnet.safetensors", "rnet": tmp_path / "x.pt", "onet": tmp_path / "y.pt"})


def test_loader_refuses_swapped_and_duplicate_files(tmp_path):
    paths = copy_or_write_mtcnn(tmp_path, prefer_real=False)
    with pytest.raises(ValueError, match="RNet"):
        load_mtcnn({"pnet": paths["pnet"], "rnet": paths["onet"], "onet": paths["onet"]})
    torch.save({"x": torch.zeros(1)}, tmp_path / "pnet.pt")
    with pytest.raises(ValueError, match="several versions"):
        load_mtcnn(tmp_path)


def test_nms_matches_torchvision():
    tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is the independent NMS reference")
    gen = torch.Generator().manual_seed(3)
    n = 1500
    xy = torch.rand(n, 2, generator=gen) * 300
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 60], dim=1)
    scores = torch.rand(n, generator=gen)
    groups = torch.randint(0, 3, (n,), generator=gen)
    for thr in (0.3, 0.5, 0.7):
        ours = nms(boxes, scores, groups, thr, block=400)  # several blocks
        assert torch.equal(ours, tv_ops.batched_nms(boxes, scores, groups, thr))


@needs_facenet
def test_min_mode_nms_matches_facenet_numpy_rule():
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy

    gen = torch.Generator().manual_seed(4)
    n = 400
    xy = torch.rand(n, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 40], dim=1)
    scores = torch.rand(n, generator=gen)
    groups = torch.randint(0, 2, (n,), generator=gen)
    ours = nms(boxes, scores, groups, 0.7, mode="min")
    ref = batched_nms_numpy(boxes, scores, groups, 0.7, "Min")
    assert sorted(ours.tolist()) == sorted(ref.tolist())


def test_area_crops_equal_interpolate_and_read_from_a_channels_last_view():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 57, 83, 3, generator=gen).permute(0, 3, 1, 2)  # the detector's NCHW view of HWC images
    windows = torch.tensor([[0, 0, 83, 57], [5, 7, 30, 40], [10, 3, 19, 10], [60, 20, 83, 57], [1, 1, 2, 2]])
    owner = torch.tensor([0, 1, 0, 1, 0])
    for size in (24, 48):
        got = crop_resize_area(images, owner, windows, size)
        for k, (x0, y0, x1, y1) in enumerate(windows.tolist()):
            crop = images[owner[k], :, y0:y1, x0:x1][None].contiguous()
            want = F.interpolate(crop, size=(size, size), mode="area")[0]
            assert torch.allclose(got[k], want, atol=1e-6), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@needs_facenet
def test_cuda_matches_cpu(real_folder):
    img = _as_tensor(_photo("t1.jpg"))
    cpu = load_mtcnn(real_folder, device="cpu").detect(img)
    gpu = load_mtcnn(real_folder, device="cuda").detect(img)
    assert len(cpu) == len(gpu)
    assert np.allclose([f.box for f in cpu], [f.box for f in gpu], atol=0.5)
    assert np.allclose([f.score for f in cpu], [f.score for f in gpu], atol=1e-3)
