"""Face2Diffusion mapping networks, weight loading and token injection.

Exactness references: the mapping against a hand-written functional forward from the same state dict; the
injection against transformers' CLIP modules driven by hand (embeddings -> replace rows -> encoder layers with
a causal mask -> final LayerNorm), which is what the official code does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facebooth.pipelines.face2diffusion import (
    F2DMapping,
    F2DMappingConfig,
    F2DWeightsError,
    IdentityTokens,
    MSIDConfig,
    MSIDEncoder,
    PlaceholderError,
    encode_with_identities,
    expression_dropout_mask,
    find_identity_slots,
    load_mapping,
    load_msid,
    placeholder_token_id,
    plan_chunked_injection,
    prepare_expression,
    save_mapping,
    save_msid,
)

transformers = pytest.importorskip("transformers")

SMALL_MAP = F2DMappingConfig(id_dim=96, hidden_dim=80, out_dim=32, exp_dim=64)
BOS, EOS, F_ID, L_ID = 998, 999, 325, 331


def _randomize(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ref_mapping(sd: dict[str, torch.Tensor], x: torch.Tensor, prefix: str, n_layer: int = 2) -> torch.Tensor:
    for i in range(n_layer):
        x = F.leaky_relu(F.linear(x, sd[f"{prefix}.layers.{i}.0.weight"], sd[f"{prefix}.layers.{i}.0.bias"]), 0.2)
    return F.linear(x, sd[f"{prefix}.fc_out.weight"], sd[f"{prefix}.fc_out.bias"])


# --- mapping ---------------------------------------------------------------------------------------------


def test_mapping_official_keys_and_sizes():
    sd = F2DMapping().state_dict()
    expected = {"null_exp": (64,)}
    for side in ("i2t_first", "i2t_last"):
        expected.update({
            f"{side}.layers.0.0.weight": (1536, 1600), f"{side}.layers.0.0.bias": (1536,),
            f"{side}.layers.1.0.weight": (1536, 1536), f"{side}.layers.1.0.bias": (1536,),
            f"{side}.fc_out.weight": (768, 1536), f"{side}.fc_out.bias": (768,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == 12_000_832
    assert torch.count_nonzero(sd["null_exp"]) == 0  # official init: zeros


def test_mapping_matches_functional_reference_with_null_and_masked_expression():
    m = F2DMapping(SMALL_MAP).eval()
    _randomize(m)
    sd = m.state_dict()
    idv = torch.randn(3, 96)
    exp = torch.randn(3, 64)
    mask = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        out_null = m(idv)
        out_mix = m(idv, exp, mask)
    null = sd["null_exp"].expand(3, -1)
    x_null = torch.cat([idv, null], 1)
    mixed = torch.stack([exp[0], sd["null_exp"], exp[2]])
    x_mix = torch.cat([idv, mixed], 1)
    for out, x in ((out_null, x_null), (out_mix, x_mix)):
        assert out.shape == (3, 2, 32)
        torch.testing.assert_close(out[:, 0], _ref_mapping(sd, x, "i2t_first"))
        torch.testing.assert_close(out[:, 1], _ref_mapping(sd, x, "i2t_last"))
    # the masked-out row equals the null-expression row; the others differ
    torch.testing.assert_close(out_mix[1], out_null[1])
    assert not torch.allclose(out_mix[0], out_null[0])


def test_mapping_dropout_only_in_training_and_shape_errors():
    m = F2DMapping(SMALL_MAP)
    idv = torch.randn(4, 96)
    m.train()
    assert not torch.allclose(m(idv), m(idv))
    m.eval()
    torch.testing.assert_close(m(idv), m(idv))
    with pytest.raises(ValueError, match="MSID"):
        m(torch.randn(4, 95))
    with pytest.raises(ValueError, match="64 coefficients"):
        m(idv, torch.randn(4, 63))


def test_prepare_expression_and_dropout():
    assert prepare_expression(None, 3) == (None, None)
    exp, mask = prepare_expression([torch.ones(64), None, torch.full((64,), 2.0)], 3)
    assert mask.tolist() == [1.0, 0.0, 1.0] and exp[2, 0] == 2.0 and exp[1].abs().sum() == 0
    exp, mask = prepare_expression(torch.randn(64), 4)
    assert exp.shape == (4, 64) and mask is None
    with pytest.raises(ValueError, match="64 coefficients"):
        prepare_expression(torch.randn(2, 10), 2)
    with pytest.raises(ValueError, match="one per face"):
        prepare_expression(torch.randn(2, 64), 3)
    g = torch.Generator().manual_seed(0)
    keep = expression_dropout_mask(torch.ones(20000, dtype=torch.bool), 0.2, generator=g)
    assert abs(keep.mean().item() - 0.8) < 0.02
    none = expression_dropout_mask(torch.zeros(10, dtype=torch.bool), 0.2)
    assert none.sum() == 0


# --- loading -----------------------------------------------------------------------------------------------


def test_official_mapping_pt_loads_unchanged(tmp_path):
    ref = F2DMapping().eval()
    _randomize(ref)
    path = tmp_path / "mapping.pt"
    torch.save(ref.state_dict(), path)  # official format: a plain state dict
    loaded = load_mapping(path)
    assert not loaded.training and loaded.config == F2DMappingConfig()
    idv = torch.randn(2, 1536)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idv), ref(idv), rtol=0, atol=0)


def test_official_msid_pt_and_safetensors_roundtrip(tmp_path):
    cfg = MSIDConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, feature_blocks=(0, 1, 3))
    ref = MSIDEncoder(cfg).eval()
    _randomize(ref)
    torch.save(ref.state_dict(), tmp_path / "msid.pt")
    a = load_msid(tmp_path / "msid.pt")  # plain dict: heads from the official 32-d head size
    save_msid(ref, tmp_path / "msid.safetensors", {"note": "test"})
    b = load_msid(tmp_path / "msid.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        r = ref(x)
        torch.testing.assert_close(a(x), r, rtol=0, atol=0)
        torch.testing.assert_close(b(x), r, rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "msid.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(ref.state_dict())
    assert meta["method"] == "face2diffusion" and meta["component"] == "msid" and meta["note"] == "test"
    assert json.loads(meta["config"])["num_heads"] == 2


def test_tiny_heads_survive_via_metadata(tmp_path):
    cfg = MSIDConfig(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, feature_blocks=(0, 1))
    ref = MSIDEncoder(cfg).eval()
    _randomize(ref)
    save_msid(ref, tmp_path / "m.safetensors")
    got = load_msid(tmp_path / "m.safetensors")
    assert got.config.num_heads == 3
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref(x), rtol=0, atol=0)


def test_mapping_safetensors_roundtrip(tmp_path):
    ref = F2DMapping(SMALL_MAP).eval()
    _randomize(ref)
    p = save_mapping(ref, tmp_path / "map.safetensors")
    got = load_mapping(p)
    assert got.config == SMALL_MAP
    idv = torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(got(idv), ref(idv), rtol=0, atol=0)


def test_loading_errors_are_clear(tmp_path):
    sd = F2DMapping(SMALL_MAP).state_dict()
    missing = dict(sd)
    missing.pop("i2t_last.fc_out.bias")
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(F2DWeightsError, match=r"1 missing key\(s\): i2t_last.fc_out.bias"):
        load_mapping(tmp_path / "missing.pt")

    extra = dict(sd, **{"i2t_first.extra.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(F2DWeightsError, match=r"unexpected key\(s\).*i2t_first.extra.weight"):
        load_mapping(tmp_path / "extra.pt")

    bad = dict(sd)
    bad["i2t_last.fc_out.weight"] = torch.zeros(31, 80)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(F2DWeightsError, match="wrong shape: i2t_last.fc_out.weight"):
        load_mapping(tmp_path / "shape.pt")

    torch.save(F2DMapping(SMALL_MAP), tmp_path / "pickled.pt")  # a whole pickled module, not a state dict
    with pytest.raises(F2DWeightsError, match="weights-only"):
        load_mapping(tmp_path / "pickled.pt")

    # swapped inputs are named as such
    with pytest.raises(F2DWeightsError, match="Swap the two inputs"):
        load_msid(tmp_path / "missing.pt")
    torch.save(MSIDEncoder(MSIDConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=1, feature_blocks=(0,))).state_dict(), tmp_path / "m.pt")
    with pytest.raises(F2DWeightsError, match="Swap the two inputs"):
        load_mapping(tmp_path / "m.pt")

    nan = dict(sd)
    nan["null_exp"] = torch.full((64,), float("nan"))
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(F2DWeightsError, match="NaN"):
        load_mapping(tmp_path / "nan.pt")

    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(F2DWeightsError, match="not a valid safetensors"):
        load_mapping(tmp_path / "trunc.safetensors")


# --- injection ---------------------------------------------------------------------------------------------


def _tiny_clip(width: int = 32) -> "transformers.CLIPTextModel":
    cfg = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )
    cfg._attn_implementation = "eager"
    model = transformers.CLIPTextModel(cfg).eval()
    _randomize(model)
    return model


def _ids(*body: int, length: int = 77) -> torch.Tensor:
    row = [BOS, *body, EOS]
    return torch.tensor(row + [EOS] * (length - len(row)))


def _reference_encode(model, input_ids: torch.Tensor, replacements: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """What the official code does, with transformers' modules called by hand."""
    inner = getattr(model, "text_model", model)
    hidden = inner.embeddings(input_ids=input_ids).clone()
    for b, slot, vec in replacements:
        hidden[b, slot] = vec
    n = hidden.shape[1]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer in inner.encoder.layers:
        hidden = layer(hidden, mask)
    return inner.final_layer_norm(hidden)


