"""ArcFace IResNet: official arcface_torch layout, file loading, and insightface's ArcFaceONNX as the
independent reference for preprocessing + forward."""
from __future__ import annotations

import hashlib
import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facebooth.devmodels.face_models import random_arcface_state_dict, write_random_arcface
from facebooth.pipelines.face.arcface import (
    ArcFaceRecognizer,
    config_from_state_dict,
    iresnet,
    iresnet_from_state_dict,
    load_arcface,
)

TINY = (8, 16, 16, 32)  # tiny widths: same key layout, fast

# sha256 over "key:shape:dtype" lines (sorted) of the state dict of insightface's own
# recognition/arcface_torch/backbones/iresnet.py (deepinsight/insightface 7fadd420), built with its
# defaults. Our modules must produce exactly this layout so official backbone.pth files load.
OFFICIAL_LAYOUT_SHA256 = {
    18: "1f250efdfd2f7262d5523d3f0e696b9b8e41d45f0cb21d72512ee39eb1cc9860",
    50: "043e7a9000ca7a6825559b8e744844d47ac9c346221f45fdd74e387e28160d00",
    100: "1d0f483cb7b9eeb3034e0e17598206da208886412ad4cc32c4bf6fe1664d99ee",
}
OFFICIAL_KEY_COUNT = {18: 187, 50: 475, 100: 925}


def _layout_sha(state) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("depth", [18, 50, 100])
def test_state_dict_layout_is_the_official_one(depth):
    with torch.device("meta"):  # shapes only, no memory
        state = iresnet(depth).state_dict()
    assert len(state) == OFFICIAL_KEY_COUNT[depth]
    assert _layout_sha(state) == OFFICIAL_LAYOUT_SHA256[depth]
    for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer4.1.bn3.weight", "bn2.bias", "fc.weight",
                "features.running_var"):
        assert key in state
    assert tuple(state["fc.weight"].shape) == (512, 512 * 7 * 7)


