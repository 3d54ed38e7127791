"""PersonaMagic training on tiny random diffusers models: what learns, which timesteps, the three losses,
the IoU stage partition, interrupts and divergence, and the file it ends in."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facebooth.pipelines.personamagic.apply import build_schedule
from facebooth.pipelines.personamagic.backends import DiffusersKVBackend
from facebooth.pipelines.personamagic.files import load_personamagic, save_personamagic
from facebooth.pipelines.personamagic.stages import PRESETS
from facebooth.pipelines.personamagic.train import FaceGuidance, PersonaMagicRun, PersonaMagicSettings
from facebooth.pipelines.runtime import RunHooks
from facebooth.pipelines.textual_inversion import NonFiniteLossError
from test_ti_engine import tiny_backend, tiny_images

IMAGE_DIM = 16


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = tiny_backend(tmp_path_factory.mktemp("pm"))
    tower = b.text_encoders[0]
    return DiffusersKVBackend(b.unet, b.vae, tower.encoder, tower.tokenizer, b.scheduler)


def settings(**kw) -> PersonaMagicSettings:
    base = dict(steps=3, batch_size=2, lr=1e-3, resolution=16, supercategory="x", num_anchors=50)
    base.update(kw)
    return PersonaMagicSettings(**base)


def make_run(backend, guidance=None, hooks=None, n_images=1, **kw) -> PersonaMagicRun:
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(n_images, IMAGE_DIM, generator=g)
    return PersonaMagicRun(backend, None, embeds, settings(**kw), guidance, hooks or RunHooks(), pixels=tiny_images(n_images))


class Spy:
    """Wraps the backend's predict to see timesteps and contexts of every training call."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self._orig = backend.predict

    def __enter__(self):
        def predict(noisy, t, cond):
            self.calls.append((t.clone(), cond))
            return self._orig(noisy, t, cond)

        self.backend.predict = predict
        return self

    def __exit__(self, *exc):
        del self.backend.predict  # back to the class method


def test_only_the_mapper_learns_in_the_dynamic_stage(backend):
    frozen = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in backend.frozen_modules()}
    run = make_run(backend, steps=4)
    before = {k: v.clone() for k, v in run.mapper.state_dict().items()}
    with Spy(backend) as spy:
        result = run.run()
    for m in backend.frozen_modules():
        assert all(not p.requires_grad for p in m.parameters())
        for k, v in m.state_dict().items():
            assert torch.equal(v, frozen[id(m)][k]), k
    changed = [k for k, v in result.mapper.state_dict().items() if not torch.equal(v, before[k])]
    assert "output_layer.0.weight" in changed and "image_output_layer.0.weight" in changed and "input_layer.weight" in changed
    ts = torch.cat([t for t, _ in spy.calls])
    assert ts.min() >= 400 and ts.max() < 800  # official: randint(400, 800)
    for _, cond in spy.calls:  # K/V contexts: V differs from K only where the bypass was kept
        assert cond.key.shape == cond.value.shape
    assert result.plan == PRESETS["official"]
    assert len(result.te_loss_history) == 4 and all(-0.25e-3 <= v < 0 for v in result.te_loss_history)


def test_bypass_is_dropped_for_about_half_of_the_samples(backend):
    run = make_run(backend, steps=4, batch_size=4)
    with Spy(backend) as spy:
        run.run()
    kept = [int(not torch.equal(c.key[b], c.value[b])) for _, c in spy.calls for b in range(c.key.shape[0])]
    assert 3 <= sum(kept) <= 13, kept  # 16 samples, p = 0.5 (P(outside) < 2 %; the seed is fixed)


def test_custom_stages_and_the_mask(backend):
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    with Spy(backend) as spy:
        masked = make_run(backend, guidance=FaceGuidance(masks=mask), stages="custom", t_low=100, t_high=150, seed=3, steps=2).run()
    ts = torch.cat([t for t, _ in spy.calls])
    assert ts.min() >= 100 and ts.max() < 150
    whole = make_run(backend, guidance=FaceGuidance(masks=torch.ones(1, 16, 16)), stages="custom", t_low=100, t_high=150, seed=3, steps=2).run()
    plain = make_run(backend, stages="custom", t_low=100, t_high=150, seed=3, steps=2).run()
    # an all-ones mask is exactly the unmasked loss; a face mask is not
    assert whole.history.diffusion_loss_history == pytest.approx(plain.history.diffusion_loss_history, rel=1e-5)
    assert masked.history.diffusion_loss_history[0] != pytest.approx(plain.history.diffusion_loss_history[0], rel=1e-3)


class _Recognizer:
    """A differentiable stand-in for ArcFace: mean colour of the crop, normalised."""

    input_size = 112

    def __init__(self):
        self.seen = []

    def embed(self, crops):
        self.seen.append(crops.shape)
        return F.normalize(crops.mean(dim=(1, 2)) + 0.1, dim=-1)


