"""Cross Initialization: init vs a direct transformers computation, regulariser formula, presets, files,
the official learned_embeds.bin, and the CLI end to end on a tiny diffusers folder."""
from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from facebooth.pipelines import cross_init as ci
from facebooth.pipelines.runtime import RunHooks
from facebooth.pipelines.text_encoder import CLIPTextEncoder, PromptTokenizer
from facebooth.utils.files import UnsafeFileError


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    chars = list("!\"#$%&'()*+,-./") + list(string.digits) + list(":;<=>?@[]_") + list(string.ascii_lowercase)
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "n</w>"), ("p", "h"), ("ph", "o"), ("pho", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def tiny_hf_text(tok, layers: int = 3, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_diffusers(folder: Path) -> Path:
    """A complete, tiny SD1-layout diffusers folder (random weights)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(folder / "_tok"))
    te = tiny_hf_text(tok, layers=2).float()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
    )
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name, obj in (("unet", unet), ("vae", vae), ("text_encoder", te), ("tokenizer", tok), ("scheduler", sched)):
        obj.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_diffusers(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))


# ---------------------------------------------------------------------------------------------- init
def _direct_init(model, tok, names, penultimate: bool = False) -> torch.Tensor:
    """The official recipe written straight against transformers: token rows, means, then the text model."""
    rows = model.embeddings.token_embedding.weight.detach()
    col1, col2 = [], []
    for name in names:
        ids = tok(name)["input_ids"]  # [BOS, ..., EOS], no padding
        body = ids[1:-1]
        col1.append(rows[body[0]])
        if len(body) >= 2:
            col2.append(rows[body[1]])
    m1, m2 = torch.stack(col1).mean(0), torch.stack(col2).mean(0)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 2)  # give the two means token ids of their own
    with torch.no_grad():
        model.embeddings.token_embedding.weight[vocab] = m1
        model.embeddings.token_embedding.weight[vocab + 1] = m2
        ids = [tok.bos_token_id, vocab, vocab + 1, tok.eos_token_id] + [tok.pad_token_id] * 73
        out = model(torch.tensor([ids]), output_hidden_states=True)
        hidden = model.final_layer_norm(out.hidden_states[-2]) if penultimate else out.last_hidden_state
    return hidden[0, 1:3]


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_init_equals_direct_transformers_computation(tokenizer, layer):
    names = ci.load_celebrity_names()
    model = tiny_hf_text(tokenizer, act="gelu" if layer == "penultimate" else "quick_gelu")
    encoder = CLIPTextEncoder.from_state_dict(
        model.state_dict(), hidden_act=model.config.hidden_act, num_heads=4, layer=layer
    )
    tok = PromptTokenizer.from_hf(tokenizer)
    got = ci.cross_initialize(encoder, tok, ci.mean_name_embeddings(encoder, tok, names))
    expected = _direct_init(model, tokenizer, names, penultimate=layer == "penultimate").float()
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_second_column_skips_single_token_names(tokenizer):
    model = tiny_hf_text(tokenizer)
    encoder = CLIPTextEncoder.from_state_dict(model.state_dict(), num_heads=4)
    tok = PromptTokenizer.from_hf(tokenizer)
    rows = model.embeddings.token_embedding.weight
    # "ann" is one merged token; "ab" is two: column 1 averages both names, column 2 only "ab".
    ann = tokenizer("ann", add_special_tokens=False)["input_ids"]
    ab = tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert len(ann) == 1 and len(ab) == 2
    means = ci.mean_name_embeddings(encoder, tok, ["ann", "ab"])
    torch.testing.assert_close(means[0], ((rows[ann[0]] + rows[ab[0]]) / 2).float())
    torch.testing.assert_close(means[1], rows[ab[1]].float())


def test_names_list_is_ours_and_documented():
    names = ci.load_celebrity_names()
    assert len(names) == 691
    assert len(set(names)) == 691  # our list keeps no duplicates (the official one has 45)
    assert all(2 <= len(n.split()) <= 3 and n == n.strip() for n in names)


# ---------------------------------------------------------------------------------------------- loss
def test_regulariser_matches_the_formula():
    anchor = {"clip_h": torch.randn(2, 1024)}
    v = {"clip_h": (anchor["clip_h"] + torch.randn(2, 1024)).requires_grad_()}
    reg = ci.CrossInitRegularizer(anchor)
    value = reg(v)
    diff = v["clip_h"] - anchor["clip_h"] + 1e-6  # torch.pairwise_distance adds eps to the difference
    expected = 1e-5 * diff.square().sum(-1).sqrt().mean()  # λ · mean_k ‖v_k − v_init_k‖₂, not squared
    torch.testing.assert_close(value, expected)
    value.backward()
    unit = diff.detach() / diff.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(v["clip_h"].grad, 1e-5 * unit / 2)  # constant-length gradient: not squared
    assert reg({"clip_h": anchor["clip_h"].clone()}).item() < 1e-5 * 1e-4


def test_templates_and_prompts():
    assert len(ci.TEMPLATES) == 81 and len(set(ci.TEMPLATES)) == 81
    assert all(t.count("{s}") == 1 for t in ci.TEMPLATES)
    prompts = ci.training_prompts(["<a>", "<b>"])
    assert "a photo of a face of <a> <b> person" in prompts
    assert all("face of <a> <b> person" in p for p in prompts)
    assert {"photo", "illustration", "depiction"} <= {w for p in prompts for w in p.split()}


def test_presets():
    full, fast = ci.make_settings("full"), ci.make_settings("fast")
    assert (full.steps, full.batch_size, full.lr, full.preset) == (320, 8, 0.005, "full")
    assert (fast.steps, fast.batch_size, fast.lr, fast.preset) == (25, 8, 0.08, "fast")
    assert ci.make_settings("fast", steps=25).preset == "fast"  # same value: still the preset
    custom = ci.make_settings("fast", steps=50)
    assert (custom.steps, custom.lr, custom.preset) == (50, 0.08, "custom")
    assert ci.make_settings("custom").steps == 320
    cfg = full.ti_config()
    assert (cfg.betas, cfg.weight_decay, cfg.adam_eps, cfg.flip_p) == ((0.9, 0.999), 1e-2, 1e-8, 0.5)
    with pytest.raises(ValueError, match="unknown preset"):
        ci.make_settings("turbo")


def test_prepare_images():
    wide = torch.zeros(20, 40, 3)
    wide[:, 10:30] = 1.0  # the centre square is white
    out = ci.prepare_images(wide, resolution=16)
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out, torch.ones_like(out))
    stretched = ci.prepare_images(wide, resolution=16, crop="none")
    assert stretched.min() == -1
    gray_rgba = [torch.rand(32, 32, 1), torch.rand(24, 30, 4)]
    assert ci.prepare_images(gray_rgba, resolution=8).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="too small"):
        ci.prepare_images(torch.rand(8, 8, 3))


# ---------------------------------------------------------------------------------------------- files
def test_official_learned_embeds_round_trip(tmp_path):
    v0, v1 = torch.randn(1024), torch.randn(1024)
    src = tmp_path / "learned_embeds.bin"
    torch.save({"28017_v0": v0, "28017_v1": v1}, src)
    embedding, ident = ci.load_official_learned_embeds(src)
    assert ident == "28017" and list(embedding) == ["clip_h"]
    dst = ci.convert_official(src, tmp_path / "28017.safetensors")
    saved = load_file(dst)
    assert list(saved) == ["clip_h"]
    torch.testing.assert_close(saved["clip_h"], torch.stack([v0, v1]))
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "cross_init" and meta["base_family"] == "sd2" and meta["dims"] == "clip_h=1024"
    # An SD1 result converts to clip_l, in token order even when the dict is not.
    torch.save({"<x>_v1": v1[:768], "<x>_v0": v0[:768]}, src)
    embedding, ident = ci.load_official_learned_embeds(src)
    assert ident == "x"
    torch.testing.assert_close(embedding["clip_l"], torch.stack([v0[:768], v1[:768]]))


def test_official_loader_refuses_pickled_objects_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.bin"
    torch.save({"28017_v0": torch.zeros(1024), "obj": argparse.Namespace(a=1)}, evil)
    with pytest.raises(UnsafeFileError, match="weights-only"):
        ci.load_official_learned_embeds(evil)
    other = tmp_path / "other.bin"
    torch.save({"string_to_param": torch.zeros(1, 768)}, other)
    with pytest.raises(UnsafeFileError, match="not a Cross Initialization embedding"):
        ci.load_official_learned_embeds(other)
    odd = tmp_path / "odd.bin"
    torch.save({"a_v0": torch.zeros(512), "a_v1": torch.zeros(512)}, odd)
    with pytest.raises(UnsafeFileError, match="neither SD1"):
        ci.load_official_learned_embeds(odd)


# ---------------------------------------------------------------------------------------------- runs
def test_run_cross_init_on_a_tiny_model(sd_folder, tmp_path):
    from facebooth.pipelines.textual_inversion.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_pretrained(sd_folder)
    settings = ci.make_settings("fast", steps=3, batch_size=2, resolution=16)
    result = ci.run_cross_init(backend, torch.rand(20, 20, 3), settings)
    assert list(result.embedding) == ["clip_l"] and result.embedding["clip_l"].shape == (2, 32)
    assert result.metadata["steps"] == "3" and result.metadata["preset"] == "custom"
    # The regulariser's anchor is the init, and the init is the cross-initialised vector.
    tower = backend.text_encoders[0]
    expected_init = ci.cross_initialize(
        tower.encoder, tower.tokenizer, ci.mean_name_embeddings(tower.encoder, tower.tokenizer, ci.load_celebrity_names())
    )
    torch.testing.assert_close(result.init["clip_l"], expected_init)
    path = ci.save_embedding(tmp_path / "x.safetensors", result.embedding, result.metadata)
    assert load_file(path)["clip_l"].shape == (2, 32)


def test_interrupt_leaves_no_result(sd_folder):
    from facebooth.pipelines.textual_inversion.diffusers_backend import DiffusersBackend

    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Stop()

    backend = DiffusersBackend.from_pretrained(sd_folder)
    job = ci.CrossInitRun(backend, torch.rand(20, 20, 3), ci.make_settings("fast", batch_size=1, resolution=16),
                          RunHooks(check_interrupt=check))
    with pytest.raises(Stop):
        job.run()
    assert job.engine.result.vectors == {} and len(job.engine.result.loss_history) == 1


# ---------------------------------------------------------------------------------------------- CLI
def _photo(path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((24, 20, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _cli(*argv: str) -> int:
    from facebooth.cli.cross_init import add_parser

    parser = argparse.ArgumentParser(prog="facebooth")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cross-init", *argv])
    return args.func(args)


def test_cli_end_to_end(sd_folder, tmp_path):
    photo = _photo(tmp_path / "me.png")
    out = tmp_path / "embeddings"
    common = ["--pretrained", str(sd_folder), "--image", str(photo), str(photo), "--preset", "fast",
              "--steps", "2", "--batch-size", "2", "--resolution", "16", "--out", str(out), "--device", "cpu"]
    assert _cli(*common, "--name", "Anna Smith!") == 0
    written = out / "Anna_Smith_.safetensors"  # sanitised, and no space: ComfyUI splits prompts at spaces
    tensors = load_file(written)
    assert list(tensors) == ["clip_l"] and tensors["clip_l"].shape == (2, 32) and torch.isfinite(tensors["clip_l"]).all()
    with safe_open(str(written), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "cross_init" and meta["base_family"] == "sd1" and meta["steps"] == "2"
    assert meta["num_images"] == "2" and meta["dims"] == "clip_l=32"
    before = written.read_bytes()
    with pytest.raises(SystemExit, match="already exists"):
        _cli(*common, "--name", "Anna Smith!")
    assert written.read_bytes() == before
    assert _cli(*common, "--name", "Anna Smith!", "--overwrite", "--seed", "1") == 0
    assert written.read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["Anna_Smith_.safetensors"]  # no temp files left


def test_cli_refuses_bad_names_and_inputs(sd_folder, tmp_path):
    photo = _photo(tmp_path / "me.png")
    base = ["--pretrained", str(sd_folder), "--image", str(photo), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="path separator"):
        _cli(*base, "--name", "../evil")
    with pytest.raises(SystemExit, match="path separator"):
        _cli(*base, "--name", "faces/anna")
    with pytest.raises(SystemExit, match="--name is required"):
        _cli(*base)
    with pytest.raises(SystemExit, match="image not found"):
        _cli("--pretrained", str(sd_folder), "--image", str(tmp_path / "missing.jpg"), "--name", "x",
             "--out", str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="not a diffusers"):
        _cli("--pretrained", str(tmp_path), "--image", str(photo), "--name", "x", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_converts_an_official_file(tmp_path):
    src = tmp_path / "learned_embeds.bin"
    torch.save({"28017_v0": torch.randn(1024), "28017_v1": torch.randn(1024)}, src)
    assert _cli("--from-official", str(src), "--name", "28017", "--out", str(tmp_path)) == 0
    assert load_file(tmp_path / "28017.safetensors")["clip_h"].shape == (2, 1024)


@pytest.mark.slow
def test_python_m_facebooth_cross_init(sd_folder, tmp_path):
    """The real entry point: the command is registered and prints the written file on stdout."""
    import subprocess
    import sys

    photo = _photo(tmp_path / "me.png")
    run = subprocess.run(
        [sys.executable, "-m", "facebooth", "cross-init", "--pretrained", str(sd_folder), "--image", str(photo),
         "--name", "anna", "--preset", "fast", "--steps", "1", "--batch-size", "1", "--resolution", "16",
         "--out", str(tmp_path / "emb"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(tmp_path / "emb" / "anna.safetensors")
    assert list(load_file(tmp_path / "emb" / "anna.safetensors")) == ["clip_l"]


@pytest.mark.slow
def test_comfyui_loads_our_embedding_file(tmp_path):
    """ComfyUI's own embedding loader reads both vectors of our file for SD1 (clip_l) and SD2 (clip_h)."""
    import os
    import subprocess
    import sys

    comfy = Path(os.environ.get("COMFYUI_DIR") or Path.home() / "ComfyUI")
    if not (comfy / "comfy" / "sd1_clip.py").is_file():
        pytest.skip("no ComfyUI tree (set COMFYUI_DIR)")
    sd1 = {"clip_l": torch.randn(2, 768)}
    sd2 = {"clip_h": torch.randn(2, 1024)}
    ci.save_embedding(tmp_path / "a.safetensors", sd1, ci.embedding_metadata("sd1", sd1))
    ci.save_embedding(tmp_path / "b.safetensors", sd2, ci.embedding_metadata("sd2", sd2))
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import comfy.cli_args; comfy.cli_args.args.cpu = True\n"
        "from comfy.sd1_clip import load_embed\n"
        "from safetensors.torch import save_file\n"
        "a = load_embed('a', sys.argv[2], 768, 'clip_l'); b = load_embed('b', sys.argv[2], 1024, 'clip_h')\n"
        "save_file({'a': a.contiguous(), 'b': b.contiguous()}, sys.argv[3])\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(comfy), str(tmp_path), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = load_file(tmp_path / "out.safetensors")
    torch.testing.assert_close(loaded["a"], sd1["clip_l"])
    torch.testing.assert_close(loaded["b"], sd2["clip_h"])
