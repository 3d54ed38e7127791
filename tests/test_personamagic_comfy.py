"""PersonaMagic in ComfyUI (imported in-process, random SD1.5 checkpoint; skipped without COMFYUI_DIR).

What the UNet is actually fed is captured with an attn2 patch appended after ours, while ComfyUI's own sampler
runs. References are independent of our text path: ComfyUI's CLIP with the mapper's tokens as tensor tokens
(K), transformers' CLIPTextModel on the same weights with the bypass put in by hand before its final
LayerNorm (V), and the diffusers UNet with the same weights for the K/V routing.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from facebooth.pipelines.personamagic.apply import DEFAULT_BINS
from facebooth.pipelines.personamagic.attention import AttentionProbe, KVCond
from facebooth.pipelines.personamagic.files import PersonaMagicFile
from facebooth.pipelines.personamagic.mapper import MapperConfig, PersonaMagicMapper
from facebooth.pipelines.personamagic.stages import PRESETS, bin_for_timestep, dynamic_bins

from helpers import comfy_inprocess


pytestmark = pytest.mark.slow  # loads the random SD1.5 checkpoint and samples with it

PROMPT = "a photo of <persona> smiling"
FACE_ID = 1710  # "face</w>" in the CLIP BPE vocabulary
X_ID = 343  # "x</w>": stands in for each of the four placeholder tokens in ComfyUI's tokenization
IMAGE_DIM = 24  # the tiny CLIP vision projection width used here


@pytest.fixture(scope="module")
def comfy(comfy):  # the conftest's in-process ComfyUI, with what these tests use
    import comfy.clip_vision
    import comfy.sample
    import comfy.samplers

    from facebooth.nodes import personamagic as node
    from facebooth.nodes import personamagic_comfy as glue

    model, clip, vae = comfy_inprocess.load_checkpoint()
    return SimpleNamespace(model=model, clip=clip, vae=vae, sample=comfy.sample, samplers=comfy.samplers,
                           clip_vision=comfy.clip_vision, node=node, glue=glue)


@pytest.fixture(scope="module")
def hf_text():
    return comfy_inprocess.tiny_sd().text_encoder().float().eval()


@pytest.fixture(scope="module")
def pm(comfy, hf_text) -> PersonaMagicFile:
    word = hf_text.get_input_embeddings().weight[FACE_ID].detach().float().clone()
    torch.manual_seed(5)
    mapper = PersonaMagicMapper(MapperConfig(image_dim=IMAGE_DIM), word)
    with torch.no_grad():
        for name, p in mapper.named_parameters():  # randomise the LayerNorms too
            if ".1." in name or ".4." in name:
                p.add_(0.1 * torch.randn_like(p))
        mapper.image_output_layer[0].weight.mul_(20)  # a bypass large enough to change V visibly
    img = torch.randn(IMAGE_DIM)
    return PersonaMagicFile(mapper=mapper.eval().requires_grad_(False), plan=PRESETS["official"], family="sd1", image_embed=img)


def _apply(comfy, pm, **kw):
    args = dict(model=comfy.model, clip=comfy.clip, personamagic=pm, prompt=PROMPT, trigger_word="<persona>",
                bins=DEFAULT_BINS, v_path=True)
    args.update(kw)
    return comfy.node.PersonaMagicApply.execute(**args)


# ---------------------------------------------------------------------------------------------- references
def comfy_key(comfy, base: torch.Tensor) -> torch.Tensor:
    """ComfyUI's CLIP on 'a photo of x x x x smiling' with the four x replaced by tensor tokens."""
    tokens = comfy.clip.tokenize("a photo of x x x x smiling")
    chunk = list(tokens["l"][0])
    where = [i for i, tok in enumerate(chunk) if tok[0] == X_ID]
    assert len(where) == 4
    for j, i in enumerate(where):
        chunk[i] = (base[j].float(), *chunk[i][1:])
    tokens = dict(tokens)
    tokens["l"] = [chunk]
    with torch.inference_mode():
        return comfy.clip.encode_from_tokens(tokens).float().clone()


