"""PortraitBooth / FastComposer and MultiDiffusion in a real ComfyUI: the example workflows run (two subjects with
MultiDiffusion, one subject, expression edit), the identity reaches the sampler, text-only conditioning equals the
plain CLIP Text Encode, MultiDiffusion with the background's own prompt in every region equals plain sampling, and
bad input fails with a clear message.

The random FastComposer-layout checkpoint (``fastcomposer_random.bin``: the random SD1.5 test models in FastComposer's
key layout with its old names and bf16/fp32 mix) and a random PortraitBooth STEA file are written into the session's
models/facebooth/portraitbooth folder here, unless the runner already linked them there.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from facebooth.devmodels.portraitbooth_models import FASTCOMPOSER_FILE, STEA_FILE, write_random_fastcomposer, write_random_stea
from facebooth.runner import examples as ex
from facebooth.runner import placeholders
from facebooth.runner.client import WorkflowFailedError

SINGLE = ex.API_DIR / "portraitbooth_single_api.json"
TWO = ex.API_DIR / "multidiffusion_two_subjects_api.json"
EXPRESSION = ex.API_DIR / "portraitbooth_expression_api.json"


@pytest.fixture(scope="module")
def pb_files(comfy_base_dir, random_checkpoint_name, default_substitutions) -> dict[str, str]:
    """The runner's random files when its default setup provides them, else written here."""
    folder = comfy_base_dir / "models" / "facebooth" / "portraitbooth"
    names = {"FASTCOMPOSER": default_substitutions.get("FASTCOMPOSER", FASTCOMPOSER_FILE),
             "PORTRAITBOOTH_STEA": default_substitutions.get("PORTRAITBOOTH_STEA", STEA_FILE)}
    if not (folder / names["FASTCOMPOSER"]).exists():
        sd15 = comfy_base_dir / "models" / "checkpoints" / random_checkpoint_name
        write_random_fastcomposer(folder / names["FASTCOMPOSER"], seed=0, sd15_checkpoint=sd15)
    if not (folder / names["PORTRAITBOOTH_STEA"]).exists():
        write_random_stea(folder / names["PORTRAITBOOTH_STEA"], seed=0)
    return names


def _arr(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def _tame(img) -> bool:
    arr = _arr(img)
    return arr.std() > 5.0 and ((arr >= 254) | (arr <= 1)).mean() < 0.5


@pytest.fixture(scope="module")
def single_image(comfy_server, run_workflow, pb_files):
    images = run_workflow(comfy_server.client, SINGLE, pb_files)
    assert len(images) == 1
    return images[0]


def test_loaders_list_the_files(comfy_server, pb_files):
    info = comfy_server.client.object_info()
    for node in ("FaceBoothFastComposerLoader", "FaceBoothSTEALoader"):
        spec = info[node]["input"]["required"]["file"]
        options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
        assert pb_files["FASTCOMPOSER"] in options and pb_files["PORTRAITBOOTH_STEA"] in options


def test_two_subject_multidiffusion_workflow_runs(comfy_server, run_workflow, pb_files):
    images = run_workflow(comfy_server.client, TWO, pb_files)
    assert len(images) == 1 and images[0].size == (128, 64)
    assert _tame(images[0])
    log = comfy_server.log_text()
    assert "MultiDiffusion: 2 region(s)" in log


def test_single_subject_workflow_runs(single_image):
    assert single_image.size == (64, 64) and _tame(single_image)


def test_expression_workflow_runs_with_the_arcface_stea(comfy_server, run_workflow, pb_files):
    images = run_workflow(comfy_server.client, EXPRESSION, pb_files)
    assert len(images) == 2 and all(img.size == (64, 64) for img in images)
    assert not np.array_equal(_arr(images[0]), _arr(images[1])), "the expression words did not change the image"


def test_identity_reaches_the_sampler_and_text_only_is_plain_clip(comfy_server, run_workflow, pb_files, single_image):
    api = ex.load_workflow(SINGLE)
    text_only = copy.deepcopy(api)
    text_only["5"]["inputs"]["start_at"] = 1.0
    plain = copy.deepcopy(api)
    plain["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": api["5"]["inputs"]["text"], "clip": ["4", 1]}}
    for unused in ("1", "2", "3"):
        plain.pop(unused)
    a = run_workflow(comfy_server.client, text_only, pb_files)[0]
    b = run_workflow(comfy_server.client, plain, pb_files)[0]
    assert np.array_equal(_arr(a), _arr(b)), "text-only conditioning must equal the plain CLIP Text Encode"
    assert not np.array_equal(_arr(single_image), _arr(b)), "the STEA identity did not change the image"


def test_multidiffusion_with_the_background_prompt_everywhere_is_plain_sampling(comfy_server, run_workflow, pb_files):
    """Regions that repeat the background's conditioning, no bootstrapping, one view: the mask-weighted average of
    equal predictions is the plain prediction, so the image equals sampling without MultiDiffusion."""
    api = ex.load_workflow(TWO)
    same = copy.deepcopy(api)
    same["11"]["inputs"]["conditioning"] = ["9", 0]
    same["12"]["inputs"]["conditioning"] = ["9", 0]
    same["13"]["inputs"].update({"bootstrap_fraction": 0.0, "window_size": 512})
    for unused in ("1", "2", "3", "4", "5", "7", "8"):
        same.pop(unused)
    plain = copy.deepcopy(same)
    plain["15"]["inputs"]["model"] = ["6", 0]
    for unused in ("11", "12", "13"):
        plain.pop(unused)
    a = run_workflow(comfy_server.client, same, pb_files)[0]
    b = run_workflow(comfy_server.client, plain, pb_files)[0]
    assert np.abs(_arr(a) - _arr(b)).max() <= 1.0


def test_missing_subject_word_fails_with_a_clear_message(comfy_server, default_substitutions, pb_files):
    api = placeholders.substitute(ex.load_workflow(SINGLE), {**default_substitutions, **pb_files, "WORKFLOW": "pb_missing_word"})
    api["5"]["inputs"]["text"] = "a photo of a woman"
    prompt_id = comfy_server.client.queue_prompt(api)
    with pytest.raises(WorkflowFailedError) as info:
        comfy_server.client.wait(prompt_id, timeout=300)
    assert info.value.details.get("node_id") == "5"
    assert "'man' does not occur in the prompt" in str(info.value)


def test_stea_file_in_the_fastcomposer_loader_says_which_loader_to_use(comfy_server, default_substitutions, pb_files):
    api = placeholders.substitute(ex.load_workflow(SINGLE), {**default_substitutions, **pb_files, "WORKFLOW": "pb_wrong_loader"})
    api["4"]["inputs"]["file"] = pb_files["PORTRAITBOOTH_STEA"]
    prompt_id = comfy_server.client.queue_prompt(api)
    with pytest.raises(WorkflowFailedError) as info:
        comfy_server.client.wait(prompt_id, timeout=300)
    assert "Load PortraitBooth STEA" in str(info.value)
