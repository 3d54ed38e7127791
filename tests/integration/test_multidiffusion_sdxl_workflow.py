"""MultiDiffusion's two-subject SDXL example in a real ComfyUI with the random SDXL-family test checkpoint (the runner
fills 128x64 px, 64 px views, 4 steps): it samples, each region prompt gets its own y (logged), and nothing fails."""
from __future__ import annotations

import pytest

from facebooth.runner import examples as ex

pytestmark = pytest.mark.slow


def test_two_subject_sdxl_workflow_runs_with_per_region_pooled_output(comfy_server, run_workflow):
    start = len(comfy_server.log_text())
    images = run_workflow(comfy_server.client, ex.API_DIR / "multidiffusion_sdxl_api.json", timeout=1800)
    log = comfy_server.log_text()[start:]
    assert [im.size for im in images] == [(128, 64)]
    assert "2 region prompt(s) use their own pooled output and size conditioning (128x64 px)" in log, log[-3000:]
    assert "Traceback" not in log
