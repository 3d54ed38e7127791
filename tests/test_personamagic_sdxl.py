"""PersonaMagic on SDXL, with ComfyUI imported in-process and the random SDXL-family test checkpoint.

What the UNet is fed while ComfyUI's own sampler runs is captured (an attn2 patch after ours for K and V, a UNet
function wrapper for ``y``). References are independent of our text path: ComfyUI's SDXL CLIP with the mapper's
tokens as tensor tokens in both towers (K context and pooled output), the bypass put on those penultimate rows by
hand, per encoder (V), and ComfyUI's ``SDXL.encode_adm`` (y). Skipped without COMFYUI_DIR.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from facebooth.pipelines.personamagic.files import PersonaMagicFile, load_personamagic, save_personamagic
from facebooth.pipelines.personamagic.mapper import MapperConfig, PersonaMagicMapper
from facebooth.pipelines.personamagic.stages import PRESETS

from helpers import comfy_inprocess
from test_personamagic_comfy import Capture as AttnCapture  # the attn2 patch that records K and V


pytestmark = pytest.mark.slow  # the ~1.8 GB SDXL-family checkpoint; CLIP-G runs cost seconds on CPU

PROMPT = "a photo of <persona> smiling"
FACE_ID = 1710  # "face</w>" (CLIP-L and CLIP-G share the BPE vocabulary)
X_ID = 343  # "x</w>": stands in for each of the four placeholder tokens in ComfyUI's tokenization
IMAGE_DIM = 24
DIMS = (768, 1280)


@pytest.fixture(scope="module")
def comfy(comfy):  # the conftest's in-process ComfyUI, with what these tests use
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from facebooth.devmodels.sdxl_checkpoint import checkpoint_name, write_random_sdxl_checkpoint
    from facebooth.nodes import personamagic as node
    from facebooth.nodes import personamagic_comfy as glue

    path = write_random_sdxl_checkpoint(comfy_inprocess.tiny_sd().cache_dir() / "checkpoints" / checkpoint_name())
    with torch.inference_mode():  # as CheckpointLoaderSimple runs; fp32 text encoders for exact comparisons
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), te_model_options={"dtype": torch.float32})[:3]
    yield SimpleNamespace(model=model, clip=clip, vae=vae, sample=comfy.sample, samplers=comfy.samplers, node=node, glue=glue)
    del model, clip, vae


def _table(comfy, key: str) -> torch.Tensor:
    return getattr(comfy.clip.cond_stage_model, key).transformer.get_input_embeddings().weight.detach().float()


@pytest.fixture(scope="module")
def pm(comfy) -> PersonaMagicFile:
    word = torch.cat([_table(comfy, "clip_l")[FACE_ID], _table(comfy, "clip_g")[FACE_ID]]).clone()
    torch.manual_seed(5)
    mapper = PersonaMagicMapper(MapperConfig(word_dim=sum(DIMS), word_dims=DIMS, image_dim=IMAGE_DIM), word)
    with torch.no_grad():
        for name, p in mapper.named_parameters():  # randomise the LayerNorms too
            if ".1." in name or ".4." in name:
                p.add_(0.1 * torch.randn_like(p))
        mapper.output_layer[0].weight.mul_(20)  # tokens far enough from "face" to change the pooled output
        mapper.image_output_layer[0].weight.mul_(20)  # a bypass large enough to change V visibly
    return PersonaMagicFile(mapper=mapper.eval().requires_grad_(False), plan=PRESETS["official"], family="sdxl",
                            image_embed=torch.randn(IMAGE_DIM))


# ---------------------------------------------------------------------------------------------- references
def comfy_key(comfy, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """ComfyUI's SDXL CLIP on 'a photo of x x x x smiling' with the x's replaced by tensor tokens in both towers:
    (77, 2048) context, (1280,) pooled output, placeholder positions."""
    tokens = dict(comfy.clip.tokenize("a photo of x x x x smiling"))
    where = []
    for short, part in (("l", base[:, : DIMS[0]]), ("g", base[:, DIMS[0]:])):
        chunk = list(tokens[short][0])
        where = [i for i, tok in enumerate(chunk) if tok[0] == X_ID]
        assert len(where) == 4
        for j, i in enumerate(where):
            chunk[i] = (part[j].float(), *chunk[i][1:])
        tokens[short] = [chunk]
    with torch.inference_mode():
        cond, pooled = comfy.clip.encode_from_tokens(tokens, return_pooled=True)
    return cond[0].float().clone(), pooled[0].float().clone(), where


def comfy_plain(comfy, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        cond, pooled = comfy.clip.encode_from_tokens(comfy.clip.tokenize(text), return_pooled=True)
    return cond.float().clone(), pooled.float().clone()


def value_by_hand(key: torch.Tensor, where: list[int], bypass: torch.Tensor) -> torch.Tensor:
    """PersonaMagic's V path on each encoder's own rows (SDXL's context has no final LayerNorm):
    h ← (b + h) / ‖b + h‖ · ‖h‖ at the placeholder rows, CLIP-L part and CLIP-G part separately."""
    value = key.clone()
    for j, i in enumerate(where):
        parts = []
        for h, b in zip(key[i].split(DIMS), bypass[j].split(DIMS)):
            parts.append((b + h) / (b + h).norm() * h.norm())
        value[i] = torch.cat(parts)
    return value


# ---------------------------------------------------------------------------------------------- capture
class Capture(AttnCapture):
    """Per UNet call: the first cross-attention's K context and V (the SD1 test's attn2 patch), and the UNet's y."""

    def __init__(self, first_block):
        super().__init__(first_block)
        self.ys = []

    def unet(self, apply_model, args):
        self.ys.append(args["c"]["y"].detach().float().clone())
        return apply_model(args["input"], args["timestep"], **args["c"])


