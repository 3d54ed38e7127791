"""The textual-inversion backend over ComfyUI's MODEL / CLIP / VAE, with ComfyUI imported in-process.

Independent references: ComfyUI's own CLIP (``clip.encode_from_tokens``) for the text towers, and the
diffusers UNet with the checkpoint's very weights (tests/helpers/tiny_sd.py) for ``predict`` and its gradient.
Skipped without COMFYUI_DIR.
"""
from __future__ import annotations

import pytest
import torch

from helpers import comfy_inprocess

pytestmark = pytest.mark.slow  # loads the random SD1.5 checkpoint (about 6 s once per process)

PLACEHOLDERS = ["<fb_t0>", "<fb_t1>"]


@pytest.fixture(scope="module")
def loaded(comfy):
    return comfy_inprocess.load_checkpoint()


@pytest.fixture(scope="module")
def backend(loaded):
    from facebooth.nodes.ti_comfy_backend import ComfyTIBackend

    model, clip, vae = loaded
    with torch.inference_mode():  # as inside a node
        return ComfyTIBackend(model, clip, vae)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _comfy_cond(clip, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text)).float().clone()


def _ours(tower, text: str, vectors: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        if vectors is None:
            from facebooth.pipelines.text_encoder import tokenize_with_slots

            ids, _ = tokenize_with_slots(tower.tokenizer, text, [])
            return tower.encoder(torch.tensor([ids])).last_hidden_state
        return tower.encode([text], PLACEHOLDERS, vectors).last_hidden_state


# ---------------------------------------------------------------------------------------------- text towers
def test_sd1_tower_reproduces_comfyui_conditioning_with_and_without_an_embedding(loaded, backend):
    from safetensors.torch import save_file

    _, clip, _ = loaded
    assert backend.family == "sd1" and [t.key for t in backend.text_encoders] == ["clip_l"]
    tower = backend.text_encoders[0]
    assert (tower.tokenizer.bos_id, tower.tokenizer.eos_id, tower.tokenizer.pad_id) == (49406, 49407, 49407)
    for text in ("a photo of a person", "face of a man smiling, portrait photo at night"):
        torch.testing.assert_close(_ours(tower, text), _comfy_cond(clip, text), atol=1e-4, rtol=1e-4)

    # A two-vector embedding file, as ComfyUI reads it, against our slot injection of the same vectors.
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(2, 768, generator=g) * 0.02
    save_file({"clip_l": vectors}, str(comfy_inprocess.embeddings_dir() / "fbtest_tower.safetensors"))
    comfy = _comfy_cond(clip, "a photo of embedding:fbtest_tower person")
    ours = _ours(tower, f"a photo of {PLACEHOLDERS[0]} {PLACEHOLDERS[1]} person", vectors)
    torch.testing.assert_close(ours, comfy, atol=1e-4, rtol=1e-4)
    assert (ours - _ours(tower, "a photo of person")).abs().max() > 1e-2  # the vectors matter


def test_clip_set_last_layer_is_honoured(loaded):
    from facebooth.nodes.ti_comfy_backend import comfy_layer_choice, text_tower_from_clip

    _, clip, _ = loaded
    skip = clip.clone()
    skip.clip_layer(-2)  # what CLIPSetLastLayer -2 does
    assert comfy_layer_choice(skip.cond_stage_model.clip_l, skip.layer_idx) == -2
    with torch.inference_mode():
        tower = text_tower_from_clip(skip, "clip_l", dtype=torch.float32)
    assert len(tower.encoder.encoder.layers) == 11  # CLIP-L has 12: the last is not even built
    text = "a photo of a person"
    torch.testing.assert_close(_ours(tower, text), _comfy_cond(skip, text), atol=1e-4, rtol=1e-4)
    assert (_comfy_cond(skip, text) - _comfy_cond(clip, text)).abs().max() > 1e-2


def _tiny_sd2_clip():
    """A real ComfyUI SD2 CLIP (SD2ClipModel: clip_h, penultimate layer, pads with 0), shrunk via its config hook."""
    import comfy.sd
    import comfy.supported_models_base
    from comfy.text_encoders import sd2_clip

    small = {"num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}
    target = comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, model_options={"clip_h_model_config": small, "dtype": torch.float32})
        g = torch.Generator().manual_seed(0)
        sd = {}
        for k, v in clip.cond_stage_model.state_dict().items():
            if "layer_norm" in k and k.endswith("weight"):
                sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
            elif v.dim() == 0:
                sd[k] = v.clone()
            else:
                sd[k] = 0.05 * torch.randn(v.shape, generator=g)
        clip.load_sd(sd, full_model=True)
    return clip


def test_sd2_tower_uses_penultimate_layer_and_pads_with_zero(loaded):
    from facebooth.nodes.ti_comfy_backend import clip_tower_keys, text_tower_from_clip

    clip = _tiny_sd2_clip()
    assert clip_tower_keys(clip) == ("clip_h",)
    with torch.inference_mode():
        tower = text_tower_from_clip(clip, "clip_h", dtype=torch.float32)
    assert tower.tokenizer.pad_id == 0 and tower.tokenizer.eos_id == 49407
    assert len(tower.encoder.encoder.layers) == 2 and tower.encoder.config.final_layer_norm
    assert tower.encoder.config.num_heads == 4 and tower.encoder.config.hidden_act == "gelu"
    for text in ("a photo of a person", "face of a woman, portrait photo"):
        torch.testing.assert_close(_ours(tower, text), _comfy_cond(clip, text), atol=1e-4, rtol=1e-4)


def test_mixed_families_and_other_clips_are_refused_with_a_clear_message(loaded):
    from types import SimpleNamespace

    from facebooth.nodes.ti_comfy_backend import ComfyTIBackend, UnsupportedModelError

    model, _, vae = loaded
    sdxl = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=1, clip_g=2), tokenizer=SimpleNamespace(clip_l=1, clip_g=2))
    with pytest.raises(UnsupportedModelError, match="MODEL is SD1.x but the CLIP is SDXL"):
        ComfyTIBackend(model, sdxl, vae)
    t5 = SimpleNamespace(cond_stage_model=SimpleNamespace(t5xxl=1), tokenizer=SimpleNamespace(t5xxl=1))
    with pytest.raises(UnsupportedModelError, match="SD1.x .clip_l., SD2.x .clip_h. or SDXL"):
        ComfyTIBackend(model, t5, vae)