def _crops(n: int, seed: int = 0) -> torch.Tensor:
    """Aligned-crop stand-ins as 8-bit values, so a uint8 BGR copy carries exactly the same pixels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 112, 112, 3), generator=gen, dtype=torch.uint8).float() / 255.0


def _export_onnx(model: torch.nn.Module, path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, torch.randn(1, 3, 112, 112), str(path), dynamo=False,
                input_names=["input.1"], output_names=["embedding"],
                dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
            )
    except TypeError:  # torch without the dynamo switch: the legacy exporter is the only one
        torch.onnx.export(model, torch.randn(1, 3, 112, 112), str(path), input_names=["input.1"],
                          output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}})


def test_matches_insightface_arcface_onnx(tmp_path):
    for mod in ("insightface", "onnxruntime", "onnx", "cv2"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed: insightface's ArcFaceONNX is the reference here")
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    path = write_random_arcface(tmp_path / "backbone.pth", depth=18, seed=1, dtype=torch.float32, widths=TINY)
    rec = load_arcface(path)
    _export_onnx(rec.backbone, tmp_path / "r18.onnx")
    ref_model = ArcFaceONNX(str(tmp_path / "r18.onnx"))
    assert (ref_model.input_mean, ref_model.input_std) == (127.5, 127.5)  # the arcface_torch convention

    crops = _crops(3)
    bgr = [np.ascontiguousarray((c * 255).round().byte().numpy()[:, :, ::-1]) for c in crops]
    ref = torch.from_numpy(ref_model.get_feat(bgr)).float()  # insightface preprocesses BGR uint8 itself
    raw = rec.embed_raw(crops)
    assert raw.shape == ref.shape == (3, 512)
    scale = ref.abs().max()
    assert (raw - ref).abs().max() / scale < 1e-4
    emb = rec.embed(crops)
    assert torch.allclose(emb, torch.nn.functional.normalize(ref, dim=-1), atol=1e-4)
    # The check is sensitive to colour order: feeding BGR as if RGB gives a different embedding.
    swapped = rec.embed(crops.flip(-1))
    assert (swapped - emb).abs().max() > 1e-2


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip_gives_the_same_outputs(tmp_path, suffix):
    state = random_arcface_state_dict(18, seed=2, widths=TINY)
    direct = ArcFaceRecognizer(iresnet_from_state_dict(state))
    path = write_random_arcface(tmp_path / f"backbone{suffix}", depth=18, seed=2, dtype=torch.float32, widths=TINY)
    loaded = load_arcface(path)
    x = _crops(2)
    torch.testing.assert_close(loaded.embed(x), direct.embed(x), atol=1e-6, rtol=0)
    emb = loaded.embed(x)
    assert emb.shape == (2, 512)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # A different seed is a different model.
    other = load_arcface(write_random_arcface(tmp_path / f"o{suffix}", depth=18, seed=3, dtype=torch.float32, widths=TINY))
    assert (other.embed(x) - emb).abs().max() > 1e-2


def test_fp16_file_loads_and_computes_in_float32(tmp_path):
    path = write_random_arcface(tmp_path / "backbone.pth", depth=18, seed=4, widths=TINY)  # default fp16
    assert torch.load(path, weights_only=True)["fc.weight"].dtype == torch.float16
    rec = load_arcface(path)
    assert rec.backbone.fc.weight.dtype == torch.float32
    state = random_arcface_state_dict(18, seed=4, widths=TINY)
    rounded = {k: (v.half().float() if v.is_floating_point() else v) for k, v in state.items()}
    x = _crops(2)
    assert torch.allclose(rec.embed(x), ArcFaceRecognizer(iresnet_from_state_dict(rounded)).embed(x), atol=1e-6)


@pytest.mark.parametrize("depth,layers", [(18, (2, 2, 2, 2)), (50, (3, 4, 14, 3)), (100, (3, 13, 30, 3))])
def test_depth_is_inferred_from_the_keys(tmp_path, depth, layers):
    path = write_random_arcface(tmp_path / "backbone.pth", depth=depth, widths=(4, 4, 4, 8), num_features=16)
    rec = load_arcface(path)
    assert rec.backbone.config.layers == layers
    assert rec.name == f"arcface_iresnet{depth}"
    assert rec.embed(_crops(1)).shape == (1, 16)


def test_module_prefix_and_missing_num_batches_tracked_are_accepted():
    state = random_arcface_state_dict(18, seed=5, widths=TINY)
    x = _crops(1)
    want = ArcFaceRecognizer(iresnet_from_state_dict(state)).embed(x)
    wrapped = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert torch.equal(ArcFaceRecognizer(iresnet_from_state_dict(wrapped)).embed(x), want)


def test_clear_errors_for_wrong_files(tmp_path):
    # Not an IResNet at all (an MTCNN net, for instance).
    from facebooth.devmodels.face_models import write_random_mtcnn

    paths = write_random_mtcnn(tmp_path / "mtcnn")
    with pytest.raises(ValueError, match="not an arcface_torch IResNet"):
        load_arcface(paths["pnet"])
    # Right family, a key renamed.
    state = random_arcface_state_dict(18, widths=TINY)
    state["layer2.0.bn9.weight"] = state.pop("layer2.0.bn3.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"1 missing key\(s\): layer2.0.bn3.weight; 1 unexpected key\(s\): layer2.0.bn9.weight"):
        load_arcface(tmp_path / "renamed.pth")
    # Right keys, a wrong shape.
    state = random_arcface_state_dict(18, widths=TINY)
    state["layer3.1.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="layer3.1.conv1.weight"):
        load_arcface(tmp_path / "shape.pth")
    # fc that does not fit 112x112 input.
    state = random_arcface_state_dict(18, widths=TINY)
    state["fc.weight"] = torch.zeros(512, 32 * 8 * 8)
    torch.save(state, tmp_path / "fc.pth")
    with pytest.raises(ValueError, match="112x112"):
        load_arcface(tmp_path / "fc.pth")
    # Missing file names the folder.
    with pytest.raises(FileNotFoundError) as err:
        load_arcface(tmp_path / "nothere" / "backbone.pth")
    assert "backbone.pth" in str(err.value) and str(tmp_path / "nothere") in str(err.value)


def test_embed_input_checks_and_gradient_to_the_crops():
    rec = ArcFaceRecognizer(iresnet_from_state_dict(random_arcface_state_dict(18, widths=TINY)))
    with pytest.raises(ValueError, match="112x112"):
        rec.embed(torch.rand(1, 128, 128, 3))
    with pytest.raises(ValueError, match=r"\(N, 112, 112, 3\)"):
        rec.embed(torch.rand(1, 3, 112, 112))
    # Frozen weights, but an identity loss can reach the input image.
    x = _crops(2).requires_grad_(True)
    rec.embed(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in rec.backbone.parameters())
    # Batching does not change results.
    rec.batch_size = 1
    y = _crops(3)
    one_by_one = rec.embed(y)
    rec.batch_size = 64
    assert torch.allclose(one_by_one, rec.embed(y), atol=1e-5)


def test_config_inference_reads_widths_and_embedding_size():
    state = random_arcface_state_dict(34, widths=(4, 8, 8, 16), num_features=24)
    cfg = config_from_state_dict(state)
    assert cfg.layers == (3, 4, 6, 3) and cfg.widths == (4, 8, 8, 16) and cfg.num_features == 24
    assert cfg.arch == "iresnet34"


def test_folded_batchnorm_keeps_every_stage_output():
    """The recognizer folds BatchNorm into the convs and fc; a plain unfolded IResNet is the reference."""
    from facebooth.pipelines.face.arcface import fold_batchnorm

    state = random_arcface_state_dict(18, seed=5, widths=TINY)
    plain = iresnet_from_state_dict(state)
    folded = fold_batchnorm(iresnet_from_state_dict(state))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        a, b = plain.prelu(plain.bn1(plain.conv1(x))), folded.prelu(folded.bn1(folded.conv1(x)))
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            a, b = getattr(plain, name)(a), getattr(folded, name)(b)
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(folded(x), plain(x), atol=1e-3, rtol=1e-4)
    assert fold_batchnorm(folded) is folded  # idempotent (a recognizer built on a folded copy)


def test_loading_takes_the_files_float32_tensors_without_a_copy():
    state = random_arcface_state_dict(18, seed=6, widths=TINY)
    model = iresnet_from_state_dict(state)
    assert model.layer1[0].bn1.weight.data_ptr() == state["layer1.0.bn1.weight"].data_ptr()
    assert not any(p.is_meta for p in model.parameters())


def test_channels_last_inference_equals_nchw_and_gradients_still_flow():
    rec = ArcFaceRecognizer(iresnet_from_state_dict(random_arcface_state_dict(18, seed=8, widths=TINY)), channels_last=True)
    assert rec.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = _crops(2)
    with torch.no_grad():
        fast = rec.embed(x)  # channels-last path
        nchw = F.normalize(rec.backbone(((x.permute(0, 3, 1, 2) - 0.5) / 0.5).contiguous()), dim=-1)
    torch.testing.assert_close(fast, nchw, atol=1e-5, rtol=0)
    y = x.clone().requires_grad_(True)
    rec.embed(y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert rec.backbone.conv1.weight.is_contiguous()  # switched to NCHW for autograd, for good


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_recognizer_loaded_in_inference_mode_still_gives_gradients(channels_last):
    """ComfyUI runs nodes (and so loads their models) under torch.inference_mode; PersonaMagic's identity loss
    later backpropagates through the same recognizer inside inference_mode(False)."""
    with torch.inference_mode():
        rec = ArcFaceRecognizer(
            iresnet_from_state_dict(random_arcface_state_dict(18, seed=3, widths=TINY)), channels_last=channels_last
        )
        x = _crops(2)
        before = rec.embed(x)
    assert any(t.is_inference() for t in rec.backbone.state_dict().values())
    y = x.clone().requires_grad_(True)
    out = rec.embed(y)
    out.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), before, atol=1e-5, rtol=0)  # same weights, ordinary tensors now
    assert not any(t.is_inference() for t in rec.backbone.state_dict().values())
