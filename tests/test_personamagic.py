"""PersonaMagic pipeline: mapper (official layout), K/V contexts against transformers, stages and bins,
the V-path patch (batching, LCM repeats, long negatives), files, losses, the diffusers K/V processor and
training on tiny random models."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from facebooth.pipelines.personamagic.apply import build_schedule, quantization_error, value_patch_for
from facebooth.pipelines.personamagic.attention import AttentionProbe, KVAttnProcessor, KVState
from facebooth.pipelines.personamagic.contexts import (
    apply_bypass,
    encode_kv,
    expand_trigger,
    internal_placeholders,
    supercategory_prompt,
)
from facebooth.pipelines.personamagic.files import load_personamagic, save_personamagic
from facebooth.pipelines.personamagic.losses import (
    aligned_face_crops,
    identity_loss,
    masked_mse,
    prompt_token_mask,
    tandem_equilibrium_loss,
)
from facebooth.pipelines.personamagic.mapper import MapperConfig, PersonaMagicMapper, sinusoidal_time_code
from facebooth.pipelines.personamagic.stages import (
    PRESETS,
    StagePlan,
    attention_mask_iou,
    bins_for_visited,
    dynamic_bins,
    lambda_id,
    partition_by_iou,
    timestep_ranges_to_percents,
)
from facebooth.pipelines.personamagic.vpath import ValuePathPatch
from facebooth.pipelines.text_encoder import CLIPTextEncoder, PromptTokenizer, tokenize_with_slots
from facebooth.utils.files import UnsafeFileError
from test_text_encoder import hf_model, tiny_config, write_tiny_clip_tokenizer

OFFICIAL_KEYS = {
    "input_layer.weight": (200, 2048), "input_layer.bias": (200,),
    "timestep_proj.0.weight": (128, 200), "timestep_proj.0.bias": (128,),
    "timestep_proj.1.weight": (128,), "timestep_proj.1.bias": (128,),
    "timestep_proj.3.weight": (128, 128), "timestep_proj.3.bias": (128,),
    "timestep_proj.4.weight": (128,), "timestep_proj.4.bias": (128,),
    "image_proj.0.weight": (128, 640), "image_proj.0.bias": (128,),
    "image_proj.1.weight": (128,), "image_proj.1.bias": (128,),
    "image_proj.3.weight": (128, 128), "image_proj.3.bias": (128,),
    "image_proj.4.weight": (128,), "image_proj.4.bias": (128,),
    "image_output_layer.0.weight": (3072, 128), "image_output_layer.0.bias": (3072,),
    "output_layer.0.weight": (3072, 128), "output_layer.0.bias": (3072,),
}


def official_mapper(seed: int = 0, **kw) -> PersonaMagicMapper:
    torch.manual_seed(seed)
    word = torch.randn(kw.get("word_dim", 768)) * 0.015
    m = PersonaMagicMapper(MapperConfig(**kw), word)
    with torch.no_grad():  # LayerNorms start at 1/0: randomise them so they are really tested
        for name, p in m.named_parameters():
            if ".1." in name or ".4." in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------------------------- mapper
def test_mapper_state_dict_is_the_official_layout():
    m = official_mapper()
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == OFFICIAL_KEYS
    # 1,345,224 in reference/methods.md includes the unused 1024×1 encoder.w of a CPU run
    assert sum(v.numel() for v in sd.values()) == 1_345_224 - 1024


def test_time_code_is_diffusers_sinusoidal_embedding_cos_first():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 399, 400, 798, 999])
    ref = get_timestep_embedding(t, 2048, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(sinusoidal_time_code(t), ref, rtol=0, atol=1e-6)


def test_input_layer_starts_at_the_anchor_codes():
    m = official_mapper()
    anchors = torch.arange(400, 800, 2)
    assert torch.equal(m.config.anchors.long(), anchors)
    torch.testing.assert_close(m.input_layer.weight, sinusoidal_time_code(anchors))
    # its output is a bank of kernels: at an anchor timestep, that anchor's row scores highest
    with torch.no_grad():
        scores = F.linear(sinusoidal_time_code(torch.tensor([500])), m.input_layer.weight)
    assert int(scores.argmax()) == (500 - 400) // 2
    assert MapperConfig(num_anchors=10).anchors.tolist() == list(range(400, 800, 40))


def _reference_mapper(sd, word, t, img, c: MapperConfig):
    """The mapper's math written out with functional ops on the state dict."""
    def mlp(x, p):
        x = F.leaky_relu(F.layer_norm(F.linear(x, sd[p + ".0.weight"], sd[p + ".0.bias"]), (c.hidden_dim,),
                                      sd[p + ".1.weight"], sd[p + ".1.bias"]), 0.01)
        return F.leaky_relu(F.layer_norm(F.linear(x, sd[p + ".3.weight"], sd[p + ".3.bias"]), (c.hidden_dim,),
                                         sd[p + ".4.weight"], sd[p + ".4.bias"]), 0.01)

    half = c.time_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    code = torch.cat([args.cos(), args.sin()], -1)
    feat = mlp(F.linear(code, sd["input_layer.weight"], sd["input_layer.bias"]), "timestep_proj")
    base = F.linear(feat, sd["output_layer.0.weight"], sd["output_layer.0.bias"]).view(len(t), c.token_num, -1) + word
    base = base / base.norm(dim=-1, keepdim=True) * word.norm()
    bypass = F.linear(mlp(torch.cat([feat, img.expand(len(t), -1)], -1), "image_proj"),
                      sd["image_output_layer.0.weight"], sd["image_output_layer.0.bias"]).view(len(t), c.token_num, -1)
    return base, bypass


