"""Cross Initialization on SDXL end to end in a real ComfyUI with the random SDXL-family test checkpoint.

The example workflow (examples_workflows/api/cross_init_sdxl_api.json; the runner fills preset custom, 2 steps,
batch 1, 64 px) trains an embedding for both SDXL text encoders and generates with "embedding:NAME smiling,
portrait photo". A twin sampler branch with the same seed and the prompt without the embedding saves its
latent too: ComfyUI drops an ``embedding:`` word it cannot load ("does not exist") and skips a tensor of the
wrong width ("shape mismatch"), so different latents plus a clean log show CLIPTextEncode used both halves.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from facebooth.runner import examples as ex
from facebooth.runner import placeholders

pytestmark = pytest.mark.slow

EXAMPLE = ex.API_DIR / "cross_init_sdxl_api.json"
NAME = "fb_ci_sdxl_integration"


@pytest.fixture(scope="module")
def sdxl_run(comfy_server, comfy_base_dir, default_substitutions, run_workflow):
    api = placeholders.substitute(ex.load_workflow(EXAMPLE), {**default_substitutions, "WORKFLOW": "cross_init_sdxl_it"},
                        name="cross_init_sdxl")
    api["3"]["inputs"]["name"] = NAME
    sampler = api["8"]["inputs"]
    api["90"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "smiling, portrait photo", "clip": ["1", 1]}}
    api["91"] = {"class_type": "KSampler", "inputs": {**sampler, "positive": ["90", 0]}}
    api["92"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "ci_sdxl_it/with_embedding"}}
    api["93"] = {"class_type": "SaveLatent", "inputs": {"samples": ["91", 0], "filename_prefix": "ci_sdxl_it/without"}}
    start = len(comfy_server.log_text())
    images = run_workflow(comfy_server.client, api, timeout=1800)
    log = comfy_server.log_text()[start:]
    out = comfy_base_dir / "output" / "ci_sdxl_it"
    latents = {p.name.split("_0")[0]: load_file(p)["latent_tensor"] for p in sorted(out.glob("*.latent"))}
    return images, log, latents


def test_sdxl_example_trains_a_two_encoder_embedding_and_says_its_family(sdxl_run, comfy_base_dir):
    images, log, _ = sdxl_run
    assert [im.size for im in images][0] == (64, 64)
    path = comfy_base_dir / "models" / "embeddings" / f"{NAME}.safetensors"
    tensors = load_file(path)
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert tensors["clip_l"].shape == (2, 768) and tensors["clip_g"].shape == (2, 1280)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["base_family"] == "sdxl" and meta["method"] == "cross_init"
    assert "sdxl on" in log and f"use embedding:{NAME} in a prompt" in log and "(SDXL, 2 steps" in log


def test_sdxl_prompt_picks_up_both_halves_of_the_embedding(sdxl_run):
    _, log, latents = sdxl_run
    assert "does not exist" not in log, [ln for ln in log.splitlines() if "does not exist" in ln]
    assert "shape mismatch" not in log, [ln for ln in log.splitlines() if "shape mismatch" in ln]
    assert set(latents) == {"with_embedding", "without"}
    assert latents["with_embedding"].shape == latents["without"].shape == (1, 4, 8, 8)
    assert not torch.equal(latents["with_embedding"], latents["without"])