def test_slot_finding_rules():
    ids = [BOS, 1, F_ID, L_ID, 5, F_ID, L_ID, EOS]
    assert find_identity_slots(ids, [F_ID]) == [2]
    assert find_identity_slots(ids, [F_ID, F_ID]) == [2, 5]
    assert find_identity_slots([BOS, F_ID, F_ID, 7, F_ID, 9, EOS], [F_ID, F_ID]) == [1, 4]  # "f f" pair is taken whole
    with pytest.raises(PlaceholderError, match="no free placeholder"):
        find_identity_slots(ids, [F_ID, F_ID, F_ID])
    with pytest.raises(PlaceholderError, match="no free placeholder"):
        find_identity_slots([BOS, 1, 2, EOS], [F_ID])
    with pytest.raises(PlaceholderError, match="next token"):
        find_identity_slots([BOS, 1, F_ID], [F_ID])


@pytest.mark.parametrize("batch", [1, 2])
def test_injection_equals_hand_built_hidden_state(batch):
    model = _tiny_clip()
    ids = _ids(11, 12, F_ID, L_ID, 13).unsqueeze(0).repeat(batch, 1)
    if batch == 2:
        ids[1] = _ids(F_ID, L_ID, 21, 22, 23, 24)  # placeholder at a different position in row 2
    vec = torch.randn(batch, 2, 32)
    with torch.no_grad():
        ours = encode_with_identities(model, ids, [IdentityTokens(F_ID, vec)]).last_hidden_state
        reps = []
        for b in range(batch):
            slot = ids[b].tolist().index(F_ID)
            reps += [(b, slot, vec[b, 0]), (b, slot + 1, vec[b, 1])]
        ref = _reference_encode(model, ids, reps)
        plain = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # before the placeholder nothing changes (causal), at and after it everything does
    slot = ids[0].tolist().index(F_ID)
    torch.testing.assert_close(ours[0, :slot], plain[0, :slot], rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0, slot:], plain[0, slot:], atol=1e-4)
    # the hook is gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, plain)