def test_mapper_forward_matches_the_written_out_math():
    m = official_mapper()
    t = torch.tensor([400, 555, 799])
    img = torch.randn(512)
    with torch.no_grad():
        out = m(t, img)
        base, bypass = _reference_mapper(m.state_dict(), m.word_embedding, t, img, m.config)
    torch.testing.assert_close(out.base, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.bypass, bypass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.base.norm(dim=-1), m.word_embedding.norm().expand(3, 4))  # the "face" norm
    keep = torch.tensor([1.0, 0.0, 1.0])
    dropped = m(t, img, bypass_keep=keep).bypass
    assert dropped[1].abs().sum() == 0 and torch.equal(dropped[0], out.bypass[0])
    with pytest.raises(ValueError, match="image embedding"):
        m(t)
    with pytest.raises(ValueError, match="CLIP vision model differs"):
        m(t, torch.randn(768))


# ---------------------------------------------------------------------------------------------- contexts
def test_trigger_word_handling():
    assert expand_trigger("a photo of <persona>, smiling", "<persona>", 2) == "a photo of <fb_pm_0> <fb_pm_1>, smiling"
    assert supercategory_prompt("a photo of sks man", "sks", "face") == "a photo of face man"
    assert expand_trigger("sksy sks", "sks", 1) == "sksy <fb_pm_0>"  # whole words only
    with pytest.raises(ValueError, match="does not contain the trigger"):
        expand_trigger("a photo of a man", "<persona>", 4)
    with pytest.raises(ValueError, match="one word"):
        expand_trigger("a photo", "two words", 4)