# ---------------------------------------------------------------------------------------------- UNet
def _ddpm_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([17, 640])
    cond = torch.randn(2, 77, 768, generator=g) * 0.5
    target = torch.randn(2, 4, 8, 8, generator=g)
    return noisy, t, cond, target


def _pred_and_grad(fn, noisy, t, cond, target):
    with torch.inference_mode(False), torch.enable_grad():
        c = cond.clone().requires_grad_(True)
        pred = fn(noisy, t, c)
        ((pred - target) ** 2).mean().backward()
    return pred.detach(), c.grad


def _ddpm_scheduler():
    import inspect

    from diffusers import DDPMScheduler

    known = inspect.signature(DDPMScheduler.__init__).parameters
    return DDPMScheduler(**{k: v for k, v in comfy_inprocess.tiny_sd().SCHEDULER_CONFIG.items() if k in known})


def test_schedule_matches_diffusers_ddpm(backend):
    sched = _ddpm_scheduler()
    assert backend.num_train_timesteps == 1000
    torch.testing.assert_close(backend.alphas_cumprod, sched.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)
    assert backend.prediction_type == "epsilon"


def test_predict_and_its_gradient_equal_the_diffusers_unet(backend):
    unet = comfy_inprocess.tiny_sd().unet()
    noisy, t, cond, target = _ddpm_batch()
    ours, our_grad = _pred_and_grad(backend.predict, noisy, t, cond, target)
    ref, ref_grad = _pred_and_grad(lambda x, tt, c: unet(x, tt, encoder_hidden_states=c).sample, noisy, t, cond, target)
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-3)
    assert our_grad.abs().max() > 0
    torch.testing.assert_close(our_grad, ref_grad, atol=1e-7, rtol=2e-3)


