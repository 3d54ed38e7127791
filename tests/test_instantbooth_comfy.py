"""InstantBooth with ComfyUI imported as a library (skipped without COMFYUI_DIR).

Independent references: ComfyUI's own CLIP preprocessing and CLIP_VISION model against ours + transformers;
ComfyUI's diffusers<->LDM key map against our layout; the random SD1.5 test checkpoint run by ComfyUI with our
``middle_patch`` against the same weights run by diffusers with our hooks (two hosts, two hook mechanisms).
Then the nodes themselves: beta = 0 gives the unpatched sampler output bit for bit, N = 1..4 references run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facebooth.devmodels.instantbooth_models import (
    TINY_CLIP_VISION,
    random_clip_vision_state_dict,
    random_instantbooth_model,
    tiny_checkpoint_layout,
)
from facebooth.pipelines.face.align import template_for
from facebooth.pipelines.face.types import Face, FaceSet
from facebooth.pipelines.instantbooth import (
    SD15_LAYOUT,
    AdapterPatch,
    DiffusersAdapterHooks,
    IdentifierError,
    clip_preprocess,
    comfy_block_map,
    diffusers_to_ldm,
    save_instantbooth,
)

from helpers import tiny_sd

transformers = pytest.importorskip("transformers")

COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or "/nonexistent").expanduser()
pytestmark = pytest.mark.skipif(
    not (COMFYUI_DIR / "comfy" / "clip_vision.py").is_file(),
    reason="needs ComfyUI's code: set COMFYUI_DIR to a ComfyUI source tree (e.g. ~/ComfyUI)",
)

FOLDER_KEY = "facebooth/instantbooth"
SKS = 48136  # "sks</w>" in the CLIP BPE vocabulary


@pytest.fixture(scope="module")
def comfy(comfy):  # the conftest's in-process ComfyUI (CPU), with what these tests use
    import comfy.clip_vision
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import folder_paths

    from facebooth.nodes import instantbooth as node

    return SimpleNamespace(clip_vision=comfy.clip_vision, sample=comfy.sample, sd=comfy.sd, utils=comfy.utils,
                           folder_paths=folder_paths, node=node)


@pytest.fixture(scope="module")
def checkpoint(comfy):
    model, clip = comfy.sd.load_checkpoint_guess_config(str(tiny_sd.checkpoint_file()), output_vae=False)[:2]
    return SimpleNamespace(model=model, clip=clip)


@pytest.fixture(scope="module")
def clip_vision(comfy, tmp_path_factory):
    """ComfyUI's CLIP_VISION class with a tiny config (ComfyUI's file loader only knows full-size towers)."""
    folder = tmp_path_factory.mktemp("clip_vision")
    cfg = folder / "tiny.json"
    cfg.write_text(json.dumps({**TINY_CLIP_VISION, "model_type": "clip_vision_model"}))
    model = comfy.clip_vision.ClipVisionModel(str(cfg))
    sd = random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0)
    missing, unexpected = model.load_sd(dict(sd))
    assert not missing and not unexpected
    return model


@pytest.fixture(scope="module")
def hf_clip_vision():
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    model.load_state_dict({k: v.float() for k, v in random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0).items()}, strict=False)
    return model


@pytest.fixture(scope="module")
def ib_model():
    return random_instantbooth_model(tiny_checkpoint_layout(), seed=3, clip_config=TINY_CLIP_VISION, gate=0.5)


def _images(n: int, seed: int = 0, size=(96, 80)) -> torch.Tensor:
    return torch.rand(n, *size, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ CLIP side


@pytest.mark.parametrize("shape,crop", [((2, 300, 200), True), ((1, 224, 224), True), ((1, 150, 260), False), ((1, 90, 500), True)])
def test_clip_preprocess_equals_comfyui(comfy, shape, crop):
    img = torch.rand(*shape, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(clip_preprocess(img, 224, crop=crop), comfy.clip_vision.clip_preprocess(img, 224, crop=crop), atol=1e-6, rtol=0)


def test_comfyui_clip_vision_features_equal_transformers_on_our_preprocessing(clip_vision, hf_clip_vision):
    """What the training script computes with transformers equals what the node gets from CLIP_VISION."""
    images = _images(3, size=(224, 224))
    out = clip_vision.encode_image(images, crop=True)
    with torch.no_grad():
        ref = hf_clip_vision(pixel_values=clip_preprocess(images, 224))
    assert out["last_hidden_state"].shape == (3, 257, TINY_CLIP_VISION["hidden_size"])
    torch.testing.assert_close(out["last_hidden_state"].float(), ref.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["image_embeds"].float(), ref.image_embeds, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ layout


def _transformer_paths_from_comfy_map(diffusers_map: dict[str, str]) -> dict[str, str]:
    suffix = ".norm1.weight"
    return {d[: -len(suffix)]: l[: -len(suffix)] for d, l in diffusers_map.items() if ".transformer_blocks." in d and d.endswith(suffix)}


def test_layout_agrees_with_comfyui_unet_to_diffusers(comfy, checkpoint):
    sd15 = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
    pairs = _transformer_paths_from_comfy_map(comfy.utils.unet_to_diffusers(sd15))
    assert len(pairs) == 16
    assert {diffusers_to_ldm(d, 2, 4): l for d, l in pairs.items()} == {l: l for l in pairs.values()}
    assert set(pairs.values()) == set(SD15_LAYOUT)
    tiny_cfg = checkpoint.model.model.model_config.unet_config
    pairs = _transformer_paths_from_comfy_map(comfy.utils.unet_to_diffusers(tiny_cfg))
    assert all(diffusers_to_ldm(d, 1, 2) == l for d, l in pairs.items())
    # ComfyUI's module names are the LDM paths, with the widths of our layout
    assert comfy.node.model_transformer_blocks(checkpoint.model) == tiny_checkpoint_layout()


# ------------------------------------------------------------------------------------------ UNet: two hosts


@pytest.mark.slow
def test_comfyui_middle_patch_equals_diffusers_hooks_on_the_same_checkpoint(checkpoint, ib_model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([900.0, 300.0])
    ctx = torch.randn(2, 77, 768, generator=g) * 0.5
    f_p = torch.randn(2 * 257, ib_model.config.patch_dim, generator=g)  # two references
    unet = checkpoint.model.model.diffusion_model
    patch = AdapterPatch(ib_model, f_p, comfy_block_map(ib_model.config.adapters), beta=0.8)

    def comfy_eps(p):
        opts = {"patches": {"middle_patch": [p]}, "cond_or_uncond": [0]} if p is not None else {}
        with torch.no_grad():
            return unet(x, timesteps=t, context=ctx, transformer_options=opts).float()

    plain, patched = comfy_eps(None), comfy_eps(patch)
    diff_unet = tiny_sd.unet()
    hooks = DiffusersAdapterHooks(diff_unet, ib_model, beta=0.8, prepare_once=True)
    hooks.set_patch_tokens(f_p)
    with torch.no_grad():
        ref = diff_unet(x, t, encoder_hidden_states=ctx).sample
    assert (patched - plain).abs().mean() > 1e-3 * plain.abs().mean()  # the adapters really act
    torch.testing.assert_close(patched, ref, atol=3e-4, rtol=1e-3)
    off = AdapterPatch(ib_model, f_p, comfy_block_map(ib_model.config.adapters), beta=0.0)
    assert torch.equal(comfy_eps(off), plain)


# ------------------------------------------------------------------------------------------ nodes


@pytest.fixture
def models_folder(comfy, ib_model, tmp_path, monkeypatch) -> Path:
    save_instantbooth(ib_model, tmp_path / "ib_tiny.safetensors")
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, FOLDER_KEY, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _sample(comfy, model, positive, negative, steps=2):
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=0)


@pytest.mark.slow
def test_loader_and_apply_beta_zero_reproduce_the_unpatched_sampler(comfy, checkpoint, clip_vision, models_folder):
    ib = comfy.node.InstantBoothLoader.execute(instantbooth_file="ib_tiny.safetensors")[0]
    assert comfy.node.InstantBoothLoader.execute(instantbooth_file="ib_tiny.safetensors")[0] is ib  # cached
    negative = checkpoint.clip.encode_from_tokens_scheduled(checkpoint.clip.tokenize("blurry"))
    refs = _images(2)

    def apply(beta):
        return comfy.node.InstantBoothApply.execute(
            model=checkpoint.model, clip=checkpoint.clip, clip_vision=clip_vision, instantbooth=ib,
            text="a photo of sks person on the moon", beta=beta, alpha=0.4, start_at=0.0, end_at=1.0, apply_to="both",
            reference=refs)

    model0, positive, crops = apply(0.0)
    assert crops.shape == (2, 224, 224, 3)
    assert model0 is not checkpoint.model and "middle_patch" not in checkpoint.model.model_options["transformer_options"].get("patches", {})
    plain = _sample(comfy, checkpoint.model, positive, negative)
    assert torch.equal(_sample(comfy, model0, positive, negative), plain)  # beta = 0: exactly the unpatched model
    model3, positive3, _ = apply(0.3)
    assert torch.equal(positive3[0][0], positive[0][0])  # beta does not touch the prompt
    out3 = _sample(comfy, model3, positive, negative)
    assert torch.isfinite(out3).all() and not torch.allclose(out3, plain, atol=1e-4)
    cond_only = comfy.node.InstantBoothApply.execute(
        model=checkpoint.model, clip=checkpoint.clip, clip_vision=clip_vision, instantbooth=ib, text="a photo of sks person on the moon",
        beta=0.3, alpha=0.4, start_at=0.0, end_at=1.0, apply_to="cond only", reference=refs)[0]
    out_c = _sample(comfy, cond_only, positive, negative)
    assert not torch.allclose(out_c, out3, atol=1e-5) and not torch.allclose(out_c, plain, atol=1e-5)
    # an empty start/end window switches the adapters off for the whole run
    late = comfy.node.InstantBoothApply.execute(
        model=checkpoint.model, clip=checkpoint.clip, clip_vision=clip_vision, instantbooth=ib, text="a photo of sks person on the moon",
        beta=0.3, alpha=0.4, start_at=1.0, end_at=1.0, apply_to="both", reference=refs)[0]
    assert torch.equal(_sample(comfy, late, positive, negative), plain)


def test_concept_token_replaces_the_identifier_output(comfy, checkpoint, clip_vision, ib_model, hf_clip_vision):
    refs = _images(3, seed=5)
    _, conditioning, crops = comfy.node.apply_instantbooth(
        checkpoint.model, checkpoint.clip, clip_vision, ib_model, "a photo of a woman playing guitar", alpha=0.4, reference=refs)
    cond = conditioning[0][0]
    plain = checkpoint.clip.encode_from_tokens(checkpoint.clip.tokenize("a photo of a sks woman playing guitar"))
    # concept from the pipeline with transformers CLIP on our preprocessing of the same crops
    with torch.no_grad():
        embeds = hf_clip_vision(pixel_values=clip_preprocess(crops, 224)).image_embeds
        concept = ib_model.concept(embeds, alpha=0.4)
    row = 5  # <start> a photo of a sks
    torch.testing.assert_close(cond[0, row].float(), concept, atol=1e-4, rtol=1e-4)
    keep = [i for i in range(cond.shape[1]) if i != row]
    torch.testing.assert_close(cond[0, keep], plain[0, keep])
    with pytest.raises(IdentifierError, match="Write it like"):
        comfy.node.apply_instantbooth(checkpoint.model, checkpoint.clip, clip_vision, ib_model, "a bowl of fruit", reference=refs)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_any_number_of_references_runs(comfy, checkpoint, clip_vision, ib_model, n):
    patched, positive, crops = comfy.node.apply_instantbooth(
        checkpoint.model, checkpoint.clip, clip_vision, ib_model, "sks man", beta=0.3, reference=_images(n, seed=n))
    patch = patched.model_options["transformer_options"]["patches"]["middle_patch"][-1]
    assert crops.shape[0] == n and patch.patch_tokens.shape == (n * 257, ib_model.config.patch_dim)
    negative = checkpoint.clip.encode_from_tokens_scheduled(checkpoint.clip.tokenize(""))
    out = _sample(comfy, patched, positive, negative, steps=1)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_references_from_masks_and_faces_and_clear_errors(comfy, checkpoint, clip_vision, ib_model):
    img = _images(1, size=(150, 150))
    mask = torch.zeros(1, 150, 150)
    mask[:, 40:110, 30:100] = 1
    face = Face(image_index=0, box=(19.0, 19.0, 131.0, 131.0), score=1.0, landmarks=(template_for(112) + 19).float(),
                mask=mask[0])
    faces = FaceSet(images=img, faces=[face], missing=[])
    _, _, crops = comfy.node.apply_instantbooth(checkpoint.model, checkpoint.clip, clip_vision, ib_model, "sks person",
                                                reference=img, reference_mask=mask, faces=faces)
    assert crops.shape == (2, 224, 224, 3) and crops[:, 0, 0].abs().max() == 0  # face first, then the photo; black corners
    with pytest.raises(ValueError, match="connect 'reference'"):
        comfy.node.apply_instantbooth(checkpoint.model, checkpoint.clip, clip_vision, ib_model, "sks person")
    with pytest.raises(ValueError, match="mask is empty"):
        comfy.node.apply_instantbooth(checkpoint.model, checkpoint.clip, clip_vision, ib_model, "sks person",
                                      reference=img, reference_mask=torch.zeros(1, 64, 64))
    wrong = random_instantbooth_model(tiny_checkpoint_layout(), clip_config={**TINY_CLIP_VISION, "hidden_size": 48})
    with pytest.raises(ValueError, match="trained on a CLIP vision model with 48"):
        comfy.node.apply_instantbooth(checkpoint.model, checkpoint.clip, clip_vision, wrong, "sks person", reference=img)
    sd15 = random_instantbooth_model(SD15_LAYOUT, clip_config=TINY_CLIP_VISION)
    with pytest.raises(ValueError, match="trained for a different UNet"):
        comfy.node.apply_instantbooth(checkpoint.model, checkpoint.clip, clip_vision, sd15, "sks person", reference=img)
