"""``facebooth batch --ray``: the small batch on a local Ray with two CPU actors, each starting its own ComfyUI.

The actors use ``num_gpus=0`` (the test override of the one-GPU-per-actor default); the journal stays in this
(driver) process and every request travels as an actor call.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from facebooth.runner.batch.jobs import matrix_jobs
from facebooth.runner.batch.journal import Journal
from facebooth.runner.batch.run import BatchSpec, execute
from helpers.batch_workflows import PROMPTS, TXT2IMG
from PIL import Image


def test_ray_mode_runs_the_batch_on_two_cpu_actors(comfyui_dir, facebooth_cache_dir, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # A loaded CI machine starts Ray's agents slowly; give the raylet longer to see them register.
    monkeypatch.setenv("RAY_agent_register_timeout_ms", "120000")
    from facebooth.runner.batch.ray_mode import RayCluster

    cluster = RayCluster.start(
        None, actors=2, gpus_per_actor=0, comfyui_dir=str(comfyui_dir), cache_dir=str(facebooth_cache_dir),
        init_kwargs={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 2**20,
                     "log_to_driver": False},
    )
    try:
        assert len({info["url"] for info in cluster.infos}) == 2
        jobs = matrix_jobs(None, PROMPTS, seeds=3, seed_base=4000)
        spec = BatchSpec(TXT2IMG, "raytest", jobs, {**cluster.substitutions, "WORKFLOW": "raytest"}, tmp_path)
        outcome = asyncio.run(execute(spec, cluster.backends(2), handle_signals=False))
    finally:
        cluster.shutdown()
    assert outcome.counts == {"pending": 0, "running": 0, "done": 6, "failed": 0}
    journal = Journal(tmp_path)
    rows = journal.rows()
    assert {r.server for r in rows} == {f"ray://{info['node']}/actor{i}" for i, info in enumerate(cluster.infos)}
    assert all(r.attempts == 1 and len(r.files) == 1 for r in rows)
    for r in rows:
        img = Image.open(tmp_path / r.files[0])
        assert img.size == (64, 64)
        assert json.loads(img.text["facebooth_job"])["key"] == r.key
    assert (tmp_path / "report.html").is_file()
