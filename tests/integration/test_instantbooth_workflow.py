"""InstantBooth example workflows in a real ComfyUI: random InstantBooth weights and a random full-size ViT-L/14
CLIP vision tower (the smallest ComfyUI's clip_vision loader accepts), as the runner's default models provide."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from facebooth.devmodels import instantbooth_models as ibm
from facebooth.runner import examples as ex

EXAMPLES = {name: ex.API_DIR / f"instantbooth_{name}_api.json" for name in ("photo", "faces")}


@pytest.fixture(scope="module")
def instantbooth_models(comfy_base_dir, facebooth_cache_dir) -> dict[str, str]:
    """The runner's default InstantBooth files, written once into the test cache and linked into models/."""
    subs = {}
    for spec in ibm.demo_models(seed=0):
        target = facebooth_cache_dir / "instantbooth-demo" / spec["relpath"]
        spec["write"](target)  # skipped when the cached file has the same fingerprint
        link = comfy_base_dir / "models" / spec["relpath"]
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(target.resolve())
        subs[spec["placeholder"]] = spec["value"]
    return subs


def _outputs(images):
    """(generated images, reference-crop images) by size: 64 px samples, 224 px crops."""
    return [i for i in images if i.size == (64, 64)], [i for i in images if i.size == (224, 224)]


@pytest.mark.slow
def test_photo_example_runs_with_a_vit_l_clip_vision(comfy_server, run_workflow, instantbooth_models):
    images = run_workflow(comfy_server.client, EXAMPLES["photo"], instantbooth_models)
    generated, refs = _outputs(images)
    assert len(generated) == 1 and len(refs) == 1
    arr = np.asarray(generated[0], dtype=np.float32)
    assert arr.std() > 2.0  # an image, not a flat or failed decode
    log = comfy_server.log_text()
    assert "missing clip vision" not in log  # ComfyUI took our file as ViT-L/14 and used every key
    assert "InstantBooth: 1 reference(s), 257 patch tokens" in log


@pytest.mark.slow
def test_faces_example_uses_masked_face_crops_of_two_photos(comfy_server, run_workflow, instantbooth_models):
    images = run_workflow(comfy_server.client, EXAMPLES["faces"], instantbooth_models)
    generated, refs = _outputs(images)
    assert len(generated) == 1 and len(refs) == 2
    crop = np.asarray(refs[0], dtype=np.float32)
    assert crop[:4, :4].max() == 0 and crop[100:124, 100:124].mean() > 20  # black background, face in the middle
    assert "InstantBooth: 2 reference(s), 514 patch tokens" in comfy_server.log_text()


@pytest.mark.slow
def test_beta_zero_gives_the_unpatched_sampler_output_in_comfyui(comfy_server, run_workflow, instantbooth_models):
    """Same graph, same conditioning: sampling the patched model at beta 0 equals sampling the checkpoint's model."""
    api = ex.load_workflow(EXAMPLES["photo"])
    del api["11"]  # only the generated image

    def variant(beta: float, patched: bool) -> bytes:
        wf = copy.deepcopy(api)
        wf["5"]["inputs"]["beta"] = beta
        wf["8"]["inputs"]["model"] = ["5", 0] if patched else ["1", 0]
        wf["10"]["inputs"]["filename_prefix"] = f"FaceBooth/ib_beta{beta}_{'patched' if patched else 'plain'}"
        (img,) = run_workflow(comfy_server.client, wf, instantbooth_models)
        return np.asarray(img).tobytes()

    plain = variant(0.0, patched=False)
    assert variant(0.0, patched=True) == plain
    assert variant(1.0, patched=True) != plain
