"""PersonaMagic end to end in a real ComfyUI on the random SD1.5 checkpoint.

The example (examples_workflows/api/personamagic_train_apply_api.json) trains a mapper on the drawn face (4 steps at
128 px, face mask and identity loss from the PyTorch face analyzer with the random ArcFace, a random full-size
ViT-L/14 CLIP vision tower as the runner's InstantBooth demo models provide) and, in the same queue, applies it
and samples 64×64 with dpmpp_2m. The test adds a twin sampler fed the plain supercategory prompt with the
checkpoint's own MODEL, same seed, and saves both latents: they must differ (the PersonaMagic entries and the V
path were used). The written file is read back and checked.

Set FACEBOOTH_WRITE_UI=1 to (re)write the example's UI-format twin from this server's /object_info.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.torch import load_file

from facebooth.devmodels import instantbooth_models as ibm
from facebooth.pipelines.personamagic.files import load_personamagic
from facebooth.runner import examples as ex
from facebooth.runner import placeholders, ui_twins
from facebooth.runner.client import WorkflowFailedError

pytestmark = pytest.mark.slow

EXAMPLE = ex.API_DIR / "personamagic_train_apply_api.json"
TRAIN, APPLY, SAMPLER = "5", "6", "9"


@pytest.fixture(scope="module")
def clip_vision(comfy_base_dir, facebooth_cache_dir) -> dict[str, str]:
    """The random ViT-L/14 CLIP vision file (shared with InstantBooth's demo models) in models/clip_vision."""
    spec = next(s for s in ibm.demo_models(seed=0) if s["placeholder"] == "CLIP_VISION")
    target = facebooth_cache_dir / "instantbooth-demo" / spec["relpath"]
    spec["write"](target)  # skipped when the cached file has the same fingerprint
    link = comfy_base_dir / "models" / spec["relpath"]
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(target.resolve())
    return {"CLIP_VISION": spec["value"]}


@pytest.fixture(scope="module")
def example_run(comfy_server, comfy_base_dir, default_substitutions, clip_vision, run_workflow):
    subs = {**default_substitutions, **clip_vision, "WORKFLOW": "personamagic_it"}
    api = placeholders.substitute(ex.load_workflow(EXAMPLE), subs, name="personamagic_train_apply")
    if os.environ.get("FACEBOOTH_WRITE_UI"):
        ui_twins.write_ui_twin(EXAMPLE, comfy_server.client.object_info())
    sampler = api[SAMPLER]["inputs"]
    api["90"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of face wearing a santa hat", "clip": ["1", 1]}}
    api["91"] = {"class_type": "KSampler", "inputs": {**sampler, "model": ["1", 0], "positive": ["90", 0]}}
    api["92"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "pm_it/personamagic"}}
    api["93"] = {"class_type": "SaveLatent", "inputs": {"samples": ["91", 0], "filename_prefix": "pm_it/plain"}}
    start = len(comfy_server.log_text())
    images = run_workflow(comfy_server.client, api, subs)
    log = comfy_server.log_text()[start:]
    out = comfy_base_dir / "output" / "pm_it"
    latents = {p.name.split("_0")[0]: load_file(p)["latent_tensor"] for p in sorted(out.glob("*.latent"))}
    return api, subs, images, log, latents


def test_trains_writes_the_file_and_samples(example_run, comfy_base_dir):
    api, _, images, log, latents = example_run
    generated = [i for i in images if i.size == (64, 64)]
    curves = [i for i in images if i.size != (64, 64)]
    assert len(generated) == 1 and len(curves) == 1
    assert np.asarray(generated[0], dtype=np.float32).std() > 2.0
    assert "Traceback" not in log
    assert "PersonaMagic 'facebooth_example_persona': 4 steps" in log
    assert "mask True, identity loss True" in log  # the drawn face was found; the random ArcFace is PyTorch
    assert "PersonaMagic conditioning with 27 entries (dynamic stage [400, 800], 25 bins)" in log
    path = comfy_base_dir / "models" / "facebooth" / "personamagic" / "facebooth_example_persona.safetensors"
    pm = load_personamagic(path)
    assert pm.metadata["steps"] == "4" and pm.metadata["identity_loss"] == "True"
    assert pm.mapper.config.image_dim == 768 and pm.mapper.config.word_dim == 768  # ViT-L/14 projection, CLIP-L
    assert (pm.plan.t_low, pm.plan.t_high) == (400, 800)
    # the PersonaMagic branch differs from the plain supercategory prompt on the checkpoint's model
    assert set(latents) == {"personamagic", "plain"}
    assert (latents["personamagic"] - latents["plain"]).abs().max() > 1e-3


def test_requeue_does_not_train_again(example_run, comfy_server, run_workflow):
    api, subs, _, _, _ = example_run
    start = len(comfy_server.log_text())
    run_workflow(comfy_server.client, api, subs)
    log = comfy_server.log_text()[start:]
    assert "PersonaMagic 'facebooth_example_persona': 4 steps" not in log


def test_prompt_without_the_trigger_is_refused(example_run, comfy_server, run_workflow):
    api, subs, _, _, _ = example_run
    bad = {k: v for k, v in api.items() if k not in ("90", "91", "92", "93")}
    bad[APPLY] = {**bad[APPLY], "inputs": {**bad[APPLY]["inputs"], "prompt": "a photo of a man"}}
    with pytest.raises(WorkflowFailedError, match="does not contain the trigger word"):
        run_workflow(comfy_server.client, bad, subs)


def test_interrupt_during_training_leaves_no_file(example_run, comfy_server, comfy_base_dir):
    import threading

    api, _, _, _, _ = example_run
    train = {k: api[k] for k in ("1", "2", "3", TRAIN)}
    inputs = {k: v for k, v in train[TRAIN]["inputs"].items() if k != "face_analyzer"}
    train[TRAIN] = {**train[TRAIN], "inputs": {**inputs, "name": "fb_pm_interrupted", "steps": 400, "seed": 7, "overwrite": False}}
    client = comfy_server.client
    sent = threading.Event()

    def on_progress(event) -> None:
        if event.kind == "progress" and event.node_id == TRAIN and not sent.is_set():
            sent.set()
            client.interrupt()  # what the Cancel button sends

    prompt_id = client.queue_prompt(train)
    with pytest.raises(WorkflowFailedError, match="interrupted"):
        client.wait(prompt_id, timeout=600, on_progress=on_progress)
    assert sent.is_set(), "the training node never reported progress"
    folder = comfy_base_dir / "models" / "facebooth" / "personamagic"
    assert not [p.name for p in folder.iterdir() if "fb_pm_interrupted" in p.name]
