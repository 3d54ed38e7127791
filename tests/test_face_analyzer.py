"""Face-analysis policies (which face, no face), input handling, identity averaging and identity files."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facebooth.pipelines.face.align import ARCFACE_TEMPLATE_112
from facebooth.pipelines.face.analyzer import (
    FaceAnalyzer,
    FaceInputError,
    NoFaceError,
    cosine_similarity,
    identity_from_faces,
    to_rgb_batch,
)
from facebooth.pipelines.face.identity_io import load_identity, save_identity
from facebooth.pipelines.face.types import DetectedFace
from facebooth.utils.files import UnsafeFileError


def face_at(cx: float, cy: float, size: float, score: float = 0.9) -> DetectedFace:
    """A detection whose 5 landmarks are the ArcFace template scaled into a box of ``size`` at (cx, cy)."""
    lm = (ARCFACE_TEMPLATE_112.float() - 56.0) * (size / 112.0) + torch.tensor([cx, cy])
    half = size / 2
    return DetectedFace(box=(cx - half, cy - half, cx + half, cy + half), score=score, landmarks=lm)


class ScriptedDetector:
    """Returns pre-set detections keyed by the image's mean grey level (test images are flat colours)."""

    name = "scripted"

    def __init__(self, by_level: dict[int, list[DetectedFace]]):
        self.by_level = by_level
        self.seen_sizes: list[tuple[int, int]] = []

    def detect(self, image: torch.Tensor) -> list[DetectedFace]:
        self.seen_sizes.append(tuple(image.shape[:2]))
        return list(self.by_level.get(round(float(image.mean()) * 10), []))


class MeanColourRecognizer:
    """A deterministic recognizer: embedding = normalised mean colour of crop quadrants (12-d)."""

    name = "quadrant-colour"
    input_size = 112

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        q = F.adaptive_avg_pool2d(aligned.permute(0, 3, 1, 2), 2).flatten(1)
        return F.normalize(q + 1e-3, dim=-1)


def flat(level: int, n: int = 1, size: int = 256) -> torch.Tensor:
    return torch.full((n, size, size, 3), level / 10.0)


THREE_FACES = [face_at(200, 128, 60), face_at(60, 128, 90), face_at(130, 128, 40)]


def analyzer(by_level):
    return FaceAnalyzer(detector=ScriptedDetector(by_level), recognizer=MeanColourRecognizer(), name="test")


def test_largest_index_and_all_left_to_right():
    a = analyzer({5: THREE_FACES})
    largest = a.analyze(flat(5), select="largest")
    assert [f.box[0] for f in largest.faces] == [15.0]
    allf = a.analyze(flat(5), select="all")
    assert [round(f.box[0]) for f in allf.faces] == [15, 110, 170]
    second = a.analyze(flat(5), select="index", index=1)
    assert round(second.faces[0].box[0]) == 110
    with pytest.raises(FaceInputError, match="only 3 face"):
        a.analyze(flat(5), select="index", index=3)


def test_no_face_policies_name_the_image():
    a = analyzer({5: THREE_FACES})
    batch = torch.cat([flat(5), flat(2), flat(5)])
    with pytest.raises(NoFaceError, match=r"image 1 \(0-based\) of the batch of 3"):
        a.analyze(batch, no_face="error")
    skipped = a.analyze(batch, no_face="skip")
    assert skipped.missing == [1] and [f.image_index for f in skipped.faces] == [0, 2]
    passed = a.analyze(batch, no_face="pass_through")
    assert passed.missing == [1] and passed.no_face_policy == "pass_through"


def test_crops_masks_and_embeddings_are_produced():
    a = analyzer({5: THREE_FACES})
    fs = a.analyze(flat(5), select="largest")
    face = fs.faces[0]
    assert face.crops["arcface_112"].shape == (112, 112, 3)
    assert face.crops["clip_224"].shape == (224, 224, 3)
    assert face.crops["ffhq_512"].shape == (512, 512, 3)
    assert face.mask.shape == (256, 256) and 0 < float(face.mask.mean()) < 0.3
    assert face.embedding is not None and abs(float(face.embedding.norm()) - 1) < 1e-5