def test_kv_contexts_match_transformers():
    """K = transformers with the tokens in an extended vocabulary; V = transformers' pre-final-LN hidden
    state with normalize(bypass + h)·‖h‖ at the slots, then the final LayerNorm."""
    config = tiny_config()
    ref = hf_model(config)
    enc = CLIPTextEncoder.from_state_dict(ref.state_dict(), hidden_act=config.hidden_act, num_heads=4).double()
    base = torch.randn(2, 3, config.hidden_size, dtype=torch.float64)  # per-sample (B, N, D)
    bypass = torch.randn(2, 3, config.hidden_size, dtype=torch.float64)
    ids = torch.randint(0, config.vocab_size - 2, (2, 77))
    ids[:, 0], ids[:, 12] = config.bos_token_id, config.eos_token_id
    slots = torch.full_like(ids, -1)
    slots[0, 3:6] = torch.tensor([0, 1, 2])
    slots[1, 7:10] = torch.tensor([0, 1, 2])
    vocab = config.vocab_size
    ref.resize_token_embeddings(vocab + 6)
    with torch.no_grad():
        ref.embeddings.token_embedding.weight[vocab:] = base.reshape(6, -1)
        ref_ids = torch.where(slots >= 0, vocab + slots + 3 * torch.arange(2)[:, None], ids)
        out = ref(ref_ids, output_hidden_states=True)
        ctx = encode_kv(enc, ids, slots, base, bypass)
    torch.testing.assert_close(ctx.key, out.last_hidden_state, rtol=1e-10, atol=1e-10)
    pre = out.hidden_states[-1].clone()
    for b in range(2):
        for pos in (slots[b] >= 0).nonzero().flatten().tolist():
            h = pre[b, pos]
            pre[b, pos] = (bypass[b, slots[b, pos]] + h) / (bypass[b, slots[b, pos]] + h).norm() * h.norm()
    with torch.no_grad():
        expected_v = ref.final_layer_norm(pre)
    torch.testing.assert_close(ctx.value, expected_v, rtol=1e-10, atol=1e-10)
    outside = slots < 0
    assert torch.equal(ctx.value[outside], ctx.key[outside])
    assert not torch.allclose(ctx.value[~outside], ctx.key[~outside])
    # without a bypass V is K
    assert encode_kv(enc, ids, slots, base).value is not None
    assert torch.equal(encode_kv(enc, ids, slots, base).value, ctx.key)


def test_bypass_keeps_the_hidden_norm_and_gradients_flow():
    h = torch.randn(1, 5, 8)
    slots = torch.tensor([[-1, 0, -1, 1, -1]])
    b = torch.randn(2, 8, requires_grad=True)
    out = apply_bypass(h, slots, b)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1))
    assert torch.equal(out[0, [0, 2, 4]], h[0, [0, 2, 4]])
    out.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- stages
def test_dynamic_bins_cover_the_stage_once():
    plan = PRESETS["official"]
    for n in (1, 7, 100, 401, 1000):
        bins = dynamic_bins(plan, n)
        covered = [t for b in bins for t in range(b.first, b.last + 1)]
        assert sorted(covered) == list(range(400, 801))
        assert all(b.first <= b.rep <= b.last for b in bins)
        assert len(bins) == min(n, 401) and bins[0].last == 800  # high t first
    assert all(b.first == b.rep == b.last for b in dynamic_bins(plan, 401))  # exact


def test_bins_for_visited_timesteps_are_exact_at_the_visited_ones():
    plan = PRESETS["official"]
    visited = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 499, 449, 399, 349, 0]
    bins = bins_for_visited(plan, visited)
    assert [b.rep for b in bins] == [799, 749, 699, 649, 599, 549, 499, 449]
    covered = sorted(t for b in bins for t in range(b.first, b.last + 1))
    assert covered == list(range(400, 801))
    for b in bins:  # each owns the integers nearer to it than to its neighbours
        for t in range(b.first, b.last + 1):
            assert min(abs(t - c.rep) for c in bins) == abs(t - b.rep)
    assert bins_for_visited(plan, [999, 100])[0].rep == (400 + 800) // 2  # nothing dynamic visited


def test_iou_partition_finds_both_thresholds():
    ious = {t: 1.01 - t / 1000 for t in range(950, 0, -50)}  # IoU grows as t falls
    plan = partition_by_iou(ious)
    assert plan.source == "iou"
    assert plan.t_high == 325  # 300 is the first grid point with IoU >= 0.7 (0.71); 350 has 0.66
    assert plan.t_low == 226  # 200 is the first with IoU > 0.8 (0.81): the second static stage starts there
    step = {t: 0.2 if t >= 600 else (0.75 if t >= 300 else 0.95) for t in range(900, 0, -100)}
    assert (partition_by_iou(step).t_low, partition_by_iou(step).t_high) == (251, 550)
    never_high = partition_by_iou({t: 0.75 - t / 4000 for t in range(950, 0, -50)})
    assert never_high.t_low == 0 and never_high.source == "iou"
    assert partition_by_iou({t: 0.1 for t in range(950, 0, -50)}) == PRESETS["official"]  # uninformative maps
    noisy = dict(ious)
    noisy[700] = 0.95  # one stray map does not move the boundary (3-point median)
    assert partition_by_iou(noisy) == plan
    narrow = {t: 0.2 if t > 200 else 0.9 for t in range(950, 0, -50)}  # straight from < λ1 to > λ2
    assert partition_by_iou(narrow) == PRESETS["official"]