def test_two_identities_in_one_prompt_and_custom_placeholder():
    model = _tiny_clip()
    other = 444  # a user-chosen placeholder token
    ids = _ids(F_ID, L_ID, 7, other, 8, 9).unsqueeze(0)
    a, b = torch.randn(2, 32), torch.randn(2, 32)
    with torch.no_grad():
        ours = encode_with_identities(model, ids, [IdentityTokens(F_ID, a, "anna"), IdentityTokens(other, b, "ben")])[0]
        ref = _reference_encode(model, ids, [(0, 1, a[0]), (0, 2, a[1]), (0, 4, b[0]), (0, 5, b[1])])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    with pytest.raises(PlaceholderError, match="ben"):
        encode_with_identities(model, _ids(F_ID, L_ID).unsqueeze(0), [IdentityTokens(F_ID, a, "anna"), IdentityTokens(other, b, "ben")])


def test_injection_backpropagates_to_vectors_only():
    model = _tiny_clip()
    for p in model.parameters():
        p.requires_grad_(False)
    vec = torch.randn(1, 2, 32, requires_grad=True)
    out = encode_with_identities(model, _ids(1, F_ID, L_ID).unsqueeze(0), [IdentityTokens(F_ID, vec)])[0]
    out.square().mean().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0


def test_width_mismatch_message():
    model = _tiny_clip()
    with pytest.raises(ValueError, match="SD1.x"):
        encode_with_identities(model, _ids(F_ID, L_ID).unsqueeze(0), [IdentityTokens(F_ID, torch.randn(2, 768))])


