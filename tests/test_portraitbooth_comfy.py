"""PortraitBooth and MultiDiffusion nodes inside ComfyUI's own code (a subprocess per mode, see
helpers/portraitbooth_comfy_script.py), checked against independent references:

* FastComposer loader: a synthetic checkpoint in the official layout (old VAE attention names, text encoder without
  ``text_model.``, persistent position_ids, bf16/fp32 mix) becomes an SD15 MODEL whose UNet equals diffusers'
  UNet2DConditionModel, a CLIP equal to transformers' CLIPTextModel and a VAE equal to diffusers' AutoencoderKL;
* STEA conditioning: in a long prompt with weights and an embedding, exactly the subject rows change, and they equal
  FastComposer's post-fuse MLP in plain torch ops on transformers' CLIP image embedding, weighted by ComfyUI's rule;
* MultiDiffusion: sampling through our APPLY_MODEL wrapper gives the same latents as ComfyUI's native mask
  conditioning (the same mask-weighted average), batched into one UNet call per step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "helpers" / "portraitbooth_comfy_script.py"
pytestmark = pytest.mark.slow


def _comfy_dir() -> Path:
    root = os.environ.get("COMFYUI_DIR")
    if not root or not (Path(root).expanduser() / "comfy" / "sd.py").is_file():
        pytest.skip("COMFYUI_DIR is not set (these checks run ComfyUI's own loaders and samplers)")
    return Path(root).expanduser()


def _run(mode: str, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp(f"pb-{mode}")
    out = work / "out.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(_comfy_dir()), str(work), str(out), mode],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and out.is_file(), run.stdout[-2000:] + run.stderr[-5000:]
    data = json.loads(out.read_text())
    errors = {k: v for k, v in data.items() if k.endswith("_error")}
    assert not errors, "\n\n".join(f"{k}:\n{v}" for k, v in errors.items())
    return data


@pytest.fixture(scope="module")
def fc(tmp_path_factory) -> dict:
    return _run("fastcomposer", tmp_path_factory)


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> dict:
    return _run("multidiffusion", tmp_path_factory)


def test_fastcomposer_loader_gives_sd15_parts_equal_to_diffusers_and_transformers(fc):
    assert fc["model_class"] == "SD15"
    assert fc["unet_err"] < 1e-4 * max(1.0, fc["unet_scale"])
    assert fc["clip_err"] < 1e-4
    assert fc["vae_err"] < 1e-4


def test_stea_changes_exactly_the_subject_rows_and_matches_the_reference(fc):
    assert fc["stea_chunks"] >= 2 and fc["stea_has_embedding_token"]
    assert fc["stea_changed_words"] == ["woman</w>", "man</w>"]
    assert fc["stea_other_rows_equal"]
    assert max(fc["stea_errs"]) < 1e-4
    assert fc["single_avg_ok"]


def test_delayed_subject_conditioning_is_a_timestep_range_split(fc):
    assert fc["delayed_ranges"] == [[0.0, 0.2], [0.2, 1.0]]
    assert fc["delayed_text_is_plain"] and fc["delayed_fused_is_fused"]


def test_subject_word_errors_are_clear(fc):
    assert "does not occur" in fc["error_missing"] and "'a photo of a woman'" in fc["error_missing"]
    assert "is an embedding" in fc["error_embedding"]


def test_arcface_stea_file_in_comfyui(fc):
    assert fc["arcface_stea_err"] < 1e-4
    assert "Face Analyzer (PyTorch)" in fc["arcface_needs_analyzer"]


def test_multidiffusion_wrapper_equals_comfyui_mask_conditioning_in_one_call_per_step(md):
    assert md["md_vs_native_err"] < 1e-4
    assert md["md_vs_plain_diff"] > 1e-2  # the regions really change the result
    assert md["md_calls"] and all(n == 4 for n in md["md_calls"])  # uncond + background + 2 regions, one call
    assert md["md_boot_finite"] and md["md_boot_differs"] > 1e-3
    assert "connect 'vae'" in md["md_needs_vae"]