def test_attention_iou():
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    amap = torch.zeros(8, 8)
    amap[2:6, 2:6] = 3.0
    assert attention_mask_iou(amap, mask) == pytest.approx(1.0)
    amap2 = torch.zeros(8, 8)
    amap2[2:6, 4:8] = 1.0
    assert attention_mask_iou(amap2, mask) == pytest.approx(8 / 24)
    assert attention_mask_iou(torch.ones(8, 8), mask) == 0.0  # a flat map selects nothing


def _comfy_discrete_sigmas():
    # ComfyUI's ModelSamplingDiscrete for SD1 (scaled_linear 0.00085 … 0.012), written out independently
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - ac) / ac) ** 0.5).log().float()

    def sigma(t):
        t = torch.clamp(torch.as_tensor(t, dtype=torch.float32), 0, 999)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return float(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())

    def percent_to_sigma(p):
        if p <= 0:
            return 999999999.9
        if p >= 1:
            return 0.0
        return sigma((1 - p) * 999.0)

    def timestep(s):
        return int((math.log(s) - log_sigmas).abs().argmin())

    return sigma, percent_to_sigma, timestep


def test_percent_ranges_switch_exactly_at_the_nearest_timestep():
    sigma, p2s, timestep = _comfy_discrete_sigmas()
    ranges = timestep_ranges_to_percents([(801, 999), (600, 800), (400, 599), (0, 399)], sigma, p2s)
    assert ranges[0].start_percent == 0.0 and ranges[-1].end_percent == 1.0
    for a, b in zip(ranges, ranges[1:]):
        assert a.end_percent == pytest.approx(b.start_percent, abs=1e-12)
        assert a.start_percent < a.end_percent
    # every integer timestep's sigma is active in exactly the range that contains it
    for t in range(0, 1000, 7):
        s = sigma(t)
        active = [r for r in ranges if p2s(r.end_percent) <= s <= p2s(r.start_percent)]
        assert len(active) == 1 and active[0].t_min <= t <= active[0].t_max, t
        assert timestep(s) == t


# ---------------------------------------------------------------------------------------------- V-path patch
def _pairs(length=77, dim=16, n=3, slots=(5, 6)):
    pairs = []
    for _i in range(n):
        k = torch.randn(length, dim)
        v = k.clone()
        v[list(slots)] += torch.randn(len(slots), dim)
        pairs.append((k, v))
    return pairs


def test_value_patch_replaces_only_positive_rows_that_match():
    pairs = _pairs()
    patch = ValuePathPatch(pairs + [(pairs[0][0] + 1, pairs[0][0] + 1)])  # V = K entries are dropped
    assert len(patch) == 3
    neg = torch.randn(77, 16)
    other = torch.randn(77, 16)
    # batch of 2 latents: chunks [cond, uncond]; cond rows: ours (bin 1), someone else's
    context = torch.stack([pairs[1][0], other, neg, pairs[1][0]])
    n = torch.randn(4, 10, 16)
    _, ctx_out, value = patch(n, context, context, {"cond_or_uncond": [0, 1]})
    assert ctx_out is context
    torch.testing.assert_close(value[0], pairs[1][1])
    assert torch.equal(value[1], other)
    assert torch.equal(value[2], neg)
    assert torch.equal(value[3], pairs[1][0])  # identical to ours but in the negative chunk: untouched
    assert torch.equal(context[0], pairs[1][0])  # the context itself is never written


