"""Face parsing on facexlib's BiSeNet: loading official-layout files, preprocessing, class selection, errors,
and facexlib staying optional (a clear message without it, no download on import)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

from facebooth.devmodels.parsing_models import random_bisenet_state_dict, write_random_bisenet
from facebooth.pipelines.face.parsing import (
    BiSeNetFaceParser,
    bisenet_from_state_dict,
    load_bisenet,
    resolve_classes,
)
from facebooth.utils.files import atomic_save_safetensors

needs_facexlib = pytest.mark.skipif(importlib.util.find_spec("facexlib") is None, reason="facexlib is not installed")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
# The documented default face region, in CelebAMask-HQ indices: skin 1, brows 2-3, eyes 4-5, glasses 6,
# nose 10, mouth 11, lips 12-13. Not ears 7-8, earring 9, neck 14-15, cloth 16, hair 17, hat 18, background 0.
FACE_IDS = {1, 2, 3, 4, 5, 6, 10, 11, 12, 13}


def _facexlib_bisenet_class():
    if importlib.util.find_spec("facexlib") is None:
        pytest.skip("facexlib is not installed (uv pip install facexlib)")
    from facexlib.parsing.bisenet import BiSeNet

    return BiSeNet


def _randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor of a state dict (its own keys), BatchNorm statistics included."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif v.dim() == 4:
            out[k] = torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=gen)
        else:
            out[k] = 0.2 * torch.randn(v.shape, generator=gen) + (1.0 if k.endswith(".weight") else 0.0)
    return out


@pytest.fixture(scope="module")
def reference():
    """facexlib's BiSeNet with a random state dict in its own layout."""
    ref = _facexlib_bisenet_class()(num_class=19)
    state = _randomise(ref.state_dict(), seed=7)
    ref.load_state_dict(state)
    return ref.eval(), state


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().max() > 1e-2  # the random weights must give non-trivial logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# ----------------------------------------------------------------------------------------------
# Integration with facexlib (the network is facexlib's; these check the loading and the input we feed it)
# ----------------------------------------------------------------------------------------------