def _sample(comfy, model, positive, negative, sigmas):
    cap = Capture(comfy.glue.transformer_blocks(model.model.diffusion_model)[0])
    m = model.clone()
    m.set_model_attn2_patch(cap)
    m.set_model_unet_function_wrapper(cap.unet)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        comfy.sample.sample_custom(m, noise, 5.0, comfy.samplers.sampler_object("euler"), sigmas, positive, negative,
                                   latent, disable_pbar=True, seed=0)
    assert len(cap.calls) == len(cap.ys)
    return cap


def _timestep(comfy, sigma: float) -> int:
    return int(comfy.model.get_model_object("model_sampling").timestep(torch.tensor([sigma]))[0])


# ---------------------------------------------------------------------------------------------- tests
def test_sampler_feeds_both_encoders_tokens_v_path_and_pooled_y_of_mapper_t_at_every_step(comfy, pm):
    ms = comfy.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 7).float()
    model, positive = comfy.node.PersonaMagicApply.execute(
        model=comfy.model, clip=comfy.clip, personamagic=pm, prompt=PROMPT, trigger_word="<persona>", bins=100,
        v_path=True, sigmas=sigmas)[:2]
    assert all(e[0].shape == (1, 77, 2048) and e[1]["pooled_output"].shape == (1, 1280) for e in positive)
    neg_cond, neg_pooled = comfy_plain(comfy, "blurry, low quality")
    cap = _sample(comfy, model, positive, [[neg_cond, {"pooled_output": neg_pooled}]], sigmas)
    supercat = comfy_plain(comfy, "a photo of face smiling")
    stages_seen = set()
    for call, y in zip(cap.calls, cap.ys):
        t = _timestep(comfy, call.sigma)
        stage = pm.plan.stage_of(t)
        stages_seen.add(stage)
        per = call.context.shape[0] // len(call.chunks)
        pos = [i * per + r for i, c in enumerate(call.chunks) if c == 0 for r in range(per)]
        neg = [i * per + r for i, c in enumerate(call.chunks) if c == 1 for r in range(per)]
        assert pos and neg
        for r in neg:  # the negative prompt is never touched
            assert torch.equal(call.value[r], call.context[r])
            torch.testing.assert_close(y[r, :1280], neg_pooled[0], atol=2e-4, rtol=1e-3)
        if stage == 1:
            key, pooled = supercat[0][0], supercat[1][0]
            value = key
        else:
            rep = t if stage == 2 else pm.plan.t_low  # sigmas connected: one entry per visited step, the exact t
            with torch.no_grad():
                out = pm.mapper(torch.tensor([rep]), pm.image_embed)
            key, pooled, where = comfy_key(comfy, out.base[0])
            value = value_by_hand(key, where, out.bypass[0])
        with torch.inference_mode():  # ComfyUI's own size/crop embedding for a 64 px latent, crop 0
            y_ref = comfy.model.model.encode_adm(pooled_output=pooled[None], width=64, height=64, device="cpu").float()
        for r in pos:
            torch.testing.assert_close(call.context[r], key, atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(call.value[r], value, atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(y[r], y_ref[0], atol=2e-4, rtol=1e-3)
            if stage == 1:
                assert torch.equal(call.value[r], call.context[r])
            else:
                assert (call.value[r] - call.context[r]).abs().max() > 1e-2  # the V path is on
                assert (y[r, :1280] - supercat[1][0]).abs().max() > 1e-3  # the pooled output follows the tokens
    assert stages_seen == {1, 2, 3}


def test_training_learns_both_encoders_parts_and_the_file_says_sdxl(comfy, tmp_path):
    from facebooth.pipelines.personamagic.train import PersonaMagicRun, PersonaMagicSettings

    with torch.inference_mode(False):
        backend = comfy.glue.ComfyPersonaMagicBackend(comfy.model, comfy.clip, comfy.vae)
        settings = PersonaMagicSettings(steps=2, batch_size=1, lr=1e-2, resolution=64, seed=3)
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        job = PersonaMagicRun(backend, None, torch.randn(1, IMAGE_DIM), settings, pixels=pixels)
        before = {k: v.clone() for k, v in job.mapper.state_dict().items()}
        assert job.mapper.config.word_dims == DIMS
        # the mapper starts at the "face" row of each encoder, each part at its own norm
        with torch.no_grad():
            base = job.mapper(torch.tensor([600]), torch.randn(1, IMAGE_DIM)).base[0]
        for part, key in zip(base.split(DIMS, dim=-1), ("clip_l", "clip_g")):
            torch.testing.assert_close(part.norm(dim=-1), _table(comfy, key)[FACE_ID].norm().expand(4), atol=1e-4, rtol=1e-4)
        result = job.run()
    assert len(result.history.loss_history) == 2 and all(torch.isfinite(torch.tensor(result.history.loss_history)))
    out_w = result.mapper.state_dict()["output_layer.0.weight"].view(4, 2048, -1)
    moved = (out_w - before["output_layer.0.weight"].view(4, 2048, -1)).abs()
    assert moved[:, :768].max() > 0 and moved[:, 768:].max() > 0  # both encoders' parts learned

    # the K prompt's pooled output reaches y, so CLIP-G's part also learns through it (and CLIP-L's does not)
    base = torch.randn(4, 2048, requires_grad=True)
    with torch.inference_mode(False), torch.enable_grad():
        ctx = job.engine.text.encode(["a photo of <fb_pm_0> <fb_pm_1> <fb_pm_2> <fb_pm_3>"], job.engine.placeholders, base)
        backend.sdxl_y(ctx.pooled, 64, 64).square().sum().backward()
    assert base.grad[:, 768:].abs().max() > 0 and base.grad[:, :768].abs().max() == 0

    path = save_personamagic(tmp_path / "x.safetensors", result.mapper, result.plan, backend.family, result.image_embed)
    loaded = load_personamagic(path)
    assert loaded.family == "sdxl" and loaded.metadata["base_family"] == "sdxl"
    assert loaded.mapper.config.word_dims == DIMS
    with torch.no_grad():
        t = torch.tensor([500])
        torch.testing.assert_close(loaded.mapper(t, loaded.image_embed).base, result.mapper(t, loaded.image_embed).base)


def test_a_mapper_on_the_wrong_family_is_refused_naming_both_and_what_to_do(comfy, pm):
    from facebooth.nodes.common import WrongFamilyError

    sd1_model, sd1_clip, _ = comfy_inprocess.load_checkpoint()
    with pytest.raises(WrongFamilyError, match=r"PersonaMagic mapper works with SDXL checkpoints only; this MODEL is SD1.x\. "
                                               r"It was trained on an SDXL checkpoint.*PersonaMagic Train"):
        comfy.node.PersonaMagicApply.execute(model=sd1_model, clip=sd1_clip, personamagic=pm, prompt=PROMPT,
                                             trigger_word="<persona>", bins=4, v_path=True)
    sd1_pm = PersonaMagicFile(mapper=PersonaMagicMapper(MapperConfig(image_dim=IMAGE_DIM), torch.randn(768)),
                              plan=pm.plan, family="sd1", image_embed=pm.image_embed)
    with pytest.raises(WrongFamilyError, match=r"works with SD1.x checkpoints only; this MODEL is SDXL\. "
                                               r"It was trained on an SD1.x checkpoint"):
        comfy.node.PersonaMagicApply.execute(model=comfy.model, clip=comfy.clip, personamagic=sd1_pm, prompt=PROMPT,
                                             trigger_word="<persona>", bins=4, v_path=True)