def test_v_prediction_model_gives_the_raw_unet_output_as_v(loaded):
    """Core's ModelSamplingDiscrete node swaps in a V_PREDICTION sampling object; the UNet output is then v."""
    import comfy.model_sampling

    from facebooth.nodes.ti_comfy_backend import ComfyTIBackend

    model, clip, vae = loaded

    class VSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    with torch.inference_mode():
        vmodel = model.clone()
        vmodel.add_object_patch("model_sampling", VSampling(model.model.model_config))
        backend = ComfyTIBackend(vmodel, clip, vae)
    assert backend.prediction_type == "v_prediction"
    unet = comfy_inprocess.tiny_sd().unet()
    noisy, t, cond, _ = _ddpm_batch(1)
    with torch.no_grad():
        ref = unet(noisy, t, encoder_hidden_states=cond).sample
        ours = backend.predict(noisy, t, cond)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-3)
    # The engine's target for v-models is v = √ᾱ ε − √(1−ᾱ) x0, as diffusers' get_velocity.
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sched = _ddpm_scheduler()
    torch.testing.assert_close(backend.target(x0, eps, t), sched.get_velocity(x0, eps, t), atol=1e-5, rtol=1e-5)


def test_preview_uses_latent_rgb_factors(backend):
    lat = torch.zeros(1, 4, 8, 8)
    lat[:, 0] = 1.0
    img = backend.decode_preview(lat)
    assert img.shape == (1, 64, 64, 3)
    factors = torch.tensor(backend.model.latent_format.latent_rgb_factors[0])
    torch.testing.assert_close(img[0, 30, 30], ((factors + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- engine
def test_engine_steps_on_comfyui_change_only_the_embeddings(loaded, backend):
    import comfy.model_management as mm

    from facebooth.pipelines import cross_init as ci

    model, clip, vae = loaded
    unet_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    vae_before = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.get_sd().items()}
    x, t, cond, _ = _ddpm_batch(2)
    with torch.inference_mode():
        mm.load_models_gpu([model])  # the plain MODEL in place (an earlier test loaded a v-prediction clone)
        out_before = model.model.apply_model(x, model.model.model_sampling.sigmas[t], c_crossattn=cond)

    images = torch.rand(2, 72, 96, 3)
    settings = ci.make_settings("custom", steps=3, batch_size=2, lr=0.08, resolution=64, preview_every=3)
    previews = []
    with torch.inference_mode():  # the node's context (the backend fixture was built in it too)
        with torch.inference_mode(False):  # ...which the node switches off for the run
            from facebooth.pipelines.runtime import RunHooks

            job = ci.CrossInitRun(backend, images, settings, RunHooks(progress=lambda d, n, p=None: previews.append(p)))
            result = job.run()
    hist = result.history.loss_history
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(hist)))
    assert set(result.embedding) == {"clip_l"} and result.embedding["clip_l"].shape == (2, 768)
    assert (result.embedding["clip_l"] - result.init["clip_l"]).abs().max() > 1e-3  # the embeddings moved
    assert previews[-1] is not None and previews[-1].shape == (64, 64, 3)

    # Nothing else changed: UNet, VAE and ComfyUI's CLIP weights, our text-encoder copy, no stray gradients.
    for name, before, now in (("unet", unet_before, model.model.diffusion_model.state_dict()),
                              ("vae", vae_before, vae.first_stage_model.state_dict()),
                              ("clip", clip_before, clip.get_sd())):
        # Bitwise: an SD1.5 file has no text_projection, so ComfyUI leaves that weight uninitialised and it
        # may hold NaN, which torch.equal never calls equal to itself.
        changed = [k for k in before if not _same_bits(before[k], now[k])]
        assert not changed, f"{name} weights changed: {changed[:3]}"
    assert all(p.grad is None for p in model.model.parameters())
    assert all(not p.requires_grad for p in backend.text_encoders[0].encoder.parameters())
    # The original MODEL samples exactly as before once ComfyUI loads it again (our weight wrappers are gone).
    with torch.inference_mode():
        mm.load_models_gpu([model])
        assert not any(len(getattr(m, "weight_function", [])) for m in model.model.modules())
        out_after = model.model.apply_model(x, model.model.model_sampling.sigmas[t], c_crossattn=cond)
    assert torch.equal(out_before, out_after)
