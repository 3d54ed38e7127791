"""The controls every apply node shares (weight, start_at/end_at, attn_mask), in ComfyUI imported in-process on the
random SD1.5 checkpoint (skipped without COMFYUI_DIR).

References are ComfyUI's own: its sampler with plain-prompt runs (a masked step is, per latent pixel, the identity
run inside the mask and the plain run outside), its ConditioningSetTimestepRange / ConditioningCombine nodes for the
start/end split, and CLIP Text Encode of the plain prompt for weight 0.
"""
from __future__ import annotations

import pytest
import torch

from helpers import comfy_inprocess

pytestmark = pytest.mark.slow  # loads the random SD1.5 checkpoint and samples with it


@pytest.fixture(scope="module")
def ckpt(comfy):
    return comfy_inprocess.load_checkpoint()


def _encode(clip, text: str) -> list:
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _sample(model, positive, negative, steps: int = 1) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=0)


def _keys(conditioning) -> list[tuple]:
    return [(d.get("start_percent", 0.0), d.get("end_percent", 1.0), "mask" in d) for _, d in conditioning]


# ------------------------------------------------------------------------------------------ the shared schedule


def test_schedule_equals_comfyui_timestep_range_and_mask_conditioning(ckpt):
    from facebooth.nodes.controls import schedule

    import nodes as comfy_nodes  # ComfyUI's built-in nodes: the reference

    model, clip, _ = ckpt
    identity, plain, negative = _encode(clip, "a photo of a cat"), _encode(clip, "a dog on grass"), _encode(clip, "")
    assert schedule(identity, plain) is identity  # defaults: unchanged
    assert schedule(identity, plain, 0.4, 0.4) is plain  # empty window: the plain prompt throughout

    ours = schedule(identity, plain, 0.5, 1.0)
    assert _keys(ours) == [(0.0, 0.5, False), (0.5, 1.0, False)]
    rng = comfy_nodes.ConditioningSetTimestepRange()
    ref = comfy_nodes.ConditioningCombine().combine(rng.set_range(plain, 0.0, 0.5)[0], rng.set_range(identity, 0.5, 1.0)[0])[0]
    torch.testing.assert_close(_sample(model, ours, negative, steps=2), _sample(model, ref, negative, steps=2), rtol=0, atol=0)
    assert not torch.equal(_sample(model, ours, negative, steps=2), _sample(model, identity, negative, steps=2))

    # mask: one Euler step is a per-pixel blend, so the left half is the identity run and the right half the plain run
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    masked = schedule(identity, plain, 0.0, 1.0, mask)
    assert _keys(masked) == [(0.0, 1.0, True), (0.0, 1.0, True)]
    out = _sample(model, masked, negative)
    with_id, without = _sample(model, identity, negative), _sample(model, plain, negative)
    torch.testing.assert_close(out[..., :4], with_id[..., :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., 4:], without[..., 4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="before start_at"):
        schedule(identity, plain, 0.6, 0.2)


# ------------------------------------------------------------------------------------------ each apply node


def _check_node_schedule(conditioning, identity, plain, mask):
    """start 0.2, end 0.7, mask: plain before, identity (masked) + plain (1 - mask) inside, plain after."""
    assert _keys(conditioning) == [(0.0, 0.2, False), (0.2, 0.7, True), (0.2, 0.7, True), (0.7, 1.0, False)]
    (c0, _), (c1, d1), (c2, d2), (c3, _) = conditioning
    for c in (c0, c2, c3):
        torch.testing.assert_close(c, plain)
    torch.testing.assert_close(c1, identity)
    torch.testing.assert_close(d1["mask"], mask[None])
    torch.testing.assert_close(d2["mask"], 1 - mask[None])


def test_face2diffusion_encode_controls(ckpt, tmp_path, monkeypatch):
    import folder_paths
    from facebooth.devmodels.face2diffusion_models import write_random_pair
    from facebooth.nodes import face2diffusion as f2d_node
    from facebooth.pipelines.face2diffusion import F2DMappingConfig, MSIDConfig

    _, clip, _ = ckpt
    write_random_pair(tmp_path, seed=0, msid_config=MSIDConfig(embed_dim=64, depth=2, num_heads=2, feature_blocks=(0, 1)),
                      mapping_config=F2DMappingConfig(id_dim=128, hidden_dim=64, out_dim=768))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facebooth/face2diffusion", ([str(tmp_path)], {".pt"}))
    f2d = f2d_node.F2DLoader.execute(msid_file="msid.pt", mapping_file="mapping.pt", device="auto")[0]
    crops = torch.rand(1, 112, 112, 3, generator=torch.Generator().manual_seed(1))
    text = "a photo of f l smiling"

    def run(**kw):
        return f2d_node.F2DEncode.execute(clip=clip, f2d=f2d, text=text, placeholder="f", face_crops=crops, **kw)[0]

    full = run(strength=1.0)
    plain = _encode(clip, text)
    assert len(full) == 1 and not torch.allclose(full[0][0], plain[0][0])
    torch.testing.assert_close(run(strength=0.0)[0][0], plain[0][0], rtol=0, atol=1e-6)  # weight 0 == plain
    mask = torch.rand(16, 16)
    _check_node_schedule(run(strength=1.0, start_at=0.2, end_at=0.7, attn_mask=mask), full[0][0], plain[0][0], mask)


def test_portraitbooth_conditioning_controls(ckpt):
    from facebooth.devmodels.portraitbooth_models import random_postfuse
    from facebooth.nodes import portraitbooth as pb_node
    from facebooth.pipelines.face.types import Face, FaceSet

    _, clip, _ = ckpt
    stea = pb_node._wrap(random_postfuse(feature_dim=512, seed=3, source="arcface", layers=("embedding",)), "random")
    emb = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(2)), dim=0)
    face = Face(image_index=0, box=(0.0, 0.0, 64.0, 64.0), score=1.0, landmarks=torch.zeros(5, 2), mask=torch.ones(64, 64),
                embedding=emb)
    faces = FaceSet(images=torch.rand(1, 64, 64, 3), faces=[face], missing=[])
    text = "a photo of a man in a garden"

    def run(**kw):
        return pb_node.PortraitBoothConditioning.execute(stea, clip, faces, text, "man", **kw)[0]

    full = run()
    plain = _encode(clip, text)
    assert len(full) == 1 and not torch.allclose(full[0][0], plain[0][0])
    torch.testing.assert_close(run(strength=0.0)[0][0], plain[0][0], rtol=0, atol=1e-6)  # weight 0 == plain
    half = run(strength=0.5)[0][0]
    torch.testing.assert_close(half, (full[0][0] + plain[0][0]) / 2, rtol=1e-5, atol=1e-5)  # a blend of the two
    mask = torch.rand(16, 16)
    _check_node_schedule(run(start_at=0.2, end_at=0.7, attn_mask=mask), full[0][0], plain[0][0], mask)


