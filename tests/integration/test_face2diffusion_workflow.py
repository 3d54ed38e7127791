"""Face2Diffusion in a real ComfyUI: the example workflows run and save images, the identity reaches the sampler,
and strength 0 is exactly the plain CLIP Text Encode.

The random MSID / mapping files (official sizes and layout, plain torch.save state dicts) are written into the
session's models/facebooth/face2diffusion folder here, unless the runner already linked them there.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from facebooth.devmodels.face2diffusion_models import MAPPING_FILE, MSID_FILE, write_random_msid, write_random_mapping
from facebooth.runner import examples as ex
from facebooth.runner import placeholders

BASIC = ex.API_DIR / "face2diffusion_basic_api.json"
TWO_PEOPLE = ex.API_DIR / "face2diffusion_two_people_api.json"


@pytest.fixture(scope="module")
def f2d_files(comfy_base_dir) -> dict[str, str]:
    folder = comfy_base_dir / "models" / "facebooth" / "face2diffusion"
    if not (folder / MSID_FILE).exists():
        write_random_msid(folder / MSID_FILE, seed=0)
    if not (folder / MAPPING_FILE).exists():
        write_random_mapping(folder / MAPPING_FILE, seed=0)
    return {"F2D_MSID": MSID_FILE, "F2D_MAPPING": MAPPING_FILE}


@pytest.fixture(scope="module")
def basic_image(comfy_server, run_workflow, f2d_files):
    images = run_workflow(comfy_server.client, BASIC, f2d_files)
    assert len(images) == 1
    return images[0]


def _arr(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_loader_lists_the_official_files(comfy_server, f2d_files):
    inputs = comfy_server.client.object_info()["FaceBoothF2DLoader"]["input"]["required"]

    def options(name: str) -> list:
        spec = inputs[name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos list their options apart

    assert MSID_FILE in options("msid_file") and MAPPING_FILE in options("mapping_file")


def test_basic_workflow_returns_a_tame_64x64_image(basic_image):
    assert basic_image.size == (64, 64)
    arr = _arr(basic_image)
    assert arr.std() > 5.0 and ((arr >= 254) | (arr <= 1)).mean() < 0.5


def _with_strength(api: dict, strength: float) -> dict:
    api = copy.deepcopy(api)
    api["6"]["inputs"]["strength"] = strength
    return api


def test_identity_reaches_the_sampler_and_strength_zero_is_plain_text(comfy_server, run_workflow, f2d_files, basic_image):
    api = ex.load_workflow(BASIC)
    zero = run_workflow(comfy_server.client, _with_strength(api, 0.0), f2d_files)[0]
    plain_api = copy.deepcopy(api)
    plain_api["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": api["6"]["inputs"]["text"], "clip": ["4", 1]}}
    for unused in ("1", "2", "3", "5"):  # the face branch is not needed for plain text
        plain_api.pop(unused)
    plain = run_workflow(comfy_server.client, plain_api, f2d_files)[0]
    assert np.array_equal(_arr(zero), _arr(plain)), "strength 0 must give exactly the plain prompt's conditioning"
    assert not np.array_equal(_arr(basic_image), _arr(plain)), "the F2D vectors did not change the image"


def test_a_prompt_without_the_placeholder_fails_with_a_clear_message(comfy_server, default_substitutions, f2d_files):
    from facebooth.runner.client import WorkflowFailedError

    api = placeholders.substitute(ex.load_workflow(BASIC), {**default_substitutions, **f2d_files, "WORKFLOW": "f2d_no_placeholder"})
    api["6"]["inputs"]["text"] = "a photo of a person"
    prompt_id = comfy_server.client.queue_prompt(api)
    with pytest.raises(WorkflowFailedError) as info:
        comfy_server.client.wait(prompt_id, timeout=300)
    assert info.value.details.get("node_id") == "6"
    assert "f l" in str(info.value)


@pytest.mark.slow
def test_two_people_workflow_runs(comfy_server, run_workflow, f2d_files):
    images = run_workflow(comfy_server.client, TWO_PEOPLE, f2d_files)
    assert len(images) == 1 and images[0].size == (64, 64)
