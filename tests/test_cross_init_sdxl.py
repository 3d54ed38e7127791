"""Cross Initialization on SDXL, with ComfyUI imported in-process and the random SDXL-family checkpoint.

Independent reference: ComfyUI's own SDXL CLIP (``clip.encode_from_tokens(..., return_pooled=True)``, with tensor
tokens for injected vectors, and ``embedding:NAME`` files from disk) and its own ``SDXL.encode_adm``.
Skipped without COMFYUI_DIR. The SDXL checkpoint is generated once into the test cache (minutes, ~1.8 GB).
"""
from __future__ import annotations

import pytest
import torch

from helpers import comfy_inprocess

pytestmark = pytest.mark.slow

PLACEHOLDERS = ["<fb_t0>", "<fb_t1>"]


@pytest.fixture(scope="module")
def sdxl(comfy):
    import comfy.sd

    from facebooth.devmodels.sdxl_checkpoint import checkpoint_name, write_random_sdxl_checkpoint

    path = write_random_sdxl_checkpoint(comfy_inprocess.tiny_sd().cache_dir() / "checkpoints" / checkpoint_name())
    with torch.inference_mode():  # as CheckpointLoaderSimple runs; fp32 text encoders for exact comparisons
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path), embedding_directory=[str(comfy_inprocess.embeddings_dir())], te_model_options={"dtype": torch.float32}
        )[:3]
    yield model, clip, vae
    del model, clip, vae


@pytest.fixture(scope="module")
def backend(sdxl):
    from facebooth.nodes.ti_comfy_backend import ComfyTIBackend

    model, clip, vae = sdxl
    with torch.inference_mode():
        return ComfyTIBackend(model, clip, vae)


def _comfy(clip, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond.float().clone(), pooled.float().clone()


def test_sdxl_towers_reproduce_comfyui_context_and_pooled_output_with_an_embedding_file(sdxl, backend):
    from safetensors.torch import save_file

    model, clip, _ = sdxl
    assert backend.family == "sdxl" and [t.key for t in backend.text_encoders] == ["clip_g", "clip_l"]
    g = torch.Generator().manual_seed(3)
    vectors = {"clip_l": torch.randn(2, 768, generator=g) * 0.02, "clip_g": torch.randn(2, 1280, generator=g) * 0.02}
    save_file(vectors, str(comfy_inprocess.embeddings_dir() / "fbtest_sdxl.safetensors"))
    comfy_cond, comfy_pooled = _comfy(clip, clip.tokenize("a photo of embedding:fbtest_sdxl person"))
    with torch.no_grad():
        ours = backend.encode_prompts([f"a photo of {PLACEHOLDERS[0]} {PLACEHOLDERS[1]} person"], PLACEHOLDERS, vectors)
    assert ours["c_crossattn"].shape == (1, 77, 2048) and ours["pooled_output"].shape == (1, 1280)
    torch.testing.assert_close(ours["c_crossattn"], comfy_cond, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(ours["pooled_output"], comfy_pooled, atol=2e-4, rtol=1e-3)
    plain_cond, plain_pooled = _comfy(clip, clip.tokenize("a photo of person"))
    assert (plain_cond - comfy_cond).abs().max() > 1e-2 and (plain_pooled - comfy_pooled).abs().max() > 1e-3

    # y: the model's own encode_adm, as ComfyUI builds it for a 64 px image with these size values.
    y = backend.sdxl_y(ours["pooled_output"], 64, 64)
    with torch.inference_mode():
        ref = model.model.encode_adm(pooled_output=comfy_pooled, width=64, height=64, crop_w=0, crop_h=0,
                                     target_width=64, target_height=64, device="cpu")
    assert y.shape == (1, 2816)
    torch.testing.assert_close(y, ref.float(), atol=2e-4, rtol=1e-3)


def test_cross_initialisation_uses_each_encoders_own_penultimate_output(sdxl, backend):
    from facebooth.pipelines import cross_init as ci

    _, clip, _ = sdxl
    names = ci.load_celebrity_names()
    init = ci.initial_vectors(backend, names)
    assert init["clip_l"].shape == (2, 768) and init["clip_g"].shape == (2, 1280)
    # Reference: ComfyUI's CLIP fed [BOS, m1, m2, EOS, PAD...] with the mean rows as tensor tokens, per tower.
    tokens = clip.tokenize("")
    for short, key in (("l", "clip_l"), ("g", "clip_g")):
        tower = getattr(clip.cond_stage_model, key)
        table = tower.transformer.get_input_embeddings().weight.float()
        ids = {t.key: t for t in backend.text_encoders}[key].tokenizer.ids
        firsts = [ids(n)[0] for n in names]
        seconds = [ids(n)[1] for n in names if len(ids(n)) > 1]
        means = torch.stack([table[firsts].mean(0), table[seconds].mean(0)])
        row = list(tokens[short][0])
        pad = row[-1][0]
        row = [row[0], (means[0], 1.0), (means[1], 1.0), (49407, 1.0)] + [(pad, 1.0)] * (len(row) - 4)
        with torch.inference_mode():
            out = tower.encode_token_weights([row])[0].float()
        torch.testing.assert_close(init[key], out[0, 1:3], atol=2e-4, rtol=1e-3)


def test_cross_init_trains_both_towers_through_context_and_pooled_output(sdxl, backend):
    from facebooth.pipelines import cross_init as ci

    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    settings = ci.make_settings("custom", steps=2, batch_size=1, lr=0.01, resolution=64)
    result = ci.run_cross_init(backend, images, settings)
    assert set(result.embedding) == {"clip_l", "clip_g"}
    assert result.embedding["clip_l"].shape == (2, 768) and result.embedding["clip_g"].shape == (2, 1280)
    for key in result.embedding:
        assert (result.embedding[key] - result.init[key]).abs().max() > 1e-4, key  # both towers learned
    assert result.metadata["base_family"] == "sdxl" and result.metadata["dims"] == "clip_g=1280,clip_l=768"
    assert all(torch.isfinite(torch.tensor(result.history.loss_history)))

    # The gradient reaches the CLIP-G vectors through y (the pooled output) too, not only through the context.
    vectors = {k: v.clone().requires_grad_(True) for k, v in result.init.items()}
    with torch.inference_mode(False), torch.enable_grad():
        cond = backend.encode_prompts([f"a photo of {PLACEHOLDERS[0]} {PLACEHOLDERS[1]} person"], PLACEHOLDERS, vectors)
        backend.sdxl_y(cond["pooled_output"], 64, 64).square().sum().backward()
    assert vectors["clip_g"].grad.abs().max() > 0 and vectors["clip_l"].grad is None


def test_sd1_only_methods_refuse_sdxl_before_sampling_naming_both_families(sdxl):
    from facebooth.nodes.common import WrongFamilyError
    from facebooth.nodes.face2diffusion import sd1_text_model
    from facebooth.nodes.instantbooth import apply_instantbooth
    from facebooth.nodes.portraitbooth import PortraitBoothConditioning

    model, clip, _ = sdxl
    with pytest.raises(WrongFamilyError, match=r"InstantBooth works with SD1.x .*this MODEL is SDXL.*Cross Initialization"):
        apply_instantbooth(model, clip, None, None, "a photo of sks person")
    with pytest.raises(WrongFamilyError, match=r"PortraitBooth .*SD1.x .*this CLIP is SDXL.*Cross Initialization"):
        PortraitBoothConditioning.execute(None, clip, None, "a photo of a man", "man")
    with pytest.raises(Exception, match=r"SD1.x .*this CLIP is SDXL.*Cross Initialization"):
        sd1_text_model(clip)