def test_value_patch_handles_lcm_repeats_and_long_negatives():
    """A 154-token negative makes ComfyUI repeat our 77-token positive to 154: still matched, V repeated;
    the long negative, even when its first 77 tokens equal ours, never matches."""
    pairs = _pairs()
    patch = ValuePathPatch(pairs)
    pos = pairs[2][0].repeat(2, 1)
    tricky_neg = torch.cat([pairs[2][0], torch.randn(77, 16)])
    context = torch.stack([pos, tricky_neg])
    _, _, value = patch(None, context, context, {})  # no cond_or_uncond: every row is checked by content
    torch.testing.assert_close(value[0], pairs[2][1].repeat(2, 1))
    assert torch.equal(value[1], tricky_neg)


def test_value_patch_casts_and_keeps_earlier_value_changes():
    pairs = _pairs()
    patch = ValuePathPatch(pairs)
    ctx = pairs[0][0].half()[None]
    earlier = ctx.clone()
    earlier[0, 20] += 1  # another patch changed a non-placeholder row of the value
    _, _, value = patch(None, ctx, earlier, {"cond_or_uncond": [0]})
    assert value.dtype == torch.float16
    assert torch.equal(value[0, 20], earlier[0, 20])
    torch.testing.assert_close(value[0, 5:7], pairs[0][1][5:7].half())
    assert copy.deepcopy(patch) is patch  # ModelPatcher.clone deep-copies model_options


# ---------------------------------------------------------------------------------------------- schedule
@pytest.fixture
def tiny_text(tmp_path):
    from transformers import CLIPTokenizer

    hf_tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    config = tiny_config(vocab_size=len(hf_tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.eos_token_id
    ref = hf_model(config).float()
    enc = CLIPTextEncoder.from_state_dict(ref.state_dict(), hidden_act=config.hidden_act, num_heads=4)
    return enc, PromptTokenizer.from_hf(hf_tok)


def test_schedule_entries_are_the_mapper_at_each_bin(tiny_text):
    enc, tok = tiny_text
    word = enc.embeddings.token_embedding.weight[tok.ids("x")[0]].detach()
    torch.manual_seed(3)
    mapper = PersonaMagicMapper(MapperConfig(word_dim=32, image_dim=8, num_anchors=20), word)
    img = torch.randn(8)
    plan = StagePlan(300, 700)
    entries = build_schedule(enc, tok, mapper, "a photo of <persona> smiling", "<persona>", plan, img, bins=10, supercategory="x")
    assert [e.stage for e in entries] == [1] + [2] * 10 + [3]
    assert entries[0].t_min == 701 and entries[-1].t_max == 299 and entries[-1].rep == 300
    # stage 1: the supercategory prompt, plain
    ids, _ = tokenize_with_slots(tok, "a photo of x smiling", [])
    torch.testing.assert_close(entries[0].key, enc(torch.tensor([ids])).last_hidden_state)
    assert torch.equal(entries[0].key, entries[0].value)
    # a dynamic bin: independent re-encoding at its rep timestep
    e = entries[4]
    text = "a photo of " + " ".join(internal_placeholders(4)) + " smiling"
    ids, slots = tokenize_with_slots(tok, text, internal_placeholders(4))
    out = mapper(torch.tensor([e.rep]), img)
    ctx = encode_kv(enc, torch.tensor([ids]), torch.tensor([slots]), out.base, out.bypass)
    torch.testing.assert_close(e.key, ctx.key)
    torch.testing.assert_close(e.value, ctx.value)
    patch = value_patch_for(entries)
    assert len(patch) == 11  # 10 bins + the frozen stage; stage 1 needs no V
    err = quantization_error(enc, tok, mapper, "a photo of <persona> smiling", "<persona>", plan, 401, img, stride=50)
    assert err["key_max"] == 0 and err["tokens_max"] == 0  # one bin per timestep is exact
    coarse = quantization_error(enc, tok, mapper, "a photo of <persona> smiling", "<persona>", plan, 4, img, stride=25)
    assert coarse["tokens_max"] > 0


# ---------------------------------------------------------------------------------------------- files
def test_file_round_trip_and_refusals(tmp_path):
    m = official_mapper(image_dim=768)
    img = torch.randn(768)
    plan = StagePlan(350, 820, source="iou")
    path = save_personamagic(tmp_path / "anna.safetensors", m, plan, "sd1", img, extra={"steps": 7})
    f = load_personamagic(path)
    assert f.plan == plan and f.family == "sd1" and f.metadata["steps"] == "7"
    torch.testing.assert_close(f.image_embed, img)
    t = torch.tensor([400, 700])
    with torch.no_grad():
        torch.testing.assert_close(f.mapper(t, img).base, m(t, img).base)
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 768)}, tmp_path / "emb.safetensors", metadata={"method": "cross_init"})
    with pytest.raises(UnsafeFileError, match="not a PersonaMagic file"):
        load_personamagic(tmp_path / "emb.safetensors")
    # the official mapper-steps-N.pt pickles a module object next to the weights: refused, never unpickled
    torch.save({"state_dict": m.state_dict(), "encoder": torch.nn.Linear(1, 1)}, tmp_path / "official.pt")
    with pytest.raises(UnsafeFileError):
        load_personamagic(tmp_path / "official.pt")