@needs_facexlib
def test_load_bisenet_reads_pth_and_safetensors(reference, tmp_path):
    ref, state = reference
    pth = tmp_path / "parsing_bisenet.pth"
    torch.save(ref.state_dict(), pth)  # exactly how the official file was produced
    sft = atomic_save_safetensors(state, tmp_path / "parsing_bisenet.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)[0]
        for path in (pth, sft):
            parser = load_bisenet(path)
            assert isinstance(parser, BiSeNetFaceParser)
            _assert_logits_close(parser.model(x), expected)


@pytest.mark.slow
@needs_facexlib
def test_parse_512_matches_facexlib_pipeline(reference):
    """Full 512x512 path: our preprocessing (RGB, ImageNet mean/std) + argmax equals facexlib's model on the
    input that facexlib-based packs build (PuLID: normalize(mean, std), then face_parse(x)[0].argmax(1))."""
    ref, state = reference
    parser = BiSeNetFaceParser(bisenet_from_state_dict(state))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 512), torch.linspace(0, 1, 512), indexing="ij")
    crop = torch.stack([xx, yy, (xx * yy) ** 0.5], dim=-1)  # smooth image with distinct channels
    x = ((crop - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref_logits = ref(x)[0]
    logits = parser.logits(crop)
    _assert_logits_close(logits, ref_logits)
    # near-ties may flip a handful of pixels at float32 precision
    labels, ref_labels = logits.argmax(1)[0], ref_logits.argmax(1)[0]
    assert (labels != ref_labels).float().mean() < 1e-4
    assert len(labels.unique()) > 1


# ----------------------------------------------------------------------------------------------
# Preprocessing and class selection, with a network whose output the test controls
# ----------------------------------------------------------------------------------------------


class BandModel(nn.Module):
    """Logits that make label = column band (19 vertical bands at 512 px); records the input it gets."""

    num_classes = 19

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        n, _, h, w = x.shape
        band = torch.arange(w) * 19 // w
        one_hot = torch.nn.functional.one_hot(band, 19).T.float()  # (19, W)
        return (self.scale * one_hot)[None, :, None, :].expand(n, 19, h, w).contiguous()


def _band_labels(width: int = 512) -> torch.Tensor:
    return (torch.arange(width) * 19 // width).expand(512, width)


def test_parse_returns_network_argmax_labels():
    parser = BiSeNetFaceParser(BandModel())
    labels = parser.parse(torch.rand(512, 512, 3))
    assert torch.equal(labels, _band_labels())


def test_face_mask_default_classes_are_inner_face():
    parser = BiSeNetFaceParser(BandModel())
    mask = parser.face_mask(torch.rand(512, 512, 3))
    assert mask.shape == (512, 512) and mask.dtype == torch.float32
    labels = _band_labels()
    for cls in range(19):
        region = mask[labels == cls]
        expected = 1.0 if cls in FACE_IDS else 0.0
        assert torch.all(region == expected), f"class {cls} should be {'in' if expected else 'out of'} the face mask"


def test_face_classes_parameter_and_soft_mask():
    model = BandModel()
    crop = torch.rand(512, 512, 3)
    hair_hat = BiSeNetFaceParser(model, face_classes=("hair", 18)).face_mask(crop)
    labels = _band_labels()
    assert torch.equal(hair_hat.bool(), (labels == 17) | (labels == 18))

    soft = BiSeNetFaceParser(model, soft=True).face_mask(crop)
    probs = model(torch.zeros(1, 3, 512, 512))[0].softmax(0)
    expected = probs[sorted(FACE_IDS)].sum(0)
    torch.testing.assert_close(soft, expected)
    assert 0.0 < float(soft.min()) < 0.5 < float(soft.max()) < 1.0


def test_input_is_resized_to_512_and_imagenet_normalised():
    model = BandModel()
    parser = BiSeNetFaceParser(model)
    colour = torch.tensor([0.9, 0.3, 0.1])
    crop = colour.expand(256, 256, 3).clone()
    mask = parser.face_mask(crop)
    seen = model.seen[-1]
    assert seen.shape == (1, 3, 512, 512)
    expected = (colour - IMAGENET_MEAN) / IMAGENET_STD  # RGB order, not BGR
    torch.testing.assert_close(seen[0].mean(dim=(1, 2)), expected)
    torch.testing.assert_close(seen[0].std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    assert mask.shape == (256, 256)  # logits go back to the crop's own size

    batch = parser.face_mask(torch.rand(2, 512, 512, 3))
    assert batch.shape == (2, 512, 512)
    assert parser.face_mask(torch.full((512, 512, 3), 200, dtype=torch.uint8)).shape == (512, 512)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@needs_facexlib
def test_wrong_keys_are_refused_with_a_hint(tmp_path):
    parsenet_like = {"encoder.0.conv2d.weight": torch.zeros(64, 3, 3, 3), "decoder.0.weight": torch.zeros(3)}
    path = tmp_path / "parsing_parsenet.pth"
    torch.save(parsenet_like, path)
    with pytest.raises(ValueError, match="ParseNet.*parsing_bisenet.pth"):
        load_bisenet(path)

    state = random_bisenet_state_dict(seed=1)
    del state["cp.arm16.conv_atten.weight"]
    state["cp.arm16.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): cp.arm16.conv_atten.weight; 1 unexpected key"):
        bisenet_from_state_dict(state)

    state = random_bisenet_state_dict(seed=1)
    state["ffm.conv1.weight"] = torch.zeros(32, 256, 1, 1)
    with pytest.raises(ValueError, match=r"wrong shape: ffm.conv1.weight \(32, 256, 1, 1\)"):
        bisenet_from_state_dict(state)

    with pytest.raises(FileNotFoundError, match="parsing_bisenet.pth"):
        load_bisenet(tmp_path / "missing.pth")


@needs_facexlib
def test_old_and_dataparallel_checkpoints_load():
    state = random_bisenet_state_dict(seed=2)
    reference = bisenet_from_state_dict(state)
    legacy = {f"module.{k}": v.half() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = bisenet_from_state_dict(legacy)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


def test_bad_images_and_classes_are_refused():
    parser = BiSeNetFaceParser(BandModel())
    with pytest.raises(ValueError, match="channel last"):
        parser.face_mask(torch.rand(3, 512, 512))
    nan = torch.rand(512, 512, 3)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        parser.face_mask(nan)
    with pytest.raises(ValueError, match="Unknown face-parsing class 'beard'"):
        resolve_classes(["skin", "beard"])
    with pytest.raises(ValueError, match="outside 0..18"):
        resolve_classes([19])
    with pytest.raises(ValueError, match="empty"):
        resolve_classes([])


# ----------------------------------------------------------------------------------------------
# Dev model files
# ----------------------------------------------------------------------------------------------


@needs_facexlib
def test_write_random_bisenet_files(tmp_path):
    pth = write_random_bisenet(tmp_path / "parsing_bisenet.pth", seed=3)
    raw = torch.load(pth, map_location="cpu", weights_only=True)
    sft = write_random_bisenet(tmp_path / "copy.safetensors", seed=3)
    from_pth, from_sft = load_bisenet(pth), load_bisenet(sft)
    for key, value in from_sft.model.net.state_dict().items():
        assert torch.equal(value, raw[key]) and torch.equal(from_pth.model.net.state_dict()[key], raw[key]), key
    labels = from_pth.parse(torch.rand(64, 64, 3))
    assert len(labels.unique()) > 1  # random weights still give a varied label map
    with pytest.raises(ValueError, match="suffix"):
        write_random_bisenet(tmp_path / "x.bin")


@needs_facexlib
def test_write_random_bisenet_loads_in_facexlib(tmp_path):
    ref = _facexlib_bisenet_class()(num_class=19)
    pth = write_random_bisenet(tmp_path / "parsing_bisenet.pth", seed=3)
    ref.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_logits_close(load_bisenet(pth).model(x), ref.eval()(x)[0])


# ----------------------------------------------------------------------------------------------
# facexlib stays optional and never downloads
# ----------------------------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_without_facexlib_only_parsing_is_refused_with_a_clear_message(tmp_path):
    torch.save({"conv_out.conv_out.weight": torch.zeros(19, 256, 1, 1)}, tmp_path / "parsing_bisenet.pth")
    out = _python(
        "import sys; sys.modules['facexlib'] = None\n"  # import facexlib -> ImportError, as when not installed
        "from facebooth.pipelines.face import parsing, analyzer, masks\n"  # the face modules still import
        "from facebooth.pipelines.face.facexlib_support import FacexlibUnavailableError\n"
        "try:\n"
        f"    parsing.load_bisenet({str(tmp_path / 'parsing_bisenet.pth')!r})\n"
        "except FacexlibUnavailableError as e:\n"
        "    print('REFUSED', e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "face parsing needs facexlib" in out.stdout and "pip install facexlib" in out.stdout


@needs_facexlib
def test_facexlib_import_and_model_build_never_touch_the_network(tmp_path):
    """With every socket refused, importing facexlib and building our parser and RetinaFace still work."""
    pth = write_random_bisenet(tmp_path / "parsing_bisenet.pth", seed=4)
    out = _python(
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "import facexlib\n"
        "from facebooth.pipelines.face.parsing import load_bisenet\n"
        "from facebooth.pipelines.face.retinaface import build_retinaface\n"
        f"load_bisenet({str(pth)!r}); build_retinaface(meta=True)\n"
        "print('OFFLINE OK')\n"
    )
    assert out.returncode == 0 and "OFFLINE OK" in out.stdout, out.stderr[-2000:]
