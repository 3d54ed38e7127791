"""Issue 10, points 4-6 with ComfyUI imported in-process on the random SD1.5 checkpoint (skipped without
COMFYUI_DIR): Apply InstantBooth honours 'pass through', an embedding of another family fails loudly in every node
that encodes a prompt, the official-embedding import says the family it wrote, and the file helpers every loader's
fingerprint and every model cache use follow a rewritten file."""
from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import comfy_inprocess


@pytest.fixture(scope="module")
def ckpt(comfy):
    model, clip, vae = comfy_inprocess.load_checkpoint()
    folder = comfy_inprocess.embeddings_dir()
    save_file({"clip_h": torch.randn(2, 1024)}, str(folder / "wide_sd2.safetensors"))  # e.g. an SD2 Cross-Init result
    save_file({"clip_l": torch.randn(2, 768)}, str(folder / "fits_sd1.safetensors"))
    return model, clip, vae


def _no_faces():
    from facebooth.pipelines.face.types import FaceSet

    return FaceSet(images=torch.rand(1, 64, 64, 3), faces=[], missing=[0], no_face_policy="pass_through")


def test_apply_instantbooth_passes_through_without_a_face(ckpt):
    from facebooth.nodes.instantbooth import InstantBoothApply

    model, clip, _ = ckpt
    text = "a photo of sks person at the beach"
    with torch.inference_mode():
        out = InstantBoothApply.execute(model, clip, None, None, text, 0.3, 0.4, 0.0, 1.0, "both", faces=_no_faces())
        plain = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    patched, conditioning, _ = out.args
    assert patched is model  # MODEL unchanged: no adapter patch
    torch.testing.assert_close(conditioning[0][0], plain[0][0], rtol=0, atol=0)
    note = str(out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui)
    assert "pass through" in note and "unchanged" in note


def test_an_embedding_of_another_family_fails_in_every_prompt_node(ckpt):
    from facebooth.nodes.common import EmbeddingWidthError, check_prompt_embeddings
    from facebooth.nodes.face2diffusion import F2DEncode
    from facebooth.nodes.instantbooth import InstantBoothApply
    from facebooth.nodes.personamagic import PersonaMagicApply
    from facebooth.nodes.portraitbooth import PortraitBoothConditioning

    model, clip, _ = ckpt
    check_prompt_embeddings(clip, "a photo of embedding:fits_sd1 and embedding:not_there", "test")  # fine / ComfyUI's text
    with pytest.raises(EmbeddingWidthError) as err:
        check_prompt_embeddings(clip, "a photo of (embedding:wide_sd2:1.1)", "test")
    message = str(err.value)
    assert "wide_sd2" in message and "SD2.x" in message and "SD1.x" in message
    text = "a photo of a man, embedding:wide_sd2"
    calls = {
        "Face2Diffusion Encode": lambda: F2DEncode.execute(clip, None, text, "man", 1.0),
        "PortraitBooth Conditioning": lambda: PortraitBoothConditioning.execute(None, clip, None, text, "man"),
        "PersonaMagic Apply": lambda: PersonaMagicApply.execute(model, clip, None, text + " <pm>", "<pm>", 10, True),
        "Apply InstantBooth": lambda: InstantBoothApply.execute(model, clip, None, None, text, 0.3, 0.4, 0.0, 1.0, "both"),
    }
    for node, call in calls.items():
        with torch.inference_mode(), pytest.raises(EmbeddingWidthError, match=f"{node}.*wide_sd2.*SD2.x.*SD1.x"):
            call()


def test_official_import_states_the_family_it_wrote(ckpt, monkeypatch, tmp_path):
    import folder_paths

    from facebooth.nodes import cross_init

    exts = folder_paths.folder_names_and_paths["embeddings"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(tmp_path)], exts))
    torch.save({"<anna>_v0": torch.randn(1024), "<anna>_v1": torch.randn(1024)}, tmp_path / "learned_embeds.bin")
    out = cross_init.CrossInitImportOfficial.execute(learned_embeds="learned_embeds.bin", name="anna", overwrite=False)
    note = str(out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui)
    assert "SD2.x" in note


def test_file_helpers_follow_a_rewritten_file(ckpt, monkeypatch, tmp_path):
    import folder_paths

    from facebooth.nodes import common
    from facebooth.nodes.face import LoadIdentity
    from facebooth.nodes.personamagic import PersonaMagicLoad
    from facebooth.nodes.portraitbooth import STEALoader

    path = tmp_path / "person.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    key = common.file_key(str(path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facebooth/identities", ([str(tmp_path)], {".safetensors"}))
    fp = LoadIdentity.fingerprint_inputs(identity_file="person.safetensors")
    time.sleep(0.01)
    save_file({"x": torch.ones(4)}, str(path))  # rewritten: new size and time
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert common.file_key(str(path)) != key
    assert LoadIdentity.fingerprint_inputs(identity_file="person.safetensors") != fp
    for node in (PersonaMagicLoad, STEALoader):  # every loader by name has a fingerprint
        assert "fingerprint_inputs" in node.__dict__