def test_aligned_mode_skips_the_detector():
    det = ScriptedDetector({})
    a = FaceAnalyzer(detector=det, recognizer=MeanColourRecognizer())
    fs = a.analyze(flat(3, n=2, size=112), mode="aligned")
    assert len(fs.faces) == 2 and det.seen_sizes == []
    # an aligned 112 crop warps onto itself: the crop equals the image
    torch.testing.assert_close(fs.faces[0].crops["arcface_112"], fs.images[0], atol=1e-4, rtol=0)


def test_aligned_mode_without_detector_and_detect_mode_error():
    a = FaceAnalyzer(detector=None, recognizer=MeanColourRecognizer())
    assert len(a.analyze(flat(3), mode="aligned").faces) == 1
    with pytest.raises(FaceInputError, match="aligned crop"):
        a.analyze(flat(3), mode="detect")


def test_grayscale_rgba_and_tiny_inputs():
    assert to_rgb_batch(torch.rand(2, 40, 50, 1)).shape == (2, 40, 50, 3)
    rgba = torch.rand(1, 40, 50, 4)
    torch.testing.assert_close(to_rgb_batch(rgba), rgba[..., :3])
    assert to_rgb_batch(torch.rand(40, 50, 3)).shape == (1, 40, 50, 3)
    with pytest.raises(FaceInputError, match="too small"):
        to_rgb_batch(torch.rand(1, 8, 8, 3))
    with pytest.raises(FaceInputError, match="channels"):
        to_rgb_batch(torch.rand(1, 40, 40, 2))


def test_huge_images_are_detected_at_reduced_size_and_mapped_back():
    face = face_at(1000, 1500, 600)
    det = ScriptedDetector({5: [face]})
    a = FaceAnalyzer(detector=det, recognizer=MeanColourRecognizer(), det_size=0)  # no cap: MAX_DETECT_SIDE only
    fs = a.analyze(flat(5, size=3200), crops=("arcface_112",))
    assert max(det.seen_sizes[0]) == 1600
    # the scripted detector answered in the small image's pixels, so the mapped box is twice as large
    assert fs.faces[0].box == tuple(v * 2 for v in face.box)


def test_detection_size_cap_like_insightface_det_size():
    face = face_at(100, 150, 60)
    det = ScriptedDetector({5: [face]})
    a = FaceAnalyzer(detector=det, recognizer=MeanColourRecognizer())  # default cap 640, as insightface
    fs = a.analyze(flat(5, size=1280), crops=("arcface_112",))
    assert det.seen_sizes == [(640, 640)]
    assert fs.faces[0].box == tuple(v * 2 for v in face.box)
    torch.testing.assert_close(fs.faces[0].landmarks, (face.landmarks + 0.5) * 2 - 0.5)  # pixel centres
    small = ScriptedDetector({5: []})
    FaceAnalyzer(detector=small, recognizer=None, det_size=2048).analyze(flat(5, size=512), no_face="skip")
    assert small.seen_sizes == [(512, 512)]  # never enlarged


def test_detection_shrink_is_a_proper_average():
    """Block averaging then antialiased bilinear: a 4x shrink of a 2x2 checkerboard is flat grey; the reference
    for the size rule is round(side * scale)."""
    from facebooth.pipelines.face.analyzer import shrink_for_detection

    board = ((torch.arange(1000)[:, None] + torch.arange(800)[None, :]) % 2).float()[..., None].expand(1000, 800, 3)
    small = shrink_for_detection(board, 0.25)
    assert small.shape == (250, 200, 3)
    torch.testing.assert_close(small, torch.full_like(small, 0.5), atol=1e-5, rtol=0)
    ramp = torch.linspace(0, 1, 1000)[:, None, None].expand(1000, 800, 3)
    out = shrink_for_detection(ramp, 0.3)
    want = torch.nn.functional.interpolate(ramp.permute(2, 0, 1)[None], size=out.shape[:2], mode="area")[0].permute(1, 2, 0)
    assert (out - want).abs().max() < 0.01


