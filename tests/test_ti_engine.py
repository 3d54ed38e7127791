"""Textual-inversion engine on tiny random diffusers models: only the injected rows learn, loss falls,
interrupts and NaNs stop it cleanly, the DDPM helpers match diffusers' scheduler."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from facebooth.pipelines.runtime import RunHooks
from facebooth.pipelines.text_encoder import CLIPTextEncoder, PromptTokenizer
from facebooth.pipelines.textual_inversion import (
    NonFiniteLossError,
    TextualInversionEngine,
    TIConfig,
    ddpm_add_noise,
    ddpm_predicted_x0,
    ddpm_target,
)
from facebooth.pipelines.textual_inversion.diffusers_backend import DiffusersBackend

PLACEHOLDERS = ["<v0>", "<v1>"]
PROMPTS = ["a photo of a face of <v0> <v1> person", "the face of <v0> <v1> person", "a photo of <v0> <v1>"]


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    chars = list("!\"#$%&'()*+,-./") + list(string.digits) + list(":;<=>?@[]_") + list(string.ascii_lowercase)
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def tiny_backend(tmp: Path, prediction_type: str = "epsilon") -> DiffusersBackend:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    hf_tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp / "tok"))
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    ))
    encoder = CLIPTextEncoder.from_state_dict(te.state_dict(), hidden_act="quick_gelu", num_heads=4)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
    )
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    return DiffusersBackend(unet, vae, encoder, PromptTokenizer.from_hf(hf_tok), sched)


@pytest.fixture
def backend(tmp_path):
    return tiny_backend(tmp_path)


def tiny_images(n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    face = torch.stack([xx, yy, (xx * yy)]).clamp(-1, 1)  # a smooth, asymmetric pattern
    return torch.stack([face + 0.05 * torch.randn(3, 16, 16, generator=g) for _ in range(n)]).clamp(-1, 1)


def init_for(backend) -> dict[str, torch.Tensor]:
    tower = backend.text_encoders[0]
    return {tower.key: tower.encoder.token_embeddings(torch.tensor([5, 9])).detach().clone()}


def make_engine(backend, steps=3, batch=2, lr=0.01, hooks=None, reg=None, **kw):
    cfg = TIConfig(steps=steps, batch_size=batch, lr=lr, seed=0, **kw)
    return TextualInversionEngine(backend, tiny_images(), PROMPTS, PLACEHOLDERS, init_for(backend), cfg,
                                  regularizer=reg, hooks=hooks or RunHooks())


def test_only_the_injected_vectors_learn(backend):
    before = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in backend.frozen_modules()}
    init = init_for(backend)["clip_l"]
    engine = make_engine(backend, steps=4)
    engine.step()
    assert engine.params["clip_l"].grad is not None and engine.params["clip_l"].grad.abs().sum() > 0
    result = engine.run()
    for m in backend.frozen_modules():
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[id(m)][k]), k
    assert result.vectors["clip_l"].shape == (2, 32)
    assert not torch.allclose(result.vectors["clip_l"], init)
    assert len(result.loss_history) == 5  # one step by hand, four in run()


def _eval_loss(backend, vectors, n=24) -> float:
    """Denoising loss on a fixed batch (fixed noise, timesteps, prompts), independent of training draws."""
    g = torch.Generator().manual_seed(123)
    latents = backend.encode_images(tiny_images()).mean.expand(n, -1, -1, -1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with torch.no_grad():
        cond = backend.encode_prompts(prompts, PLACEHOLDERS, vectors)
        pred = backend.predict(backend.add_noise(latents, noise, t), t, cond)
    return torch.nn.functional.mse_loss(pred, backend.target(latents, noise, t)).item()


def test_loss_goes_down_with_a_fixed_seed(backend):
    init = init_for(backend)
    result = make_engine(backend, steps=40, batch=4, lr=0.05).run()
    before, after = _eval_loss(backend, init), _eval_loss(backend, result.vectors)
    # Control: moving the vectors the same distance in random directions must help much less.
    moved = (result.vectors["clip_l"] - init["clip_l"]).norm()
    g = torch.Generator().manual_seed(7)
    random_gain = 0.0
    for _ in range(3):
        d = torch.randn(2, 32, generator=g)
        random_gain = max(random_gain, before - _eval_loss(backend, {"clip_l": init["clip_l"] + d / d.norm() * moved}))
    assert before - after > max(2 * random_gain, 0.002), (before, after, random_gain)


def test_same_seed_same_result(backend):
    a = make_engine(backend, steps=3).run().vectors["clip_l"]
    b = make_engine(backend, steps=3).run().vectors["clip_l"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_regulariser_is_added_and_reported(backend):
    calls = []

    def reg(vectors):
        calls.append(vectors["clip_l"].shape)
        return vectors["clip_l"].square().sum() * 0 + 0.25

    result = make_engine(backend, steps=2, reg=reg).run()
    assert calls == [(2, 32), (2, 32)]
    assert result.reg_loss_history == [0.25, 0.25]
    assert result.loss_history[0] == pytest.approx(result.diffusion_loss_history[0] + 0.25)


def test_interrupt_stops_without_output(backend):
    class Stop(Exception):
        pass

    seen = {"checks": 0, "progress": []}

    def check():
        seen["checks"] += 1
        if seen["checks"] == 3:
            raise Stop()

    hooks = RunHooks(progress=lambda d, t, p=None: seen["progress"].append(d), check_interrupt=check)
    engine = make_engine(backend, steps=10, hooks=hooks)
    with pytest.raises(Stop):
        engine.run()
    assert seen["progress"] == [1, 2]
    assert engine.result.vectors == {}


def test_nan_loss_raises_a_clear_error(backend):
    real_predict = backend.predict
    calls = {"n": 0}

    def predict(*args):
        calls["n"] += 1
        out = real_predict(*args)
        return out * float("nan") if calls["n"] == 2 else out

    backend.predict = predict
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        make_engine(backend, steps=5).run()
    assert calls["n"] == 2


def test_divergent_learning_rate_is_caught(backend):
    with pytest.raises(NonFiniteLossError):
        make_engine(backend, steps=3, lr=1e30).run()


def test_preview_is_an_hwc_image(backend):
    previews = []
    hooks = RunHooks(progress=lambda d, t, p=None: previews.append(p))
    make_engine(backend, steps=2, preview_every=2, hooks=hooks).run()
    assert previews[0] is None
    assert previews[1].shape == (16, 16, 3) and 0 <= previews[1].min() and previews[1].max() <= 1


def test_bad_inputs_are_refused(backend):
    cfg = TIConfig(steps=1, batch_size=1, lr=0.01)
    with pytest.raises(ValueError, match="placeholders"):
        TextualInversionEngine(backend, tiny_images(), ["no placeholder"], PLACEHOLDERS, init_for(backend), cfg)
    with pytest.raises(ValueError, match="init vectors"):
        TextualInversionEngine(backend, tiny_images(), PROMPTS, PLACEHOLDERS, {"clip_h": torch.zeros(2, 32)}, cfg)
    with pytest.raises(ValueError, match=r"\(3, 32\)"):
        TextualInversionEngine(backend, tiny_images(), PROMPTS, PLACEHOLDERS + ["<v2>"], init_for(backend), cfg)
    bad = tiny_images()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TextualInversionEngine(backend, bad, PROMPTS, PLACEHOLDERS, init_for(backend), cfg)
    with pytest.raises(ValueError, match="learning rate"):
        TIConfig(steps=1, batch_size=1, lr=float("nan")).validate()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_helpers_match_the_diffusers_scheduler(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 998, 999])
    ac = sched.alphas_cumprod
    noisy = ddpm_add_noise(ac, x0, noise, t)
    torch.testing.assert_close(noisy, sched.add_noise(x0, noise, t))
    expected = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    target = ddpm_target(ac, x0, noise, t, prediction_type)
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(ddpm_predicted_x0(ac, noisy, t, target, prediction_type), x0, rtol=1e-3, atol=1e-3)


def test_v_prediction_backend_targets_velocity(tmp_path):
    backend = tiny_backend(tmp_path, "v_prediction")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(backend.target(x0, noise, t), backend.scheduler.get_velocity(x0, noise, t))
    assert make_engine(backend, steps=1).run().steps == 1


def test_a_timestep_dependent_embedding_module_trains(backend):
    """PersonaMagic-style: a module maps timesteps to per-sample vectors (B, K, D); only it learns."""
    base = init_for(backend)["clip_l"]

    class Mapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Linear(1, 2 * 32)
            self.seen = []

        def forward(self, timesteps):
            self.seen.append(timesteps.clone())
            shift = self.scale(timesteps.float().unsqueeze(-1) / 1000).view(-1, 2, 32)
            return {"clip_l": base + shift}

    mapper = Mapper()
    before = [p.clone() for p in mapper.parameters()]
    cfg = TIConfig(steps=2, batch_size=3, lr=0.01)
    engine = TextualInversionEngine(backend, tiny_images(), PROMPTS, PLACEHOLDERS, mapper, cfg)
    result = engine.run()
    assert result.vectors == {} and engine.params == {}
    assert [t.shape for t in mapper.seen] == [(3,), (3,)]
    assert all(not torch.equal(a, b) for a, b in zip(before, mapper.parameters()))