def test_identity_loss_decodes_x0_and_is_weighted_by_lambda(backend):
    rec = _Recognizer()
    m = torch.tensor([[[7.0, 0, 0], [0, 7.0, 0]]])  # 16 px image → 112 px crop
    guidance = FaceGuidance(masks=torch.ones(1, 16, 16), matrices=m, embeddings=torch.tensor([[1.0, 0.0, 0.0]]), recognizer=rec)
    result = make_run(backend, guidance=guidance, steps=2, id_weight=2.0).run()
    assert rec.seen == [(2, 112, 112, 3)] * 2
    # λ_id(t) ∈ [cos(0.4π), cos(0.2π)] for t in [400, 800) and 1 − cos ∈ [0, 2]: the weighted loss is bounded
    assert all(0 < v <= 2.0 * 2 * math.cos(0.2 * math.pi) for v in result.id_loss_history)
    total = result.history.loss_history[0]
    parts = result.history.diffusion_loss_history[0] + result.te_loss_history[0] + result.id_loss_history[0]
    assert total == pytest.approx(parts, rel=1e-5)


def test_iou_partition_after_warmup(backend, monkeypatch):
    mask = torch.zeros(1, 16, 16)
    mask[:, 3:13, 4:12] = 1
    run = make_run(backend, guidance=FaceGuidance(masks=mask), steps=4, stages="iou", warmup_steps=2, iou_stride=100, iou_samples=1)
    measured = {}
    real = run.engine.measure_ious

    def measure(grid):
        measured["real"] = real(grid)  # the real measurement runs (values in [0, 1]) ...
        return {t: 0.2 if t >= 600 else (0.75 if t >= 300 else 0.95) for t in grid}  # ... a clear curve decides

    monkeypatch.setattr(run.engine, "measure_ious", measure)
    with Spy(backend) as spy:
        result = run.run()
    grid = list(range(100, 1000, 100))
    assert sorted(measured["real"]) == grid
    assert all(0.0 <= v <= 1.0 for v in measured["real"].values())
    probes = [c for _, c in spy.calls if c.probe is not None]
    assert len(probes) == 9 and all(p.probe.maps for p in probes)  # one probed UNet run per grid timestep
    train_ts = [t for t, c in spy.calls if c.probe is None]
    # IoU reaches 0.7 between t = 600 and 500 and exceeds 0.8 between 300 and 200
    assert result.plan.source == "iou" and (result.plan.t_low, result.plan.t_high) == (251, 550)
    later = torch.cat(train_ts[2:])
    assert later.min() >= 251 and later.max() < 550  # after the partition: the dynamic stage only
    assert result.ious == {t: 0.2 if t >= 600 else (0.75 if t >= 300 else 0.95) for t in grid}
    with pytest.raises(ValueError, match="face mask"):
        make_run(backend, stages="iou", steps=4, warmup_steps=2)


def test_interrupt_and_divergence(backend):
    class Stop(Exception):
        pass

    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop()

    with pytest.raises(Stop):
        make_run(backend, hooks=RunHooks(check_interrupt=check), steps=5).run()
    with pytest.raises(NonFiniteLossError):
        make_run(backend, lr=1e30, steps=4).run()


def _eval_loss(backend, run, mapper) -> float:
    """Denoising loss on a fixed batch in the dynamic stage (fixed noise, timesteps, prompt, bypass on)."""
    from facebooth.pipelines.personamagic.attention import KVCond
    from facebooth.pipelines.personamagic.contexts import encode_kv

    g = torch.Generator().manual_seed(11)
    n = 16
    lat = backend.encode_images(tiny_images(1)).mean.expand(n, -1, -1, -1)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(400, 800, (n,), generator=g)
    eng = run.engine
    ids, slots = eng.prompt_cache([eng.prompts[0]] * n, eng.placeholders, "cpu")
    with torch.no_grad():
        out = mapper(t, run.image_embeds[0])
        ctx = encode_kv(eng.tower.encoder, ids, slots, out.base, out.bypass)
        pred = backend.predict(backend.add_noise(lat, noise, t), t, KVCond(ctx.key, ctx.value))
    return F.mse_loss(pred, backend.target(lat, noise, t)).item()


@pytest.mark.slow
def test_training_lowers_the_denoising_loss(backend):
    import copy

    run = make_run(backend, steps=30, lr=3e-3, batch_size=4, te_weight=0.0)
    before = copy.deepcopy(run.mapper)
    result = run.run()
    a, b = _eval_loss(backend, run, before), _eval_loss(backend, run, result.mapper)
    assert b < a - 1e-3, (a, b)


def test_result_file_and_schedule(backend, tmp_path):
    run = make_run(backend, steps=2)
    result = run.run()
    s = run.settings
    path = save_personamagic(tmp_path / "p.safetensors", result.mapper, result.plan, backend.family, result.image_embed,
                             s.supercategory, extra=result.file_metadata(s))
    f = load_personamagic(path)
    assert f.metadata["steps"] == "2" and f.supercategory == "x" and f.plan == result.plan
    tower = backend.text_encoders[0]
    entries = build_schedule(tower.encoder, tower.tokenizer, f.mapper, "a <p> here", "<p>", f.plan, f.image_embed, bins=5, supercategory="x")
    again = build_schedule(tower.encoder, tower.tokenizer, result.mapper, "a <p> here", "<p>", result.plan, result.image_embed, bins=5, supercategory="x")
    for a, b in zip(entries, again):
        torch.testing.assert_close(a.key, b.key)
        torch.testing.assert_close(a.value, b.value)
