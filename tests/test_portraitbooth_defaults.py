"""PortraitBooth defaults that follow the paper and the published weights (issue 10, point 2): shallow-only identity
features, FastComposer's delayed subject conditioning (0.2) or a STEA file's own recommended value, FastComposer's
masked noise loss, and the {man, woman} training class set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facebooth.devmodels import portraitbooth_models as pbm
from facebooth.pipelines.face.analyzer import FaceAnalyzer
from facebooth.pipelines.portraitbooth import fastcomposer_loading as fcl
from facebooth.pipelines.portraitbooth import losses as L
from facebooth.pipelines.portraitbooth import stea as S


def test_identity_features_default_to_shallow_recognizer_layers(tmp_path):
    shallow = {"layer1", "layer2", "layer3"}  # the final stage and the identity embedding are the deep end
    assert S.DEFAULT_ARCFACE_LAYERS and set(S.DEFAULT_ARCFACE_LAYERS) <= shallow
    assert "embedding" in S.SHALLOW_AND_DEEP_LAYERS  # the other choice stays available
    from facebooth.training import train_portraitbooth as tp

    args = tp.build_parser().parse_args(["--pretrained-model", "x", "--arcface", "y", "--data-dir", "z", "--output-dir", "o"])
    assert set(args.arcface_layers) <= shallow
    model = fcl.load_stea(pbm.write_random_stea(tmp_path / "stea.safetensors", arcface_widths=(8, 16, 24, 32), num_features=20))
    assert set(model.config.arcface_layers) <= shallow and model.needs_backbone
    deep = fcl.load_stea(pbm.write_random_stea(tmp_path / "deep.safetensors", layers=S.SHALLOW_AND_DEEP_LAYERS,
                                               arcface_widths=(8, 16, 24, 32), num_features=20))
    assert deep.config.feature_dim == 24 + 20


def test_masked_noise_loss_is_fastcomposers_plain_mean():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 1:5, 2:6] = 1.0
    mask[:, :, 5, 2:6] = 0.5  # soft edge, as the area-resized face mask has
    use = torch.tensor([True, False, True])
    got = L.noise_loss(pred, target, mask, use)
    # FastComposer: pred * mask and target * mask for the masked samples, then MSE with reduction "mean"
    m = torch.stack([mask[i] if use[i] else torch.ones_like(mask[i]) for i in range(3)])
    ref = ((pred * m - target * m) ** 2).sum() / pred.numel()
    torch.testing.assert_close(got, ref)
    # a masked sample weighs its face share of a full sample (area-normalising would weigh it as a full one)
    all_masked = L.noise_loss(pred, target, mask, torch.ones(3, dtype=torch.bool))
    assert float(all_masked) < 0.5 * float(L.noise_loss(pred, target))


def _png(path: Path) -> None:
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(path)


def test_training_class_set_is_man_and_woman(tmp_path):
    from facebooth.training import portraitbooth_data as pdata

    assert tuple(L.IDENTITY_WORDS) == ("man", "woman")
    assert pdata.build_parser().parse_args(["--input", "i", "--output", "o"]).identity_words == ["man", "woman"]
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem, caption in {"a": "a photo of a man", "b": "a photo of a person smiling", "c": "a girl in a park"}.items():
        _png(raw / f"{stem}.png")
        (raw / f"{stem}.txt").write_text(caption)
    analyzer = FaceAnalyzer(detector=None, recognizer=None, name="aligned")
    index = pdata.prepare_dataset(raw, tmp_path / "out", analyzer, resolution=32, mode="aligned")
    assert index["items"] == ["a"] and index["identity_words"] == ["man", "woman"]
    assert "names none" in index["skipped"]["b"] and "names none" in index["skipped"]["c"]
    broad = pdata.prepare_dataset(raw, tmp_path / "broad", analyzer, resolution=32, mode="aligned",
                                  identity_words=L.BROAD_IDENTITY_WORDS)
    assert broad["items"] == ["a", "b", "c"]


def _fastcomposer_stea() -> S.STEAModel:
    parts = fcl.FastComposerParts(unet={}, vae={}, text_encoder={},
                                  image_encoder=pbm.random_vision_encoder(seed=2).state_dict(),
                                  postfuse=pbm.random_postfuse(seed=1).fuse.state_dict())
    return fcl.stea_from_fastcomposer(parts, source="fc.bin")


def test_recommended_delayed_conditioning_from_the_weights(tmp_path):
    assert _fastcomposer_stea().recommended_start_at == pytest.approx(0.2)
    plain = pbm.write_random_stea(tmp_path / "plain.safetensors", arcface_widths=(8, 16, 24, 32), num_features=20)
    assert fcl.load_stea(plain).recommended_start_at == 0.0
    model = fcl.load_stea(plain)
    stored = fcl.save_stea(model, tmp_path / "stored.safetensors", {S.START_AT_KEY: 0.35})
    assert fcl.load_stea(stored).recommended_start_at == pytest.approx(0.35)
    bad = fcl.save_stea(model, tmp_path / "bad.safetensors", {S.START_AT_KEY: "lots"})
    with pytest.raises(S.STEAError, match="recommended_start_at"):
        fcl.load_stea(bad).recommended_start_at