def test_host_position_correction_reproduces_replacement():
    """A host that adds position embeddings to every slot (ComfyUI) ends with the official hidden state."""
    model = _tiny_clip()
    pos = model.embeddings.position_embedding.weight.detach()
    tok = model.embeddings.token_embedding.weight.detach()
    chunk = _ids(3, 4, F_ID, L_ID, 5).tolist()
    vec = torch.randn(2, 32)
    plan = plan_chunked_injection([chunk], [IdentityTokens(F_ID, vec)], pos)
    assert [(c, s) for c, s, _ in plan] == [(0, 3), (0, 4)]
    # host side: token embeddings, injected tensors in their slots, then + position embedding everywhere
    emb = tok[torch.tensor(chunk)].clone()
    for _, s, v in plan:
        emb[s] = v
    hidden = (emb + pos)[None]
    official = model.embeddings(input_ids=torch.tensor([chunk])).clone()
    official[0, 3:5] = vec
    torch.testing.assert_close(hidden, official, rtol=0, atol=1e-6)


def test_chunked_plan_across_chunks():
    pos = torch.randn(77, 32)
    c0 = _ids(1, 2).tolist()
    c1 = _ids(F_ID, L_ID, 5).tolist()
    plan = plan_chunked_injection([c0, c1], [IdentityTokens(F_ID, torch.zeros(2, 32))], pos)
    assert [(c, s) for c, s, _ in plan] == [(1, 1), (1, 2)]
    torch.testing.assert_close(plan[0][2], -pos[1])
    straddle = [BOS] + [1] * 74 + [F_ID, EOS]
    with pytest.raises(PlaceholderError, match="split across two 77-token chunks"):
        plan_chunked_injection([straddle, [BOS, L_ID, EOS] + [EOS] * 74], [IdentityTokens(F_ID, torch.zeros(2, 32))], pos)


def _comfy_tokenizer_dir() -> Path:
    root = os.environ.get("COMFYUI_DIR")
    if not root:
        pytest.skip("COMFYUI_DIR is not set: the CLIP BPE tokenizer ships with ComfyUI (comfy/sd1_tokenizer)")
    path = Path(root).expanduser() / "comfy" / "sd1_tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"no CLIP tokenizer at {path}")
    return path


def test_placeholder_token_with_real_clip_tokenizer():
    tok = transformers.CLIPTokenizer.from_pretrained(str(_comfy_tokenizer_dir()))
    fid = placeholder_token_id(tok)
    assert fid == 325 and tok.convert_ids_to_tokens(fid) == "f</w>"
    ids = tok("a photo of f l", padding="max_length", max_length=77).input_ids
    assert find_identity_slots(ids, [fid]) == [4] and ids[5] == 331
    with pytest.raises(PlaceholderError, match="single token"):
        placeholder_token_id(tok, "zxqv")  # splits into several BPE tokens
    assert placeholder_token_id(tok, "person") == tok("person", add_special_tokens=False).input_ids[0]


_COMFY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    sys.path.insert(0, sys.argv[1])
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.sd1_clip, comfy.clip_model
    from facebooth.pipelines.face2diffusion import IdentityTokens, encode_with_identities, plan_chunked_injection
    torch.manual_seed(0)
    cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
               eos_token_id=49407, pad_token_id=49407)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    comfy_model = comfy.sd1_clip.SDClipModel(textmodel_json_config=dict(cfg), dtype=torch.float32,
        special_tokens={"start": 49406, "end": 49407, "pad": 49407})
    inner = getattr(hf, "text_model", hf)
    sd = {"text_model." + k: v for k, v in inner.state_dict().items() if not k.endswith("position_ids")}
    missing, unexpected = comfy_model.transformer.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("text_projection") for k in missing), (missing, unexpected)
    ids = [49406, 11, 12, 325, 331, 13, 49407] + [49407] * 70
    vec = torch.randn(2, 32)
    pos = inner.embeddings.position_embedding.weight.detach()
    chunk = list(ids)
    for c, s, v in plan_chunked_injection([ids], [IdentityTokens(325, vec)], pos):
        chunk[s] = v
    z, _ = comfy_model([chunk])
    with torch.no_grad():
        ref = encode_with_identities(hf, torch.tensor([ids]), [IdentityTokens(325, vec)]).last_hidden_state
    err = (z - ref).abs().max().item()
    print("MAXERR", err)
    assert err < 1e-5, err
    """
)


@pytest.mark.integration
@pytest.mark.slow
def test_comfyui_clip_with_corrected_tensor_tokens_matches_official(tmp_path):
    """ComfyUI's own SD1 CLIP, fed our position-corrected tensor tokens, gives the official conditioning."""
    root = os.environ.get("COMFYUI_DIR")
    if not root or not (Path(root).expanduser() / "comfy" / "sd1_clip.py").is_file():
        pytest.skip("COMFYUI_DIR is not set (needs ComfyUI's comfy package)")
    script = tmp_path / "comfy_check.py"
    script.write_text(_COMFY_SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script), str(Path(root).expanduser())], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "MAXERR" in res.stdout
