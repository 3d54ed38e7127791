"""PortraitBooth defaults that follow the paper and the published weights (issue 10, point 2): shallow-only identity
features, FastComposer's delayed subject conditioning (0.2) or a STEA file's own recommended value, FastComposer's
masked noise loss, and the {man, woman} training class set."""
from __future__ import annotations

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
from helpers import comfy_inprocess


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
        _ = fcl.load_stea(bad).recommended_start_at


# ------------------------------------------------------------------- the node's start_at default (in-process ComfyUI)


def _faces(n: int = 1):
    import torch.nn.functional as F

    from facebooth.pipelines.face.types import Face, FaceSet

    g = torch.Generator().manual_seed(3)
    faces = [Face(image_index=i, box=(0.0, 0.0, 64.0, 64.0), score=1.0, landmarks=torch.zeros(5, 2), mask=torch.ones(64, 64),
                  crops={"clip_224": torch.rand(224, 224, 3, generator=g)}, embedding=F.normalize(torch.randn(512, generator=g), dim=0))
             for i in range(n)]
    return FaceSet(images=torch.rand(n, 64, 64, 3, generator=g), faces=faces, missing=[])


def _ranges(conditioning) -> list[tuple[float, float]]:
    return [(round(d.get("start_percent", 0.0), 6), round(d.get("end_percent", 1.0), 6)) for _, d in conditioning]


@pytest.mark.slow
def test_conditioning_node_starts_the_identity_where_the_weights_recommend(comfy, tmp_path):
    _, clip, _ = comfy_inprocess.load_checkpoint()
    from facebooth.nodes import portraitbooth as pbn

    deep = pbm.random_postfuse(feature_dim=512, seed=4, source="arcface", layers=("embedding",))
    stored = fcl.load_stea(fcl.save_stea(deep, tmp_path / "s.safetensors", {S.START_AT_KEY: 0.35}))
    plain = fcl.load_stea(fcl.save_stea(deep, tmp_path / "p.safetensors"))
    text = "a photo of a man"
    with torch.inference_mode():
        def run(stea, *a):
            return pbn.PortraitBoothConditioning.execute(pbn._wrap(stea, "x"), clip, _faces(), text, "man", *a).result[0]
        assert _ranges(run(_fastcomposer_stea())) == [(0.0, 0.2), (0.2, 1.0)]  # FastComposer: text only for the first 20 %
        assert _ranges(run(stored)) == [(0.0, 0.35), (0.35, 1.0)]  # the file's own value
        assert _ranges(run(plain)) == [(0.0, 1.0)]  # no recommendation: identity throughout
        assert _ranges(run(_fastcomposer_stea(), 0.0)) == [(0.0, 1.0)]  # an explicit value wins
