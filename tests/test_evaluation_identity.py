"""Identity scores of the evaluation: FaceNet against facenet-pytorch, ArcFace (InsightFace backend) against
insightface's own FaceAnalysis, and the protocols' no-face / distance rules.

References are other libraries run their own way: facenet-pytorch's InceptionResnetV1, MTCNN and
extract_face (the exact pipeline FastComposer's evaluation script uses), and insightface's FaceAnalysis.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

facenet_pytorch = pytest.importorskip("facenet_pytorch")

from facebooth.pipelines.evaluation.facenet import (  # noqa: E402
    FaceNetRecognizer,
    facenet_crop,
    inception_resnet_v1_from_state_dict,
    load_facenet,
)
from facebooth.pipelines.evaluation.identity import IdentityScorer  # noqa: E402
from facebooth.pipelines.face.analyzer import FaceAnalyzer  # noqa: E402


def _facenet_pytorch_random(seed: int):
    """facenet-pytorch's InceptionResnetV1 with random weights (with the 8631-class classifier, as the released
    file has), BatchNorm statistics measured on random images so the embedding depends on its input."""
    from facenet_pytorch import InceptionResnetV1 as Reference

    torch.manual_seed(seed)
    ref = Reference(pretrained=None, classify=True, num_classes=8631)
    ref.classify = False  # embeddings, not logits
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bn.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in ref.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.momentum = None  # cumulative average over the calibration batch
        ref.train()
        ref(_faces(8, seed + 100))
    return ref.eval()


def _faces(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (standardised like facenet-pytorch's post-processing), distinct from each other."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 10, 10, generator=g)
    return (torch.nn.functional.interpolate(low, size=160, mode="bilinear") * 255 - 127.5) / 128.0


@pytest.fixture(scope="module")
def reference_net():
    return _facenet_pytorch_random(0)


@pytest.fixture(scope="module")
def our_net(reference_net):
    return inception_resnet_v1_from_state_dict(reference_net.state_dict())


def test_inception_resnet_v1_equals_facenet_pytorch(reference_net, our_net):
    x = _faces(2, 1)
    with torch.no_grad():
        ref = reference_net(x)
        ours = our_net(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2))
    assert (ours[0] @ ours[1]).abs() < 0.999  # two inputs, two different embeddings


def test_load_facenet_file_with_classifier_and_bad_files(tmp_path, reference_net):
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(reference_net.state_dict(), path)  # as released: includes logits.weight / logits.bias
    assert "logits.weight" in reference_net.state_dict()
    rec = load_facenet(path)
    crops = _faces(3, 2) * 128.0 + 127.5
    with torch.no_grad():
        ref = reference_net((crops - 127.5) / 128.0)  # facenet-pytorch's fixed_image_standardization
    torch.testing.assert_close(rec.embed(crops), ref, atol=1e-5, rtol=0)

    with pytest.raises(FileNotFoundError, match="is missing in folder"):
        load_facenet(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an InceptionResnetV1"):
        load_facenet(bad)


def test_facenet_crop_equals_facenet_pytorch_extract_face():
    from facenet_pytorch.models.mtcnn import extract_face

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (200, 260, 3), dtype=np.uint8))
    for box in [(30.7, 20.2, 130.9, 150.4), (-5.5, 10.0, 90.0, 205.3), (200.2, 50.0, 280.0, 120.0)]:
        ref = extract_face(img, np.array(box), image_size=160, margin=0)
        torch.testing.assert_close(facenet_crop(img, box), ref, atol=0, rtol=0)


def _torch_analyzer(tmp_path, recognizer=None) -> FaceAnalyzer:
    from facebooth.devmodels.face_models import copy_or_write_mtcnn
    from facebooth.pipelines.face.mtcnn import load_mtcnn

    copy_or_write_mtcnn(tmp_path / "mtcnn")
    return FaceAnalyzer(detector=load_mtcnn(tmp_path / "mtcnn"), recognizer=recognizer)


def test_facenet_identity_equals_fastcomposer_evaluation_pipeline(tmp_path, reference_net, our_net):
    """Real MTCNN weights (facenet-pytorch's) on a real photo; FaceNet random. Reference: facenet-pytorch's
    MTCNN(image_size=160, margin=0, keep_all=True) + InceptionResnetV1, as FastComposer's evaluation runs them."""
    skimage = pytest.importorskip("skimage")
    from facebooth.devmodels.face_models import facenet_pytorch_data_dir

    if facenet_pytorch_data_dir() is None:
        pytest.skip("facenet-pytorch's MTCNN weights are not installed")
    from facenet_pytorch import MTCNN

    photo = Image.fromarray(skimage.data.astronaut())
    other = photo.transpose(Image.FLIP_LEFT_RIGHT).resize((400, 400), Image.BILINEAR)
    mtcnn = MTCNN(image_size=160, margin=0, post_process=True, keep_all=True)
    with torch.no_grad():
        ref_a = reference_net(mtcnn(photo)[:1])[0]
        ref_b = reference_net(mtcnn(other)[:1])[0]

    scorer = IdentityScorer(_torch_analyzer(tmp_path), model="facenet", facenet=FaceNetRecognizer(our_net))
    reference = scorer.reference([photo])
    (emb,) = scorer.embed([other])
    torch.testing.assert_close(reference[0], ref_a, atol=2e-4, rtol=0)
    torch.testing.assert_close(emb, ref_b, atol=2e-4, rtol=0)
    assert scorer.value(reference, emb) == pytest.approx(float(ref_a @ ref_b), abs=2e-4)


class _Stub:
    """A detector that finds a face only in bright images, and a recognizer that returns the mean colour."""

    name = "stub"
    input_size = 112

    def detect(self, image):
        if image.mean() < 0.5:
            return []
        h, w = image.shape[:2]
        from facebooth.pipelines.face.analyzer import aligned_crop_face

        return [aligned_crop_face(image)]

    def embed(self, aligned):
        return aligned.mean(dim=(1, 2))


def _img(value: float, colour=(1.0, 0.8, 0.6)) -> Image.Image:
    arr = (np.ones((64, 64, 3)) * np.array(colour) * value * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("rule,expected", [("exclude", math.nan), ("zero", 0.0), ("minus_one", -1.0)])
def test_no_face_rules(rule, expected):
    scorer = IdentityScorer(FaceAnalyzer(detector=_Stub(), recognizer=_Stub()), no_face=rule)
    ref = scorer.reference([_img(0.9)])
    embs = scorer.embed([_img(0.9), _img(0.2)])
    assert embs[1] is None and embs[0] is not None
    assert scorer.value(ref, embs[0]) == pytest.approx(1.0, abs=1e-5)
    v = scorer.value(ref, embs[1])
    assert (math.isnan(v) and math.isnan(expected)) or v == expected


def test_distance_score_and_clamp():
    stub = FaceAnalyzer(detector=_Stub(), recognizer=_Stub())
    dist = IdentityScorer(stub, score="l2_distance")
    ref = dist.reference([_img(0.9, (1.0, 0.6, 0.6))])
    (e,) = dist.embed([_img(0.9, (0.6, 0.6, 1.0))])
    expected = float((torch.nn.functional.normalize(torch.tensor([1.0, 0.6, 0.6]), dim=0)
                      - torch.nn.functional.normalize(torch.tensor([0.6, 0.6, 1.0]), dim=0)).norm())
    assert dist.value(ref, e) == pytest.approx(expected, abs=1e-2)
    clamped = IdentityScorer(stub, clamp_min=0.99)
    assert clamped.value(ref, e) == 0.99
    with pytest.raises(Exception, match="FaceNet"):
        IdentityScorer(stub, model="facenet")


def test_arcface_identity_equals_insightface_face_analysis(tmp_path):
    """InsightFace backend on a random-weight pack whose detector fires on red squares: our score (our 5-point
    alignment) against insightface's own FaceAnalysis embeddings (its norm_crop alignment)."""
    pytest.importorskip("insightface")
    pytest.importorskip("onnxruntime")
    from insightface.app import FaceAnalysis

    from facebooth.devmodels.insightface_packs import write_insightface_pack
    from facebooth.pipelines.face.insightface_backend import InsightFaceBackend
    from facebooth.pipelines.face.insightface_layout import find_pack

    root = tmp_path / "insightface"
    write_insightface_pack(root, "antelopev2")
    backend = InsightFaceBackend([str(root)], "antelopev2", providers=["CPU"])
    app = FaceAnalysis(name="antelopev2", root=find_pack([str(root)], "antelopev2"), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(640, 640))

    def square(x: int, y: int, size: int, seed: int) -> Image.Image:
        g = np.random.default_rng(seed)
        arr = (g.random((300, 420, 3)) * 0.15 * 255).astype(np.uint8)
        arr[y:y + size, x:x + size] = 0
        arr[y:y + size, x:x + size, 0] = 255
        arr[y + size // 3:y + size // 2, x + size // 4:x + size // 2, 1] = 200  # texture inside the "face"
        return Image.fromarray(arr)

    ref_img, gen_imgs = square(60, 60, 90, 0), [square(250, 150, 100, 1), square(100, 100, 120, 2)]
    scorer = IdentityScorer(FaceAnalyzer(detector=backend, recognizer=backend))
    reference = scorer.reference([ref_img])
    ours = [scorer.value(reference, e) for e in scorer.embed(gen_imgs)]

    def emb(im: Image.Image) -> np.ndarray:
        faces = app.get(np.ascontiguousarray(np.asarray(im)[:, :, ::-1]))
        return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])).normed_embedding

    theirs = [float(emb(ref_img) @ emb(g)) for g in gen_imgs]
    np.testing.assert_allclose(ours, theirs, atol=2e-2, rtol=0)
    assert abs(ours[0] - ours[1]) > 1e-3 or abs(theirs[0] - theirs[1]) < 1e-3
