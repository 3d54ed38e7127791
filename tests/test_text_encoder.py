"""The autograd-safe CLIP text encoder matches transformers (and ComfyUI) on the same random weights."""
from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from facebooth.pipelines.text_encoder import (
    CLIPTextEncoder,
    PromptTokenizer,
    batch_tokenize_with_slots,
    tokenize_with_slots,
)


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    """A character-level CLIP BPE vocabulary (+ a few merges), so tests need no downloaded tokenizer."""
    chars = list("!\"#$%&'()*+,-./") + list(string.digits) + list(":;<=>?@[]_") + list(string.ascii_lowercase)
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def tiny_config(
    vocab_size: int = 140, layers: int = 3, act: str = "quick_gelu", width: int = 32, attn: str = "sdpa"
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, attn_implementation=attn,
    )


def hf_model(config: CLIPTextConfig) -> CLIPTextModel:
    torch.manual_seed(1)
    model = CLIPTextModel(config).double().eval()
    with torch.no_grad():  # LayerNorms start at 1/0: randomise them too so they are really tested
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours(model: CLIPTextModel, **kw) -> CLIPTextEncoder:
    return CLIPTextEncoder.from_state_dict(
        model.state_dict(), hidden_act=model.config.hidden_act, num_heads=model.config.num_attention_heads, **kw
    ).double()


def random_ids(config: CLIPTextConfig, batch: int = 2, n: int = 77) -> torch.Tensor:
    ids = torch.randint(0, config.vocab_size - 2, (batch, n))
    ids[:, 0] = config.bos_token_id
    ids[:, 9] = config.eos_token_id
    return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_last_layer_matches_transformers(act):
    config = tiny_config(act=act)
    ref = hf_model(config)
    enc = ours(ref)
    ids = random_ids(config)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        got = enc(ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_penultimate_layer_and_no_final_norm_match_transformers_hidden_states():
    config = tiny_config(act="gelu")
    ref = hf_model(config)
    ids = random_ids(config)
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states[-2]
        sd2 = ours(ref, layer="penultimate")(ids).last_hidden_state  # SD2 in ComfyUI: penultimate + final LN
        sdxl = ours(ref, layer=-2, final_layer_norm=False)(ids).last_hidden_state  # SDXL: no final LN
        expected_sd2 = ref.final_layer_norm(hidden)
    assert len(ours(ref, layer="penultimate").encoder.layers) == config.num_hidden_layers - 1
    torch.testing.assert_close(sd2, expected_sd2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sdxl, hidden, rtol=1e-10, atol=1e-10)


def test_injected_rows_equal_transformers_with_extended_vocabulary():
    config = tiny_config()
    ref = hf_model(config)
    enc = ours(ref)
    vectors = torch.randn(2, config.hidden_size, dtype=torch.float64)
    ids = random_ids(config, batch=3)
    slots = torch.full_like(ids, -1)
    slots[0, 3], slots[0, 4], slots[1, 5], slots[2, 1], slots[2, 7] = 0, 1, 0, 1, 0
    # Independent path: give the vectors real token ids in a bigger table and run transformers on ids.
    vocab = config.vocab_size
    ref.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        ref.embeddings.token_embedding.weight[vocab:] = vectors
    ref_ids = torch.where(slots >= 0, vocab + slots, ids)
    with torch.no_grad():
        expected = ref(ref_ids).last_hidden_state
        got = enc(ids, slot_ids=slots, slot_vectors=vectors).last_hidden_state
        got_batched = enc(ids, slot_ids=slots, slot_vectors=vectors.expand(3, -1, -1)).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_batched, expected, rtol=1e-10, atol=1e-10)


def test_inputs_embeds_path_equals_ids_path():
    config = tiny_config()
    enc = ours(hf_model(config))
    ids = random_ids(config)
    a = enc(ids).last_hidden_state
    b = enc(inputs_embeds=enc.token_embeddings(ids)).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_reach_only_the_injected_vectors():
    config = tiny_config()
    enc = ours(hf_model(config))
    vectors = torch.randn(2, config.hidden_size, dtype=torch.float64, requires_grad=True)
    ids = random_ids(config)
    slots = torch.full_like(ids, -1)
    slots[:, 2], slots[:, 3] = 0, 1
    out = enc(ids, slot_ids=slots, slot_vectors=vectors, output_attentions=True)
    (out.last_hidden_state.square().mean() + out.attention_probs.square().mean()).backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


def test_last_layer_attention_probs_match_transformers_eager():
    config = tiny_config(attn="eager")  # transformers returns probabilities only from eager attention
    ref = hf_model(config)
    enc = ours(ref)
    ids = random_ids(config)
    with torch.no_grad():
        expected = ref(ids, output_attentions=True).attentions[-1]
        got = enc(ids, output_attentions=True).attention_probs
    assert got.shape == (2, config.num_attention_heads, 77, 77)
    # transformers' eager attention runs its softmax in float32, hence float32 tolerance here
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_prefixed_comfy_layout_picks_the_right_tower():
    l_model = hf_model(tiny_config(width=32))
    h_model = hf_model(tiny_config(width=48, act="gelu"))
    sd = {f"clip_l.transformer.text_model.{k}": v for k, v in l_model.state_dict().items()}
    sd.update({f"clip_h.transformer.text_model.{k}": v for k, v in h_model.state_dict().items()})
    sd["clip_l.transformer.text_projection.weight"] = torch.zeros(32, 32)
    sd["clip_l.logit_scale"] = torch.tensor(4.6)
    enc_h = CLIPTextEncoder.from_state_dict(sd, prefix="clip_h.", num_heads=4)
    assert enc_h.hidden_size == 48 and enc_h.config.hidden_act == "gelu"
    torch.testing.assert_close(enc_h.embeddings.token_embedding.weight, h_model.embeddings.token_embedding.weight)
    assert len(enc_h.encoder.layers) == 3
    with pytest.raises(KeyError, match="Several CLIP text towers"):
        CLIPTextEncoder.from_state_dict(sd)
    with pytest.raises(KeyError, match="towers found"):
        CLIPTextEncoder.from_state_dict(sd, prefix="clip_g.")