def test_masks_are_lazy_and_pasted_only_where_the_face_is():
    """The hull mask is built in the face's crop frame when read; the reference is the oval drawn at full size."""
    from facebooth.pipelines.face.masks import landmark_hull_mask

    face = face_at(300, 260, 120)
    a = FaceAnalyzer(detector=ScriptedDetector({5: [face]}), recognizer=None)
    fs = a.analyze(flat(5, size=512), crops=("arcface_112",))
    f = fs.faces[0]
    assert "_mask" in f.__dict__ and not isinstance(f.__dict__["_mask"], torch.Tensor)  # nothing built yet
    mask = f.mask
    ref = landmark_hull_mask(face.landmarks, 512, 512)
    assert mask.shape == (512, 512)
    assert ((mask > 0.5).float() - ref).abs().mean() < 0.01  # same oval up to the soft edge
    canvas = torch.zeros(512, 512)
    f.paste_mask(canvas)
    torch.testing.assert_close(canvas, mask)


def test_crops_are_sampled_once_each_and_only_when_read(monkeypatch):
    """Detect Faces offers every crop kind, but a kind nobody reads is never sampled; a read one is sampled once.
    The reference for the values is OpenCV's warpAffine with the same matrix (an independent implementation)."""
    import cv2
    import numpy as np

    from facebooth.pipelines.face import align

    calls: list[int] = []
    real = align.warp_affine
    monkeypatch.setattr(align, "warp_affine", lambda image, m, size, **kw: calls.append(size) or real(image, m, size, **kw))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 256, 256, 3, generator=g)
    face = face_at(128, 128, 90)
    fs = FaceAnalyzer(detector=ScriptedDetector({5: [face]}), recognizer=None).analyze(image.clamp(0.45, 0.55))
    f = fs.faces[0]
    assert calls == [] and set(f.crops) == {"arcface_112", "clip_224", "ffhq_512"} and len(f.crops) == 3
    crop = f.crops["arcface_112"]
    assert f.crops["arcface_112"] is crop and calls == [112]  # kept after the first read
    m = align.crop_matrix("arcface_112", face.landmarks).numpy().astype(np.float64)
    ref = cv2.warpAffine(image.clamp(0.45, 0.55)[0].numpy(), m, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    assert float(np.abs(crop.numpy() - ref).mean()) < 2e-3
    assert calls == [112] and "clip_224" not in repr(f.crops).split("sampled=")[1]
    with pytest.raises(KeyError):
        f.crops["not_a_kind"]


def test_identity_is_the_normalised_mean_and_round_trips(tmp_path):
    a = analyzer({5: THREE_FACES})
    images = torch.cat([flat(5), flat(5) * 0.5 + torch.rand(1, 256, 256, 3) * 0.5])
    fs = a.analyze(images, select="largest")
    ident = identity_from_faces(fs, "quadrant-colour")
    assert ident.count == 2
    expected = F.normalize(torch.stack([f.embedding for f in fs.faces]).mean(0), dim=0)
    torch.testing.assert_close(ident.embedding, expected)
    sims = cosine_similarity(ident, ident.per_face)
    assert sims.shape == (2,) and bool((sims > 0.5).all())
    path = save_identity(ident, tmp_path / "anna.safetensors")
    back = load_identity(path)
    torch.testing.assert_close(back.embedding, ident.embedding)
    torch.testing.assert_close(back.per_face, ident.per_face)
    assert back.recognizer == "quadrant-colour"
    assert not list(tmp_path.glob("*.tmp"))


def test_identity_file_errors(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UnsafeFileError, match="truncated or corrupt"):
        load_identity(bad)
    from safetensors.torch import save_file

    other = tmp_path / "y.safetensors"
    save_file({"foo": torch.zeros(3)}, str(other))
    with pytest.raises(UnsafeFileError, match="not a FaceBooth identity"):
        load_identity(other)