def test_mapper_config_reads_files_written_before_the_shared_config_pattern(tmp_path):
    """Files store the mapper's config as JSON under 'mapper_config' (written with json.dumps(asdict(config)) before
    utils.config existed): they load unchanged; a field this FaceBooth does not know is refused by name."""
    import dataclasses
    import json

    from safetensors.torch import load_file, save_file

    m = official_mapper(image_dim=768)
    path = save_personamagic(tmp_path / "new.safetensors", m, StagePlan(400, 800), "sd1", torch.randn(768))
    tensors = load_file(str(path))
    with open(path, "rb") as fh:  # the metadata as written, straight from the safetensors header
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))["__metadata__"]
    old_style = {**header, "mapper_config": json.dumps(dataclasses.asdict(m.config))}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old_style)
    assert load_personamagic(tmp_path / "old.safetensors").mapper.config == m.config
    assert json.loads(header["mapper_config"]) == json.loads(old_style["mapper_config"])  # the same JSON either way
    broken = {**header, "mapper_config": json.dumps({**dataclasses.asdict(m.config), "depth": 3})}
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata=broken)
    with pytest.raises(UnsafeFileError, match="depth"):
        load_personamagic(tmp_path / "newer.safetensors")


# ---------------------------------------------------------------------------------------------- losses
def test_masked_mse_is_the_official_normalised_sum():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    expected = torch.stack([((pred[b] - target[b]) ** 2 * mask[b]).sum() / (mask[b].expand(4, -1, -1)).sum() for b in range(2)]).mean()
    torch.testing.assert_close(masked_mse(pred, target, mask), expected)
    torch.testing.assert_close(masked_mse(pred, target, torch.ones(2, 8, 8)), F.mse_loss(pred, target))
    torch.testing.assert_close(masked_mse(pred, target, None), F.mse_loss(pred, target))


def test_tandem_equilibrium_loss_by_hand():
    torch.manual_seed(1)
    probs = torch.rand(1, 2, 10, 10).softmax(-1)
    ids = torch.tensor([[100, 5, 6, 7, 8, 101, 101, 101, 101, 101]])  # BOS, 4 tokens, EOS, padding
    slots = torch.tensor([[-1, -1, 0, 1, -1, -1, -1, -1, -1, -1]])
    mask = prompt_token_mask(ids, 100, 101)
    assert mask.tolist() == [[False, True, True, True, True, False, False, False, False, False]]
    loss = tandem_equilibrium_loss(probs, slots, mask)
    recv = probs[0].sum((0, 1))
    s = 2 if recv[2] >= recv[3] else 3
    t = [1, 4][int(recv[4] > recv[1])]
    share = torch.softmax(torch.stack([probs[0, :, :, s], probs[0, :, :, t]], -1) * 100, -1)[..., 0].mean()
    torch.testing.assert_close(loss, -1e-3 * share * (1 - share))
    assert loss >= -0.25e-3  # p(1−p) ≤ ¼
    no_words = torch.tensor([[-1, 0, 1, 2, 3, -1, -1, -1, -1, -1]])
    assert tandem_equilibrium_loss(probs, no_words, mask) == 0