def test_tokenize_with_slots_matches_a_tokenizer_that_knows_the_placeholders(tmp_path):
    folder = write_tiny_clip_tokenizer(tmp_path / "tok")
    hf = CLIPTokenizer.from_pretrained(folder)
    tok = PromptTokenizer.from_hf(hf)
    prompt = "a photo of a face of <fb_v0> <fb_v1> person, on the beach"
    ids, slots = tokenize_with_slots(tok, prompt, ["<fb_v0>", "<fb_v1>"])
    with_tokens = CLIPTokenizer.from_pretrained(folder)
    with_tokens.add_tokens(["<fb_v0>", "<fb_v1>"])
    expected = with_tokens(prompt, padding="max_length", max_length=77)["input_ids"]
    new0, new1 = with_tokens.convert_tokens_to_ids(["<fb_v0>", "<fb_v1>"])
    assert len(ids) == len(slots) == 77
    assert [i for i, s in zip(ids, slots) if s < 0] == [i for i in expected if i not in (new0, new1)]
    assert [s for s in slots if s >= 0] == [0, 1]
    assert slots.index(0) == expected.index(new0) and slots.index(1) == expected.index(new1)
    # SD2/SDXL-G pad with "!" (id 0), not with end-of-text.
    sd2 = PromptTokenizer.from_hf(CLIPTokenizer.from_pretrained(folder, pad_token="!"))
    ids2, _ = tokenize_with_slots(sd2, prompt, ["<fb_v0>", "<fb_v1>"])
    assert ids2[-1] == 0 and ids[-1] == hf.eos_token_id
    batch_ids, batch_slots = batch_tokenize_with_slots(tok, [prompt, "the <fb_v1>"], ["<fb_v0>", "<fb_v1>"])
    assert batch_ids.shape == batch_slots.shape == (2, 77)
    with pytest.raises(ValueError, match="Shorten it"):
        tokenize_with_slots(tok, "x " * 80, [])


# ------------------------------------------------------------------------------------- ComfyUI parity
def _comfy_dir() -> Path | None:
    d = Path(os.environ.get("COMFYUI_DIR") or Path.home() / "ComfyUI")
    return d if (d / "comfy" / "sd1_clip.py").is_file() else None


_COMFY_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy import sd1_clip
from safetensors.torch import load_file, save_file
import json
cfg = json.loads(sys.argv[3])
sd = load_file(sys.argv[2])
out = {}
for name, layer, idx, pad in (("sd1", "last", None, cfg["eos"]), ("sd2", "hidden", -2, 0)):
    m = sd1_clip.SDClipModel(layer=layer, layer_idx=idx, textmodel_json_config=dict(cfg["config"]), dtype=torch.float32,
        special_tokens={"start": cfg["bos"], "end": cfg["eos"], "pad": pad}, return_projected_pooled=False)
    m.load_sd(sd)
    z, _ = m.encode_token_weights([[(t, 1.0) for t in toks] for toks in cfg[name]])
    out[name] = z.contiguous()
save_file(out, sys.argv[4])
"""


@pytest.mark.slow
def test_matches_comfyui_conditioning_sd1_last_and_sd2_penultimate(tmp_path):
    """Same random weights, same tokens: ComfyUI's SDClipModel and ours agree for both layer choices."""
    comfy = _comfy_dir()
    if comfy is None:
        pytest.skip("no ComfyUI tree (set COMFYUI_DIR)")
    from safetensors.torch import load_file, save_file

    config = tiny_config(vocab_size=49408, act="gelu")  # ComfyUI fixes the vocabulary size
    ref = hf_model(config).float()
    sd = {f"text_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    sd["text_projection.weight"] = torch.eye(config.hidden_size)
    save_file(sd, tmp_path / "clip.safetensors")
    bos, eos = config.bos_token_id, config.eos_token_id
    body = torch.randint(0, config.vocab_size - 2, (6,)).tolist()
    sd1_tokens = [[bos] + body + [eos] * (77 - 1 - len(body))]
    sd2_tokens = [[bos] + body + [eos] + [0] * (77 - 2 - len(body))]
    cfg = {
        "config": config.to_dict() | {"hidden_act": "gelu"}, "bos": bos, "eos": eos,
        "sd1": sd1_tokens, "sd2": sd2_tokens,
    }
    run = subprocess.run(
        [sys.executable, "-c", _COMFY_SCRIPT, str(comfy), str(tmp_path / "clip.safetensors"), json.dumps(cfg),
         str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    comfy_out = load_file(tmp_path / "out.safetensors")
    sd1 = CLIPTextEncoder.from_state_dict(sd, hidden_act="gelu", num_heads=4, layer="last")
    sd2 = CLIPTextEncoder.from_state_dict(sd, hidden_act="gelu", num_heads=4, layer="penultimate")
    with torch.no_grad():
        ours_sd1 = sd1(torch.tensor(sd1_tokens)).last_hidden_state
        ours_sd2 = sd2(torch.tensor(sd2_tokens)).last_hidden_state
    torch.testing.assert_close(ours_sd1, comfy_out["sd1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_sd2, comfy_out["sd2"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours_sd1, ours_sd2, atol=1e-3)  # the layer choice really differs
