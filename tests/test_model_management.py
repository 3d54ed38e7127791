"""Every torch module FaceBooth's method nodes own is managed by ComfyUI (ComfyUI imported in-process, random
SD1.5 checkpoint; skipped without COMFYUI_DIR).

After a method node runs, its models are in ``comfy.model_management.current_loaded_models`` (ComfyUI placed them
with ``load_models_gpu``); after ``unload_all_models`` (what ``POST /free {"unload_models": true}`` runs) they are
gone from it and their weights sit on the offload device. On a CPU-only run the load and offload devices are the
same, so the bookkeeping is what is checked: the load/offload devices ComfyUI chose, membership of
current_loaded_models, and that the module-level caches hold ModelPatchers, never bare modules or GPU tensors.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import comfy_inprocess

pytestmark = pytest.mark.slow  # loads the random SD1.5 checkpoint


@pytest.fixture(scope="module")
def ckpt(comfy):
    return comfy_inprocess.load_checkpoint()


@pytest.fixture
def mm(ckpt):
    import comfy.model_management

    comfy.model_management.unload_all_models()
    return comfy.model_management


def _loaded(mm, patcher) -> bool:
    return any(m is patcher for m in mm.loaded_models())


def _check_managed(mm, patcher, module: torch.nn.Module) -> None:
    import comfy.model_patcher

    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert patcher.load_device == mm.get_torch_device()
    assert patcher.offload_device == mm.unet_offload_device()
    assert any(m is module for m in patcher.model.modules())


def _check_evicted(mm, patcher) -> None:
    mm.unload_all_models()
    assert not _loaded(mm, patcher)
    assert all(p.device == patcher.offload_device for p in patcher.model.parameters())


def _walk(obj, seen: set, found: dict) -> None:
    """Collect the ModelPatchers, bare modules and tensors reachable from a module-level object."""
    import comfy.model_patcher
    from facebooth.nodes.common import ModelCache

    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, comfy.model_patcher.ModelPatcher):
        found["patchers"].append(obj)
    elif isinstance(obj, torch.nn.Module):
        found["modules"].append(obj)
    elif isinstance(obj, torch.Tensor):
        found["tensors"].append(obj)
    elif isinstance(obj, ModelCache):
        _walk(obj._items, seen, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, seen, found)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk(v, seen, found)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), seen, found)


def _module_caches(module) -> dict:
    found: dict = {"patchers": [], "modules": [], "tensors": []}
    seen: set = set()
    for name, value in vars(module).items():
        if not name.startswith("__") and not isinstance(value, type) and not callable(value):
            _walk(value, seen, found)
    return found


def _check_caches(*node_modules) -> None:
    for node_module in node_modules:
        found = _module_caches(node_module)
        managed = [p.model for p in found["patchers"]]
        for module in found["modules"]:  # a module in a cache is only ever the model of a cached patcher (or part of it)
            assert any(module is sub for m in managed for sub in m.modules()), (node_module.__name__, type(module).__name__)
        assert all(t.device.type == "cpu" for t in found["tensors"]), node_module.__name__
        for p in found["patchers"]:  # after an unload, cached weights sit on the offload device
            assert all(w.device == p.offload_device for w in p.model.parameters()), node_module.__name__


def test_face2diffusion_models_are_loaded_and_evicted_by_comfyui(mm, ckpt, tmp_path, monkeypatch):
    import folder_paths
    from facebooth.devmodels.face2diffusion_models import write_random_pair
    from facebooth.nodes import face2diffusion as node
    from facebooth.pipelines.face2diffusion import F2DMappingConfig, MSIDConfig

    _, clip, _ = ckpt
    write_random_pair(tmp_path, seed=0, msid_config=MSIDConfig(embed_dim=64, depth=2, num_heads=2, feature_blocks=(0, 1)),
                      mapping_config=F2DMappingConfig(id_dim=128, hidden_dim=64, out_dim=768))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facebooth/face2diffusion", ([str(tmp_path)], {".pt"}))
    f2d = node.F2DLoader.execute(msid_file="msid.pt", mapping_file="mapping.pt", device="auto")[0]
    _check_managed(mm, f2d.patcher, f2d.msid)
    _check_managed(mm, f2d.patcher, f2d.mapping)
    assert not _loaded(mm, f2d.patcher)  # loading a file places nothing yet
    crops = torch.rand(1, 112, 112, 3)
    node.F2DEncode.execute(clip=clip, f2d=f2d, text="a photo of f l", placeholder="f", strength=1.0, face_crops=crops)
    assert _loaded(mm, f2d.patcher)
    _check_evicted(mm, f2d.patcher)
    node.F2DIdentityNode.execute(f2d=f2d, placeholder="v", strength=1.0, face_crops=crops)
    assert _loaded(mm, f2d.patcher)
    _check_evicted(mm, f2d.patcher)
    _check_caches(node)


def test_instantbooth_heads_and_adapters_are_loaded_with_the_unet_and_evicted(mm, ckpt, tmp_path, monkeypatch):
    import json

    import comfy.clip_vision
    import comfy.sample
    import folder_paths
    from facebooth.devmodels.instantbooth_models import (
        TINY_CLIP_VISION,
        random_clip_vision_state_dict,
        random_instantbooth_model,
        tiny_checkpoint_layout,
    )
    from facebooth.nodes import instantbooth as node
    from facebooth.pipelines.instantbooth import save_instantbooth

    model, clip, _ = ckpt
    save_instantbooth(random_instantbooth_model(tiny_checkpoint_layout(), seed=3, clip_config=TINY_CLIP_VISION, gate=0.5),
                      tmp_path / "ib.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facebooth/instantbooth", ([str(tmp_path)], {".safetensors"}))
    cfg = tmp_path / "tiny_clip_vision.json"
    cfg.write_text(json.dumps({**TINY_CLIP_VISION, "model_type": "clip_vision_model"}))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(cfg))
    clip_vision.load_sd(dict(random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0)))

    ib = node.InstantBoothLoader.execute(instantbooth_file="ib.safetensors")[0]
    _check_managed(mm, ib, ib.model.adapters)
    _check_managed(mm, ib, ib.model.concept_encoder)
    patched, positive, _ = node.InstantBoothApply.execute(
        model=model, clip=clip, clip_vision=clip_vision, instantbooth=ib, text="a photo of sks person", beta=0.3, alpha=0.4,
        start_at=0.0, end_at=1.0, apply_to="both", reference=torch.rand(1, 64, 64, 3))
    assert _loaded(mm, ib)  # the heads ran on ComfyUI's device
    assert any(m is ib for m in patched.model_patches_models())  # so every sampler loads the adapters with the UNet
    _check_evicted(mm, ib)
    latent = torch.zeros(1, 4, 8, 8)
    with torch.inference_mode():
        comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 1, 5.0, "euler", "normal", positive, positive,
                            latent, disable_pbar=True, seed=0)
    assert _loaded(mm, ib) and _loaded(mm, patched)
    _check_evicted(mm, ib)
    _check_caches(node)


def test_portraitbooth_stea_is_loaded_and_evicted(mm, ckpt):
    from facebooth.devmodels.portraitbooth_models import random_postfuse
    from facebooth.nodes import portraitbooth as node
    from facebooth.pipelines.face.types import Face, FaceSet

    _, clip, _ = ckpt
    stea = node._wrap(random_postfuse(feature_dim=512, seed=3, source="arcface", layers=("embedding",)), "random")
    _check_managed(mm, stea.patcher, stea.model)
    face = Face(image_index=0, box=(0.0, 0.0, 64.0, 64.0), score=1.0, landmarks=torch.zeros(5, 2), mask=torch.ones(64, 64),
                embedding=torch.nn.functional.normalize(torch.randn(512), dim=0))
    faces = FaceSet(images=torch.rand(1, 64, 64, 3), faces=[face], missing=[])
    node.PortraitBoothConditioning.execute(stea, clip, faces, "a photo of a man", "man")
    assert _loaded(mm, stea.patcher)
    _check_evicted(mm, stea.patcher)
    _check_caches(node)


def test_value_path_patch_drops_its_cast_copies_when_moved_off_a_device():
    """ComfyUI calls ``patch.to(offload_device)`` on every patch of a MODEL it unloads; the V-path patch then keeps
    its CPU contexts only (it is shared, not copied, between MODEL clones)."""
    from facebooth.pipelines.personamagic.vpath import ValuePathPatch

    key = torch.randn(77, 8)
    value = key.clone()
    value[5] += 1
    patch = ValuePathPatch([(key, value)])
    assert patch.match(key.clone().double()) is not None  # a float64 copy is cast and cached for the match
    assert ("cpu", torch.float64) in patch.groups[0]._cast
    assert patch.to(torch.float16) is patch and ("cpu", torch.float64) in patch.groups[0]._cast  # dtype moves keep it
    assert patch.to(torch.device("meta")) is patch and patch.groups[0]._cast == {}
    assert patch.match(key.clone()) is not None  # still works: recast on use
