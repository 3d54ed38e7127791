"""Cross Initialization end to end in a real ComfyUI on the random SD1.5 checkpoint.

The example workflow (examples_workflows/api/cross_init_fast_api.json; the runner fills preset custom, 4 steps, batch 2, 64 px so
it stays quick on the tiny model) trains an embedding and, in the same queue, generates with
"embedding:NAME smiling, portrait photo" through core's StringConcatenate. The test adds a twin sampler
branch with the same seed and the prompt *without* the embedding and saves both latents: ComfyUI drops an
``embedding:`` word it cannot load (logging "does not exist"), and then both prompts tokenize identically, so
different latents plus a clean log show that CLIPTextEncode used the file. Bad inputs (a name with a path,
an existing file, an interrupt) go through the server as a user would meet them.
"""
from __future__ import annotations

import re
import threading

import pytest
import torch
from safetensors.torch import load_file

from facebooth.runner import examples as ex
from facebooth.runner import placeholders
from facebooth.runner.client import WorkflowFailedError, WorkflowRejectedError

pytestmark = pytest.mark.slow

EXAMPLE = ex.API_DIR / "cross_init_fast_api.json"
NAME = "fb_ci_integration"
TRAIN_NODE = "3"


def _example(subs: dict, name: str = NAME) -> dict:
    api = placeholders.substitute(ex.load_workflow(EXAMPLE), {**subs, "WORKFLOW": "cross_init_it"}, name="cross_init_fast")
    api[TRAIN_NODE]["inputs"]["name"] = name
    return api


def _train_only(subs: dict, name: str, **changes) -> dict:
    api = _example(subs, name)
    keep = {"1", "2", TRAIN_NODE}
    api = {k: v for k, v in api.items() if k in keep}
    api[TRAIN_NODE]["inputs"].update(changes)
    return api


@pytest.fixture(scope="module")
def example_run(comfy_server, comfy_base_dir, default_substitutions, run_workflow):
    api = _example(default_substitutions)
    sampler = api["8"]["inputs"]
    api["90"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "smiling, portrait photo", "clip": ["1", 1]}}
    api["91"] = {"class_type": "KSampler", "inputs": {**sampler, "positive": ["90", 0]}}
    api["92"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "ci_it/with_embedding"}}
    api["93"] = {"class_type": "SaveLatent", "inputs": {"samples": ["91", 0], "filename_prefix": "ci_it/without"}}
    start = len(comfy_server.log_text())
    images = run_workflow(comfy_server.client, api)
    log = comfy_server.log_text()[start:]
    out = comfy_base_dir / "output" / "ci_it"
    latents = {p.name.split("_0")[0]: load_file(p)["latent_tensor"] for p in sorted(out.glob("*.latent"))}
    return images, log, latents


def test_example_trains_then_generates_with_the_embedding(example_run, comfy_base_dir):
    images, log, _ = example_run
    assert [im.size for im in images] == [(64, 64), (512, 256)]  # the sample, then the loss curve
    path = comfy_base_dir / "models" / "embeddings" / f"{NAME}.safetensors"
    tensors = load_file(path)
    assert list(tensors) == ["clip_l"] and tensors["clip_l"].shape == (2, 768)
    assert torch.isfinite(tensors["clip_l"]).all()
    assert f"Cross Initialization of '{NAME}'" in log and f"use embedding:{NAME} in a prompt" in log


def test_clip_text_encode_picks_the_embedding_up(example_run):
    _, log, latents = example_run
    # ComfyUI warns "warning, embedding:NAME does not exist, ignoring" for a missing file and
    # "WARNING: shape mismatch when trying to apply embedding ..." for a wrong width.
    assert "does not exist" not in log, [ln for ln in log.splitlines() if "does not exist" in ln]
    assert "shape mismatch" not in log, [ln for ln in log.splitlines() if "shape mismatch" in ln]
    assert set(latents) == {"with_embedding", "without"}
    with_emb, without = latents["with_embedding"], latents["without"]
    assert with_emb.shape == without.shape == (1, 4, 8, 8)
    assert not torch.equal(with_emb, without)  # same seed, same text otherwise: the embedding changed the result


def test_missing_embedding_would_be_ignored_and_logged(comfy_server, default_substitutions, run_workflow):
    """The negative control for the check above: an unknown embedding is dropped with the logged warning."""
    api = {k: v for k, v in _example(default_substitutions).items() if k in {"1", "5", "6", "7", "8", "9", "10"}}
    api["5"]["inputs"]["text"] = "embedding:fb_ci_no_such_file smiling, portrait photo"
    start = len(comfy_server.log_text())
    run_workflow(comfy_server.client, api)
    log = comfy_server.log_text()[start:]
    assert re.search(r"embedding:fb_ci_no_such_file\b.* does not exist", log), log[-2000:]


def test_name_with_a_path_is_rejected_before_running(comfy_server, default_substitutions):
    with pytest.raises(WorkflowRejectedError) as info:
        comfy_server.client.queue_prompt(_train_only(default_substitutions, "../escape"))
    assert "path separator" in str(info.value) and TRAIN_NODE in info.value.node_errors


def test_existing_embedding_is_not_overwritten(comfy_server, comfy_base_dir, default_substitutions):
    folder = comfy_base_dir / "models" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    taken = folder / "fb_ci_taken.safetensors"
    taken.write_bytes(b"an embedding someone made earlier")
    prompt_id = comfy_server.client.queue_prompt(_train_only(default_substitutions, "fb_ci_taken"))
    with pytest.raises(WorkflowFailedError, match="already exists.*overwrite"):
        comfy_server.client.wait(prompt_id, timeout=300)
    assert taken.read_bytes() == b"an embedding someone made earlier"


def test_interrupt_during_training_leaves_no_file(comfy_server, comfy_base_dir, default_substitutions):
    client = comfy_server.client
    api = _train_only(default_substitutions, "fb_ci_interrupted", steps=400, seed=7)
    sent = threading.Event()

    def on_progress(event) -> None:
        if event.kind == "progress" and event.node_id == TRAIN_NODE and not sent.is_set():
            sent.set()
            client.interrupt()  # what the Cancel button sends

    prompt_id = client.queue_prompt(api)
    with pytest.raises(WorkflowFailedError, match="interrupted"):
        client.wait(prompt_id, timeout=600, on_progress=on_progress)
    assert sent.is_set(), "the training node never reported progress"
    folder = comfy_base_dir / "models" / "embeddings"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(("fb_ci_interrupted", ".fb_ci_interrupted"))]
