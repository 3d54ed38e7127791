"""PersonaMagic on SDXL end to end in a real ComfyUI with the random SDXL-family test checkpoint.

The example (examples_workflows/api/personamagic_sdxl_api.json; the runner fills 2 training steps at batch 1 and
128 px, 25 bins, 64 px and 4 sampling steps) trains a mapper for both SDXL text encoders with the face mask and the
identity loss (PyTorch face analyzer, random ArcFace, random ViT-L/14 CLIP vision), applies it and samples, in one
queue. A twin sampler fed the plain supercategory prompt with the checkpoint's own MODEL and the same seed saves its
latent too: the two must differ. The written file must say it is for SDXL.
"""
from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from facebooth.pipelines.personamagic.files import load_personamagic
from facebooth.runner import examples as ex
from integration.test_personamagic_workflow import clip_vision  # noqa: F401 (a fixture: the random ViT-L/14 file)

pytestmark = pytest.mark.slow  # integration: by its folder (tests/conftest.py)

EXAMPLE = ex.API_DIR / "personamagic_sdxl_api.json"
NAME = "facebooth_example_persona_sdxl"
SAMPLER = "9"


@pytest.fixture(scope="module")
def sdxl_run(comfy_server, comfy_base_dir, default_substitutions, clip_vision, run_workflow):  # noqa: F811
    subs = {**default_substitutions, **clip_vision, "WORKFLOW": "personamagic_sdxl_it"}
    api = ex.load_workflow(EXAMPLE)  # the runner fills the placeholders, the added nodes included
    sampler = api[SAMPLER]["inputs"]
    api["90"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of face wearing a santa hat", "clip": ["1", 1]}}
    api["91"] = {"class_type": "KSampler", "inputs": {**sampler, "model": ["1", 0], "positive": ["90", 0]}}
    api["92"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "pm_sdxl_it/personamagic"}}
    api["93"] = {"class_type": "SaveLatent", "inputs": {"samples": ["91", 0], "filename_prefix": "pm_sdxl_it/plain"}}
    start = len(comfy_server.log_text())
    images = run_workflow(comfy_server.client, api, subs, timeout=1800)
    log = comfy_server.log_text()[start:]
    out = comfy_base_dir / "output" / "pm_sdxl_it"
    latents = {p.name.split("_0")[0]: load_file(p)["latent_tensor"] for p in sorted(out.glob("*.latent"))}
    return images, log, latents


def test_sdxl_example_trains_applies_and_samples(sdxl_run, comfy_base_dir):
    images, log, latents = sdxl_run
    generated = [i for i in images if i.size == (64, 64)]
    assert len(generated) == 1 and len(images) == 2  # the image (random SDXL weights decode near-black) and the curve
    assert "Traceback" not in log
    assert f"PersonaMagic '{NAME}': 2 steps, batch 1" in log and "mask True, identity loss True, sdxl on" in log
    assert "PersonaMagic conditioning with 27 entries (dynamic stage [400, 800], 25 bins)" in log
    assert "does not exist" not in log and "shape mismatch" not in log
    # the PersonaMagic branch differs from the plain supercategory prompt on the checkpoint's own MODEL
    assert set(latents) == {"personamagic", "plain"}
    assert latents["personamagic"].shape == (1, 4, 8, 8) and latents["personamagic"].isfinite().all()
    assert (latents["personamagic"] - latents["plain"]).abs().max() > 1e-3


def test_the_written_file_says_it_is_for_sdxl(sdxl_run, comfy_base_dir):
    path = comfy_base_dir / "models" / "facebooth" / "personamagic" / f"{NAME}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["base_family"] == "sdxl" and meta["method"] == "personamagic"
    pm = load_personamagic(path)
    assert pm.mapper.config.word_dim == 2048 and pm.mapper.config.word_dims == (768, 1280)
    assert pm.metadata["steps"] == "2" and pm.metadata["identity_loss"] == "True"