def comfy_plain(comfy, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return comfy.clip.encode_from_tokens(comfy.clip.tokenize(text)).float().clone()


@pytest.fixture(scope="module")
def hf_ext(hf_text):
    """The transformers text model with four spare vocabulary rows for the placeholder tokens."""
    import copy

    model = copy.deepcopy(hf_text)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 4, mean_resizing=False)
    return SimpleNamespace(model=model, vocab=vocab)


def hf_value(comfy, hf_ext, base: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
    """transformers: slots as extra vocabulary rows, pre-final-LN hidden state, bypass by hand, final LN."""
    ids = torch.tensor([[int(t[0]) for t in comfy.clip.tokenize("a photo of x x x x smiling")["l"][0]]])
    where = (ids[0] == X_ID).nonzero().flatten().tolist()
    model = hf_ext.model
    with torch.no_grad():
        model.get_input_embeddings().weight[hf_ext.vocab:] = base.float()
        for j, i in enumerate(where):
            ids[0, i] = hf_ext.vocab + j
        pre = model(ids, output_hidden_states=True).hidden_states[-1].clone()
        for j, i in enumerate(where):
            h = pre[0, i]
            pre[0, i] = (bypass[j] + h) / (bypass[j] + h).norm() * h.norm()
        final_ln = model.text_model.final_layer_norm if hasattr(model, "text_model") else model.final_layer_norm
        return final_ln(pre)


# ---------------------------------------------------------------------------------------------- capture
class Capture:
    """An attn2 patch that records, once per UNet call, what the first cross-attention gets."""

    def __init__(self, first_block):
        self.first_block = first_block
        self.calls = []

    def __call__(self, n, context, value, extra_options):
        if extra_options.get("block") == self.first_block and extra_options.get("block_index", 0) == 0:
            self.calls.append(SimpleNamespace(
                sigma=float(extra_options["sigmas"].flatten()[0]), chunks=list(extra_options["cond_or_uncond"]),
                context=context.detach().float().clone(), value=value.detach().float().clone()))
        return n, context, value


def _sample_with_capture(comfy, model, positive, negative, steps=12, sampler="euler", scheduler="normal", sigmas=None):
    cap = Capture(comfy.glue.transformer_blocks(model.model.diffusion_model)[0])
    m = model.clone()
    m.set_model_attn2_patch(cap)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        if sigmas is None:
            out = comfy.sample.sample(m, noise, steps, 5.0, sampler, scheduler, positive, negative, latent, disable_pbar=True, seed=0)
        else:
            out = comfy.sample.sample_custom(m, noise, 5.0, comfy.samplers.sampler_object(sampler), sigmas, positive,
                                             negative, latent, disable_pbar=True, seed=0)
    return cap.calls, out


def _timestep(comfy, sigma: float) -> int:
    ms = comfy.model.get_model_object("model_sampling")
    return int(ms.timestep(torch.tensor([sigma]))[0])


def _positive_rows(call):
    per = call.context.shape[0] // len(call.chunks)
    pos = [i * per + r for i, c in enumerate(call.chunks) if c == 0 for r in range(per)]
    neg = [i * per + r for i, c in enumerate(call.chunks) if c == 1 for r in range(per)]
    return pos, neg


# ---------------------------------------------------------------------------------------------- tests
def test_fed_conditioning_is_the_mapper_at_every_visited_timestep(comfy, hf_ext, pm):
    model, positive = _apply(comfy, pm)[:2]
    assert len(positive) == 1 + DEFAULT_BINS + 1
    negative = comfy_plain(comfy, "blurry, low quality")
    negative = [[negative, {}]]
    calls, _ = _sample_with_capture(comfy, model, positive, negative, steps=14)
    assert len(calls) >= 14
    bins = dynamic_bins(pm.plan, DEFAULT_BINS)
    stages_seen = set()
    supercat = comfy_plain(comfy, "a photo of face smiling")[0]
    worst_quant = 0.0
    refs = {}
    for call in calls:
        t = _timestep(comfy, call.sigma)
        stage = pm.plan.stage_of(t)
        stages_seen.add(stage)
        pos, neg = _positive_rows(call)
        assert pos and neg
        for r in neg:  # the negative prompt is never touched
            assert torch.equal(call.value[r], call.context[r])
        if stage == 1:
            expected_k, expected_v = supercat, supercat
        else:
            rep = bin_for_timestep(t, bins).rep if stage == 2 else pm.plan.t_low
            with torch.no_grad():
                out = pm.mapper(torch.tensor([rep]), pm.image_embed)
            if rep not in refs:
                refs[rep] = (comfy_key(comfy, out.base[0])[0], hf_value(comfy, hf_ext, out.base[0], out.bypass[0])[0])
            expected_k, expected_v = refs[rep]
            if stage == 2:  # quantisation: the rep's tokens against the continuous mapper at the visited t
                with torch.no_grad():
                    exact = pm.mapper(torch.tensor([t]), pm.image_embed).base
                worst_quant = max(worst_quant, float((out.base - exact).norm() / exact.norm()))
                assert abs(t - rep) <= 2
        for r in pos:
            torch.testing.assert_close(call.context[r], expected_k, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(call.value[r], expected_v, atol=2e-4, rtol=1e-4)
            if stage == 1:
                assert torch.equal(call.value[r], call.context[r])
            else:
                assert (call.value[r] - call.context[r]).abs().max() > 1e-2  # the V path is on
    assert stages_seen == {1, 2, 3}
    assert worst_quant < 0.08, worst_quant  # documented: ≤ ~5 % (4-timestep bins), see apply.py


def test_exact_mode_follows_the_sampler_sigmas(comfy, pm):
    ms = comfy.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 9).float()
    model, positive = _apply(comfy, pm, sigmas=sigmas)[:2]
    visited = comfy.glue.visited_timesteps(comfy.model, sigmas)
    dynamic = [t for t in visited if 400 <= t <= 800]
    assert len(positive) == 1 + len(dynamic) + 1 and dynamic
    calls, _ = _sample_with_capture(comfy, model, positive, [[comfy_plain(comfy, "")[:, :77], {}]], sigmas=sigmas)
    checked = 0
    for call in calls:
        t = _timestep(comfy, call.sigma)
        if pm.plan.stage_of(t) != 2:
            continue
        with torch.no_grad():
            out = pm.mapper(torch.tensor([t]), pm.image_embed)  # the continuous mapper at exactly this step
        pos, _ = _positive_rows(call)
        for r in pos:
            torch.testing.assert_close(call.context[r], comfy_key(comfy, out.base[0])[0], atol=2e-4, rtol=1e-4)
            checked += 1
    assert checked == len(dynamic)


def test_long_negative_prompt_does_not_fool_the_v_path(comfy, pm):
    """A >77-token negative makes ComfyUI repeat the positive to 154 tokens when batching."""
    model, positive = _apply(comfy, pm, bins=8)[:2]
    long_neg = comfy_plain(comfy, ", ".join(["blurry low quality jpeg artifacts"] * 20))
    assert long_neg.shape[1] == 154
    calls, _ = _sample_with_capture(comfy, model, positive, [[long_neg, {}]], steps=8)
    dynamic_calls = 0
    for call in calls:
        assert call.context.shape[1] == 154
        pos, neg = _positive_rows(call)
        for r in neg:
            assert torch.equal(call.value[r], call.context[r])
        t = _timestep(comfy, call.sigma)
        if pm.plan.stage_of(t) == 1:
            continue
        dynamic_calls += 1
        for r in pos:
            first, second = call.value[r, :77], call.value[r, 77:]
            assert torch.equal(first, second)  # the repeated copy gets the same V
            assert torch.equal(call.context[r, :77], call.context[r, 77:])
            assert (first - call.context[r, :77]).abs().max() > 1e-2
    assert dynamic_calls > 0


def test_earlier_patches_and_replace_style_packs_keep_working(comfy, pm):
    """An attn2 patch already on the MODEL still runs before ours (its change to other rows survives), and an
    attn2_replace pack (IPAdapter-style: it gets the projected k and v) sees our V: v = to_v(V-path value)."""
    seen = {"n": 0}

    def other_pack(n, context, value, extra_options):
        seen["n"] += 1
        value = value.clone()
        value[:, 0] = value[:, 0] * 1.5  # changes the BOS row, which PersonaMagic leaves alone
        return n, context, value

    first = comfy.glue.transformer_blocks(comfy.model.model.diffusion_model)[0]
    attn2 = comfy.model.model.diffusion_model.input_blocks[first[1]][1].transformer_blocks[0].attn2
    replaced = []

    def replace_pack(q, k, v, extra_options):
        replaced.append((k.detach().float().clone(), v.detach().float().clone()))
        h = extra_options["n_heads"]
        def split(x):
            return x.view(x.shape[0], -1, h, x.shape[-1] // h).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[-1])

    base = comfy.model.clone()
    base.set_model_attn2_patch(other_pack)
    base.set_model_attn2_replace(replace_pack, first[0], first[1])
    model, positive = _apply(comfy, pm, model=base, bins=4)[:2]
    patches = model.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert patches[0] is other_pack and len(patches) == 2
    assert "patches" not in comfy.model.model_options["transformer_options"]  # the input MODEL is untouched
    calls, _ = _sample_with_capture(comfy, model, positive, [[comfy_plain(comfy, "blurry"), {}]], steps=4)
    assert seen["n"] > 0 and len(replaced) == len(calls)
    with torch.no_grad():
        w_k, w_v = attn2.to_k.weight.float(), attn2.to_v.weight.float()
    for call, (k, v) in zip(calls, replaced):
        torch.testing.assert_close(k, call.context @ w_k.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, call.value @ w_v.T, atol=1e-4, rtol=1e-4)
        pos, _ = _positive_rows(call)
        for r in pos:
            torch.testing.assert_close(call.value[r, 0], call.context[r, 0] * 1.5)  # the earlier patch's change kept
            if pm.plan.stage_of(_timestep(comfy, call.sigma)) != 1:
                assert (call.value[r, 4:8] - call.context[r, 4:8]).abs().max() > 1e-2  # and ours


def test_k_and_v_reach_to_k_and_to_v_as_in_diffusers(comfy, pm):
    """The patched ComfyUI UNet on (K context, V by the patch) equals the diffusers UNet with the same weights
    whose cross-attention takes K from K and V from V; and differs from the unpatched model."""
    from facebooth.pipelines.personamagic.attention import KVAttnProcessor, KVState

    model, positive = _apply(comfy, pm, bins=4)[:2]
    entry = positive[2]  # a dynamic bin
    key = entry[0]
    patch = model.model_options["transformer_options"]["patches"]["attn2_patch"][-1]
    found = patch.match(key[0])
    assert found is not None
    value = key[0].clone()
    value[found[0]] = found[1]
    ms = comfy.model.get_model_object("model_sampling")
    t = 600
    sigma = ms.sigma(torch.tensor([float(t)]))
    g = torch.Generator().manual_seed(0)
    x_ddpm = torch.randn(1, 4, 8, 8, generator=g)
    x = x_ddpm * (1 + sigma**2).sqrt()

    def comfy_eps(m):
        opts = dict(m.model_options["transformer_options"])
        opts.update(cond_or_uncond=[0], sigmas=sigma)
        with torch.inference_mode():
            x0 = m.model.apply_model(x, sigma, c_crossattn=key, transformer_options=opts).float()
        return (x - x0) / sigma

    unet = comfy_inprocess.tiny_sd().unet().float().eval()
    state = KVState()
    unet.set_attn_processor(KVAttnProcessor(state))
    state.value = value[None]
    with torch.no_grad():
        ref = unet(x_ddpm, torch.tensor([t]), encoder_hidden_states=key).sample
        state.value = None
        ref_plain = unet(x_ddpm, torch.tensor([t]), encoder_hidden_states=key).sample
    torch.testing.assert_close(comfy_eps(model), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(comfy_eps(comfy.model), ref_plain, atol=2e-3, rtol=2e-3)
    assert (ref - ref_plain).abs().max() > 1e-3


def test_training_backend_routes_kv_probes_and_decodes_like_diffusers(comfy, pm):
    from facebooth.pipelines.personamagic.backends import DiffusersKVBackend
    from facebooth.pipelines.text_encoder import CLIPTextEncoder, PromptTokenizer

    with torch.inference_mode():
        backend = comfy.glue.ComfyPersonaMagicBackend(comfy.model, comfy.clip, comfy.vae)
    tiny = comfy_inprocess.tiny_sd()
    hf = tiny.text_encoder()
    enc = CLIPTextEncoder.from_state_dict(hf.state_dict(), hidden_act="quick_gelu", num_heads=12)
    ref = DiffusersKVBackend(tiny.unet(), tiny.vae(), enc, PromptTokenizer.from_hf(tiny.clip_tokenizer()), tiny.scheduler("ddim"))
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([450, 700])
    key = torch.randn(2, 77, 768, generator=g) * 0.5
    value = key.clone()
    value[:, 5:9] += torch.randn(2, 4, 768, generator=g)
    key.requires_grad_(True)
    value.requires_grad_(True)
    probe_a, probe_b = AttentionProbe(torch.arange(5, 9)), AttentionProbe(torch.arange(5, 9))
    with torch.inference_mode(False):
        ours = backend.predict(noisy, t, KVCond(key, value, probe_a))
        ours.square().mean().backward()
        theirs = ref.predict(noisy, t, KVCond(key.detach(), value.detach(), probe_b))
        plain = backend.predict(noisy, t, key.detach())
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=2e-3, rtol=2e-3)
    assert (ours.detach() - plain).abs().max() > 1e-3
    assert value.grad is not None and value.grad[:, 5:9].abs().sum() > 0 and key.grad.abs().sum() > 0
    assert sorted(probe_a.maps) == sorted(probe_b.maps)
    for n in probe_a.maps:
        torch.testing.assert_close(probe_a.maps[n] / probe_a.counts[n], probe_b.maps[n] / probe_b.counts[n], atol=1e-3, rtol=1e-3)
    lat = (torch.randn(1, 4, 8, 8, generator=g) * 0.5).requires_grad_(True)
    with torch.inference_mode(False):
        img = backend.decode_differentiable(lat)
        img.mean().backward()
        ref_img = ref.decode_differentiable(lat.detach())
    assert img.shape == (1, 3, 64, 64) and lat.grad.abs().sum() > 0
    torch.testing.assert_close(img.detach(), ref_img.detach(), atol=2e-3, rtol=2e-3)


def test_apply_input_errors_and_the_load_node(comfy, pm, tmp_path):
    import folder_paths

    from facebooth.pipelines.personamagic.files import save_personamagic

    with pytest.raises(ValueError, match="both 'image' and 'clip_vision'"):
        _apply(comfy, pm, image=torch.rand(1, 64, 64, 3))
    no_embed = PersonaMagicFile(mapper=pm.mapper, plan=pm.plan, family="sd1", image_embed=None)
    with pytest.raises(ValueError, match="needs a CLIP image embedding"):
        _apply(comfy, no_embed)
    with pytest.raises(ValueError, match="trigger word"):
        _apply(comfy, pm, prompt="a photo of a man")
    model, cond = _apply(comfy, pm, v_path=False, bins=2)[:2]
    assert model is comfy.model and len(cond) == 4
    starts = [c[1]["start_percent"] for c in cond]
    ends = [c[1]["end_percent"] for c in cond]
    assert starts[0] == 0.0 and ends[-1] == 1.0 and all(e == s for e, s in zip(ends, starts[1:]))

    save_personamagic(tmp_path / "someone.safetensors", pm.mapper, pm.plan, "sd1", pm.image_embed)
    folder_paths.folder_names_and_paths["facebooth/personamagic"] = ([str(tmp_path)], {".safetensors"})
    loaded = comfy.node.PersonaMagicLoad.execute(file="someone.safetensors")[0]
    assert loaded.plan == pm.plan
    a = _apply(comfy, pm, bins=3)[1]
    b = _apply(comfy, loaded, bins=3)[1]
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and x[1] == y[1]
