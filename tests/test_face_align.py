"""Alignment checked against independent implementations: scikit-image, OpenCV and insightface's norm_crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facebooth.pipelines.face import align
from facebooth.pipelines.face.masks import landmark_hull_mask, warp_mask_to_image

skimage = pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")

# Plausible 5 landmarks of the astronaut's face in skimage.data.astronaut() (512×512).
ASTRONAUT_LM = torch.tensor([[182.0, 108.0], [232.0, 104.0], [210.0, 135.0], [188.0, 163.0], [232.0, 160.0]])


def astronaut() -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(data.astronaut()).float() / 255.0


def test_similarity_matches_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, size=(5, 2))
    dst = align.ARCFACE_TEMPLATE_112.numpy()
    ref = SimilarityTransform.from_estimate(src, dst) if hasattr(SimilarityTransform, "from_estimate") else None
    if ref is None:
        ref = SimilarityTransform()
        ref.estimate(src, dst)
    ours = align.estimate_similarity(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    np.testing.assert_allclose(ours, ref.params[:2], rtol=1e-9, atol=1e-9)


def test_similarity_recovers_exact_transform():
    angle, scale, t = 0.3, 1.7, torch.tensor([5.0, -3.0], dtype=torch.float64)
    rot = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float64)
    src = torch.rand(5, 2, dtype=torch.float64) * 100
    dst = src @ (scale * rot).T + t
    m = align.estimate_similarity(src, dst)
    torch.testing.assert_close(m[:, :2], scale * rot)
    torch.testing.assert_close(m[:, 2], t)


@pytest.mark.parametrize("size", [112, 224])
def test_arcface_crop_matches_insightface_norm_crop(size):
    face_align = pytest.importorskip("insightface.utils.face_align")
    img = astronaut()
    rgb_u8 = (img * 255).round().to(torch.uint8).numpy()
    ref = face_align.norm_crop(rgb_u8, ASTRONAUT_LM.numpy(), image_size=size).astype(np.float32) / 255.0
    ours = align.warp_affine(img, align.arcface_matrix(ASTRONAUT_LM, size), size).numpy()
    # cv2 interpolates in fixed point on uint8 data; agreement to ~1 grey level on average is exact enough
    assert np.abs(ours - ref).mean() < 2.0 / 255
    assert np.abs(ours - ref).max() < 0.1


def test_warp_matches_cv2_with_downscaling_off():
    img = astronaut()
    m = align.ffhq_matrix(ASTRONAUT_LM, 256)
    ref = cv2.warpAffine(img.numpy(), m.numpy(), (256, 256), flags=cv2.INTER_LINEAR, borderValue=0)
    ours = align.warp_affine(img, m, 256, antialias=False).numpy()
    assert np.abs(ours - ref).mean() < 1e-3


def test_ffhq_crop_puts_eyes_level_and_centred():
    m = align.ffhq_matrix(ASTRONAUT_LM, 512)
    eyes = align.transform_points(m, ASTRONAUT_LM[:2].double())
    # the quad is oriented by eyes and mouth together, so the eye line is nearly (not exactly) level
    assert abs(float(eyes[0, 1] - eyes[1, 1])) < 5
    assert abs(float(eyes[:, 0].mean()) - 255.5) < 10
    assert 200 < float(eyes[:, 1].mean()) < 270  # FFHQ puts the eyes just above the middle


def test_antialiased_warp_of_huge_image_is_close_to_plain_warp_of_smooth_image():
    # On a smooth image antialiasing changes little; on noise it removes aliasing energy.
    big = torch.nn.functional.interpolate(astronaut().permute(2, 0, 1)[None], scale_factor=8, mode="bilinear")[0].permute(1, 2, 0)
    lm = ASTRONAUT_LM * 8
    m = align.arcface_matrix(lm, 112)
    plain = align.warp_affine(big, m, 112, antialias=False)
    smooth = align.warp_affine(big, m, 112, antialias=True)
    assert (plain - smooth).abs().mean() < 0.03


def test_hull_mask_covers_landmarks_and_warps_back():
    mask = landmark_hull_mask(ASTRONAUT_LM, 512, 512)
    for x, y in ASTRONAUT_LM.long().tolist():
        assert mask[y, x] == 1.0
    assert mask[10, 10] == 0.0 and mask[500, 500] == 0.0
    frac = float(mask.mean())
    assert 0.01 < frac < 0.2
    crop_mask = torch.ones(64, 64)
    m = align.arcface_matrix(ASTRONAUT_LM, 64)
    back = warp_mask_to_image(crop_mask, align.invert_affine(m), 512, 512)
    for x, y in ASTRONAUT_LM.long().tolist():
        assert back[y, x] > 0.99
    assert back[500, 500] == 0.0