def test_tandem_equilibrium_gradient_reaches_the_tokens(tiny_text):
    enc, tok = tiny_text
    base = (torch.randn(4, 32) * 0.3).requires_grad_(True)
    text = "a " + " ".join(internal_placeholders(4)) + " is reading"
    ids, slots = tokenize_with_slots(tok, text, internal_placeholders(4))
    ids, slots = torch.tensor([ids]), torch.tensor([slots])
    ctx = encode_kv(enc, ids, slots, base, None, output_attentions=True)
    loss = tandem_equilibrium_loss(ctx.attention_probs, slots, prompt_token_mask(ids, tok.bos_id, tok.eos_id))
    loss.backward()
    assert loss < 0 and base.grad.abs().sum() > 0


def test_identity_loss_crops_like_the_analyzer_and_weights_by_lambda():
    from facebooth.pipelines.face.align import arcface_matrix, warp_affine

    torch.manual_seed(0)
    img = torch.rand(1, 3, 128, 128) * 2 - 1
    lm = torch.tensor([[50.0, 55], [80, 54], [65, 72], [53, 90], [77, 89]])
    m = arcface_matrix(lm)[None]
    crops = aligned_face_crops(img, m)
    expected = warp_affine(((img[0] + 1) / 2).permute(1, 2, 0), m[0], 112)
    torch.testing.assert_close(crops[0], expected)

    class Rec:
        input_size = 112

        def embed(self, x):
            return F.normalize(x.mean(dim=(1, 2)), dim=-1)

    img.requires_grad_(True)
    ref = torch.tensor([[1.0, 0.0, 0.0]])
    t = torch.tensor([500])
    loss = identity_loss(img, m, ref, Rec(), t)
    cos = F.normalize(crops.mean(dim=(1, 2)), dim=-1)[0, 0]
    torch.testing.assert_close(loss, lambda_id(t)[0] * (1 - cos))
    loss.backward()
    assert img.grad.abs().sum() > 0
    torch.testing.assert_close(lambda_id(torch.tensor([0, 1000])), torch.tensor([1.0, math.cos(math.pi / 2)]))


# ---------------------------------------------------------------------------------------------- diffusers K/V
def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def test_kv_processor_equals_diffusers_when_v_is_k_and_uses_v_otherwise():
    unet = _tiny_unet()
    x, t, k = torch.randn(2, 4, 8, 8), torch.tensor([10, 600]), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=k).sample
        state = KVState()
        unet.set_attn_processor(KVAttnProcessor(state))
        same = unet(x, t, encoder_hidden_states=k).sample
        state.value = k.clone()
        also_same = unet(x, t, encoder_hidden_states=k).sample
        v = k.clone()
        v[:, 3] += 1.0
        state.value = v
        changed = unet(x, t, encoder_hidden_states=k).sample  # one layer is checked by hand below
    torch.testing.assert_close(same, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(also_same, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed, expected, atol=1e-5)


def test_kv_processor_one_layer_by_hand_and_probe():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=32, heads=2, dim_head=8).eval()
    state = KVState()
    attn.set_processor(KVAttnProcessor(state))
    x, k, v = torch.randn(1, 9, 16), torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    probe = AttentionProbe(torch.tensor([1, 2]))
    state.value, state.probe = v, probe
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=k)
        q, kk, vv = attn.to_q(x), attn.to_k(k), attn.to_v(v)
        qh, kh, vh = (z.view(1, -1, 2, 8).transpose(1, 2) for z in (q, kk, vv))
        p = (qh @ kh.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        expected = attn.to_out[0]((p @ vh).transpose(1, 2).reshape(1, 9, 16))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe.maps[9][0], p[0, :, :, 1:3].sum(-1).mean(0))
    amap = probe.spatial_map(3, 3)
    assert amap.shape == (1, 3, 3)
