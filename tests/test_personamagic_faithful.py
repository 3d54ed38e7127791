"""PersonaMagic details that follow the paper (issue 10, point 3): the mapper's anchor timesteps span the dynamic
stage actually trained (the one the IoU partition finds, or a custom one), and the Tandem Equilibrium prompt pool
has the paper's 40 prompts."""
from __future__ import annotations

import math

import pytest
import torch

from facebooth.pipelines.personamagic.backends import DiffusersKVBackend
from facebooth.pipelines.personamagic.train import TE_PROMPTS, FaceGuidance, PersonaMagicRun, PersonaMagicSettings
from facebooth.pipelines.runtime import RunHooks
from test_ti_engine import tiny_backend, tiny_images


def _codes(timesteps: list[float], dim: int) -> torch.Tensor:
    """The standard sinusoidal timestep code, written out: [cos(t f_k)] ++ [sin(t f_k)], f_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    rows = []
    for t in timesteps:
        f = [math.exp(-math.log(10000.0) * k / half) for k in range(half)]
        rows.append([math.cos(t * x) for x in f] + [math.sin(t * x) for x in f])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = tiny_backend(tmp_path_factory.mktemp("pm_anchor"))
    tower = b.text_encoders[0]
    return DiffusersKVBackend(b.unet, b.vae, tower.encoder, tower.tokenizer, b.scheduler)


def _run(backend, guidance=None, **kw) -> PersonaMagicRun:
    settings = PersonaMagicSettings(**{**dict(steps=3, batch_size=2, lr=1e-3, resolution=16, supercategory="x", num_anchors=50), **kw})
    return PersonaMagicRun(backend, None, torch.randn(1, 16, generator=torch.Generator().manual_seed(4)), settings, guidance,
                           RunHooks(), pixels=tiny_images(1))


def test_anchor_timesteps_follow_the_iou_stages(backend, monkeypatch):
    mask = torch.zeros(1, 16, 16)
    mask[:, 3:13, 4:12] = 1
    run = _run(backend, FaceGuidance(masks=mask), steps=4, stages="iou", warmup_steps=2, iou_stride=100, iou_samples=1)
    assert (run.mapper.config.anchor_start, run.mapper.config.anchor_end) == (400, 800)  # before the partition
    monkeypatch.setattr(run.engine, "measure_ious", lambda grid: {t: 0.2 if t >= 600 else (0.75 if t >= 300 else 0.95) for t in grid})
    seen = {}
    real = run.engine.partition_stages

    def partition():
        plan = real()
        seen["weight"] = run.mapper.input_layer.weight.detach().clone()
        return plan

    monkeypatch.setattr(run.engine, "partition_stages", partition)
    result = run.run()
    assert (result.plan.t_low, result.plan.t_high) == (251, 550)
    cfg = result.mapper.config
    assert (cfg.anchor_start, cfg.anchor_end) == (251, 550)
    # right after the partition the kernel bank sits at 50 anchors spread over [251, 550)
    anchors = [251 + k * (550 - 251) / 50 for k in range(50)]
    assert anchors[-1] < 550 and anchors[-1] > 540
    torch.testing.assert_close(seen["weight"], _codes(anchors, cfg.time_dim), rtol=0, atol=1e-4)  # float32 phases


def test_custom_and_official_stages_anchor_where_they_train(backend):
    custom = _run(backend, stages="custom", t_low=300, t_high=500)
    cfg = custom.mapper.config
    assert (cfg.anchor_start, cfg.anchor_end) == (300, 500)
    torch.testing.assert_close(custom.mapper.input_layer.weight.detach(), _codes([300 + 4 * k for k in range(50)], cfg.time_dim),
                               rtol=0, atol=1e-4)
    official = _run(backend)
    assert official.mapper.config.anchors.tolist() == list(range(400, 800, 8))  # range(400, 800, 400 // 50)


def test_tandem_equilibrium_pool_has_the_papers_40_prompts():
    assert len(TE_PROMPTS) == 40 and len(set(TE_PROMPTS)) == 40
    assert all(p.count("{}") == 1 for p in TE_PROMPTS)
