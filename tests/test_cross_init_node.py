"""The Cross Initialization nodes run in-process on ComfyUI's objects (random SD1.5 checkpoint), as ComfyUI runs
them: inside ``torch.inference_mode()``. Covers the result file, reuse for identical requests, and the bad
inputs of DESIGN.md: names with path separators, an existing file without 'overwrite', NaN during the
optimisation and an interrupt during it (no file left behind). Skipped without COMFYUI_DIR."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import comfy_inprocess


@pytest.fixture
def node(comfy, monkeypatch, tmp_path):
    """The node module, writing into a fresh embeddings folder, with no results remembered from other tests."""
    import folder_paths

    from facebooth.nodes import cross_init as node_module

    folder = tmp_path / "embeddings"
    folder.mkdir()
    exts = folder_paths.folder_names_and_paths["embeddings"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(folder)], exts))
    from facebooth.nodes.common import RerunCache  # the re-run cache now lives in nodes/common.py (issue 11)

    monkeypatch.setattr(node_module, "_WRITTEN", RerunCache())
    node_module.test_folder = folder
    return node_module


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 80, 72, 3, generator=g)


def _train(node, **changes):
    model, clip, vae = comfy_inprocess.load_checkpoint()
    args = dict(model=model, clip=clip, vae=vae, image=_image(), name="anna", preset="custom", steps=2,
                learning_rate=0.08, batch_size=1, seed=0, resolution=64, overwrite=False)
    args.update(changes)
    with torch.inference_mode():  # ComfyUI runs every node like this
        return node.CrossInitialization.execute(**args)


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _MustNotTrain:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the node trained again although the result for these inputs was known")


# ---------------------------------------------------------------------------------------------- result
@pytest.mark.slow
def test_trains_writes_a_comfyui_embedding_and_reuses_it_for_the_same_inputs(node, monkeypatch):
    import comfy.sd1_clip

    before = node.CrossInitialization.fingerprint_inputs(name="anna b")
    out = _train(node, name="anna b")
    prompt, curve = out.args
    assert prompt == "embedding:anna_b"  # spaces would split the prompt word
    path = node.test_folder / "anna_b.safetensors"
    assert _files(node.test_folder) == ["anna_b.safetensors"]  # no temp file left
    tensors = load_file(path)
    assert list(tensors) == ["clip_l"] and tensors["clip_l"].shape == (2, 768)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "cross_init" and meta["base_family"] == "sd1" and meta["steps"] == "2"
    assert curve.shape == (1, 256, 512, 3) and 0 <= curve.min() and curve.max() <= 1 and curve.std() > 0
    # ComfyUI's own embedding loader (what CLIPTextEncode uses) reads both vectors.
    loaded = comfy.sd1_clip.load_embed("anna_b", [str(node.test_folder)], 768, "clip_l")
    torch.testing.assert_close(loaded, tensors["clip_l"])

    # The fingerprint follows the file, so ComfyUI re-runs the node when the file changes.
    after = node.CrossInitialization.fingerprint_inputs(name="anna b")
    assert before != after and after == node.CrossInitialization.fingerprint_inputs(name="anna b")

    # Same inputs again: no training, file untouched.
    monkeypatch.setattr(node, "ComfyTIBackend", _MustNotTrain)
    stamp = path.stat().st_mtime_ns
    again = _train(node, name="anna b")
    assert again.args[0] == prompt and torch.equal(again.args[1], curve) and path.stat().st_mtime_ns == stamp
    # File deleted: the same inputs restore the same result, still without training.
    path.unlink()
    _train(node, name="anna b")
    torch.testing.assert_close(load_file(path)["clip_l"], tensors["clip_l"], rtol=0, atol=0)
    # Other inputs (another seed) would replace the file: refused without 'overwrite', before any training.
    with pytest.raises(FileExistsError, match="overwrite"):
        _train(node, name="anna b", seed=1)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["../evil", "faces/anna", "a\\b", "..", "  "])
def test_names_with_path_separators_are_refused(node, bad):
    message = node.CrossInitialization.validate_inputs(name=bad)
    assert isinstance(message, str) and ("path separator" in message or "empty" in message)
    with pytest.raises(ValueError, match="path separator|empty"):
        node.CrossInitialization.execute(
            model=None, clip=None, vae=None, image=_image(), name=bad, preset="fast", steps=1, learning_rate=0.1,
            batch_size=1, seed=0, resolution=64, overwrite=True,
        )
    assert _files(node.test_folder) == [] and _files(node.test_folder.parent) == ["embeddings"]
    assert node.CrossInitialization.validate_inputs(name="anna.v2") is True


@pytest.mark.slow
def test_existing_file_is_kept_without_overwrite_and_replaced_with_it(node):
    path = node.test_folder / "bob.safetensors"
    path.write_bytes(b"someone else's embedding")
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        _train(node, name="bob")
    assert path.read_bytes() == b"someone else's embedding"
    _train(node, name="bob", overwrite=True, steps=1)
    assert load_file(path)["clip_l"].shape == (2, 768)
    assert _files(node.test_folder) == ["bob.safetensors"]


@pytest.mark.slow
def test_nan_stops_with_a_clear_error_and_writes_nothing(node, monkeypatch):
    from facebooth.pipelines.textual_inversion.engine import NonFiniteLossError

    def diverged(self, noisy, timesteps, cond):
        return noisy * float("nan") + 0 * cond.sum()

    monkeypatch.setattr(node.ComfyTIBackend, "predict", diverged)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        _train(node, name="nan_case")
    assert _files(node.test_folder) == []


@pytest.mark.slow
def test_interrupt_during_training_leaves_no_file(node, monkeypatch):
    import comfy.model_management as mm

    real_predict = node.ComfyTIBackend.predict
    calls = []

    def predict_then_interrupt(self, noisy, timesteps, cond):
        calls.append(1)
        mm.interrupt_current_processing(True)  # the user presses Cancel during step 1
        return real_predict(self, noisy, timesteps, cond)

    monkeypatch.setattr(node.ComfyTIBackend, "predict", predict_then_interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(node, name="stopped", steps=5)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 1  # stopped at the start of step 2
    assert _files(node.test_folder) == []


def test_faces_input_uses_the_ffhq_crops_and_explains_an_empty_face_set(node):
    from facebooth.pipelines.face.types import Face, FaceSet

    crop = torch.rand(512, 512, 3)
    face = Face(image_index=0, box=(0, 0, 1, 1), score=1.0, landmarks=torch.zeros(5, 2), mask=torch.ones(8, 8),
                crops={"ffhq_512": crop})
    images = node._reference_images(_image(), FaceSet(images=_image(), faces=[face], missing=[]))
    assert images.shape == (1, 512, 512, 3) and torch.equal(images[0], crop)
    with pytest.raises(ValueError, match="no face"):
        node._reference_images(_image(), FaceSet(images=_image(), faces=[], missing=[0]))
    assert node._reference_images(_image(), None).shape == (1, 80, 72, 3)


def test_presets_and_custom_values(node):
    fast = node._settings("fast", 7, 0.5, 3, 11, 512)
    assert (fast.steps, fast.batch_size, fast.lr, fast.seed, fast.resolution) == (25, 8, 0.08, 11, 512)
    full = node._settings("full", 7, 0.5, 3, 0, 768)
    assert (full.steps, full.batch_size, full.lr, full.resolution) == (320, 8, 0.005, 768)
    custom = node._settings("custom", 7, 0.5, 3, 0, 64)
    assert (custom.preset, custom.steps, custom.batch_size, custom.lr) == ("custom", 7, 3, 0.5)
    with pytest.raises(ValueError, match="multiple of 64"):
        node._settings("fast", 1, 0.1, 1, 0, 500)


def test_every_input_and_output_has_a_tooltip(node):
    for cls in node.NODES:
        schema = cls.define_schema()
        assert schema.category == "FaceBooth/Cross Initialization" and schema.node_id.startswith("FaceBooth")
        missing = [i.id for i in schema.inputs if not i.tooltip] + [o.display_name for o in schema.outputs if not o.tooltip]
        assert not missing, f"{schema.node_id}: no tooltip on {missing}"


# ---------------------------------------------------------------------------------------------- official file
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_import_official_learned_embeds(node):
    from facebooth.utils.files import UnsafeFileError

    v0, v1 = torch.randn(768), torch.randn(768)
    torch.save({"<anna>_v0": v0, "<anna>_v1": v1}, node.test_folder / "learned_embeds.bin")
    with torch.inference_mode():
        out = node.CrossInitImportOfficial.execute(learned_embeds="learned_embeds.bin", name="anna official", overwrite=False)
    assert out.args == ("embedding:anna_official",)
    got = load_file(node.test_folder / "anna_official.safetensors")
    torch.testing.assert_close(got["clip_l"], torch.stack([v0, v1]), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        node.CrossInitImportOfficial.execute(learned_embeds="learned_embeds.bin", name="anna_official", overwrite=False)

    torch.save({"<x>_v0": _Payload()}, node.test_folder / "evil.bin")
    with pytest.raises(UnsafeFileError, match="weights-only"):
        node.CrossInitImportOfficial.execute(learned_embeds="evil.bin", name="evil", overwrite=False)
    assert not (node.test_folder / "evil.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="embeddings"):
        node.CrossInitImportOfficial.execute(learned_embeds="missing.bin", name="m", overwrite=False)
