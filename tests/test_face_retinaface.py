"""RetinaFace detector on facexlib's network: our detect() against facexlib's own detect_faces on the same
random weights (facexlib's preprocessing, priors, decoding and NMS are the reference), strict loading errors."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("facexlib") is None, reason="facexlib is not installed")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from facebooth.devmodels.face_models import write_random_retinaface

    return write_random_retinaface(tmp_path_factory.mktemp("retinaface") / "detection_Resnet50_Final.pth", seed=1)


def test_detections_equal_facexlib_detect_faces(weights):
    from facebooth.pipelines.face.retinaface import build_retinaface, load_retinaface

    ours = load_retinaface(weights, conf_threshold=0.5)
    ref = build_retinaface()
    ref.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    ref.eval()
    image = torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(2))
    found = ours.detect(image)
    bgr = (image.numpy()[..., ::-1] * 255).astype(np.float32)  # facexlib takes BGR 0..255
    with torch.no_grad():
        want = ref.detect_faces(bgr, conf_threshold=0.5, nms_threshold=0.4)
    assert len(found) == len(want) > 0  # random weights: some priors pass 0.5
    np.testing.assert_allclose(np.array([f.box for f in found]), want[:, :4], atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(np.array([f.score for f in found]), want[:, 4], atol=1e-5)
    np.testing.assert_allclose(np.stack([f.landmarks.numpy().reshape(-1) for f in found]), want[:, 5:], atol=1e-3, rtol=1e-4)


def test_loading_errors_are_clear(tmp_path, weights):
    from facebooth.pipelines.face.retinaface import load_retinaface

    with pytest.raises(FileNotFoundError, match="detection_Resnet50_Final.pth"):
        load_retinaface(tmp_path / "nothere.pth")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 256, 1, 1)  # 3 anchors instead of 2
    del state["fpn.output1.0.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 missing key\(s\): fpn.output1.0.weight.*wrong shape: ClassHead.0.conv1x1.weight"):
        load_retinaface(tmp_path / "bad.pth")