def test_personamagic_apply_controls(ckpt):
    from facebooth.nodes import personamagic as pm_node
    from facebooth.pipelines.personamagic.files import PersonaMagicFile
    from facebooth.pipelines.personamagic.mapper import MapperConfig, PersonaMagicMapper
    from facebooth.pipelines.personamagic.stages import PRESETS

    model, clip, _ = ckpt
    word = comfy_inprocess.tiny_sd().text_encoder().get_input_embeddings().weight[1710].detach().float().clone()  # "face"
    torch.manual_seed(5)
    mapper = PersonaMagicMapper(MapperConfig(image_dim=24), word)
    with torch.no_grad():
        mapper.image_output_layer[0].weight.mul_(20)
    pm = PersonaMagicFile(mapper=mapper.eval().requires_grad_(False), plan=PRESETS["official"], family="sd1",
                          image_embed=torch.randn(24))

    def run(**kw):
        return pm_node.PersonaMagicApply.execute(model=model, clip=clip, personamagic=pm, prompt="a photo of <persona> smiling",
                                                 trigger_word="<persona>", bins=4, v_path=True, **kw)

    full_model, full = run()
    plain = _encode(clip, "a photo of face smiling")[0][0]
    zero_model, zero = run(strength=0.0)  # weight 0 == plain: the supercategory prompt, the MODEL unpatched
    assert zero_model is model and len(zero) == 1
    torch.testing.assert_close(zero[0][0], plain, rtol=1e-4, atol=1e-4)
    _, half = run(strength=0.5)  # Conditioning Average of every entry with the plain prompt
    assert _keys(half) == _keys(full)
    for (h, _), (f, _) in zip(half, full):
        torch.testing.assert_close(h, (f + zero[0][0]) / 2, rtol=1e-5, atol=1e-5)

    mask = torch.rand(16, 16)
    _, ranged = run(start_at=0.25, end_at=0.75, attn_mask=mask)
    inside = [(c, d) for c, d in ranged if "mask" in d and torch.equal(d["mask"], mask[None])]
    complement = [(c, d) for c, d in ranged if "mask" in d and torch.equal(d["mask"], 1 - mask[None])]
    outside = [(c, d) for c, d in ranged if "mask" not in d]
    assert inside and len(complement) == 1 and len(outside) == 2
    assert all(0.25 <= d["start_percent"] < d["end_percent"] <= 0.75 for _, d in inside)
    assert sorted((d["start_percent"], d["end_percent"]) for _, d in outside) == [(0.0, 0.25), (0.75, 1.0)]
    for c, _ in complement + outside:
        torch.testing.assert_close(c, zero[0][0])
    # the identity entries inside the window are the full run's entries, clipped to it
    clipped = [(f, max(d["start_percent"], 0.25), min(d["end_percent"], 0.75)) for f, d in full
               if min(d["end_percent"], 0.75) > max(d["start_percent"], 0.25)]
    assert [(d["start_percent"], d["end_percent"]) for _, d in inside] == [(s, e) for _, s, e in clipped]
    for (c, _), (f, _, _) in zip(inside, clipped):
        assert torch.equal(c, f)
    assert full_model is not model
