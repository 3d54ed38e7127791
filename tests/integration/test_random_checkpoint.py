"""The random SD1.5 checkpoint: ComfyUI detects it as SD15, uses every key, and its UNet, text encoder and VAE
compute what the diffusers / transformers reference models (tests/helpers/tiny_sd.py) compute with the same
weights. ComfyUI's own checkpoint loader is the independent check of our diffusers -> LDM key mapping."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facebooth.devmodels.sd15_checkpoint import (
    METADATA_KIND,
    TinySD15Config,
    read_fingerprint,
    write_random_sd15_checkpoint,
)
from helpers import tiny_sd


PROMPT = "a photo of a person"

# Runs inside ComfyUI's code base (separate process: ComfyUI's modules parse argv and set global state).
COMFY_SCRIPT = r'''
import json, logging, sys
comfy_dir, ckpt, out = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc", "--fp32-vae"]
sys.path.insert(0, comfy_dir)
messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.DEBUG)
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.sd
from safetensors.torch import save_file
model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt)[:3]
cfg = model.model.model_config
unet_cfg = {k: v for k, v in cfg.unet_config.items() if isinstance(v, (int, float, str, list, type(None)))}
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 8, 8, generator=g)
t = torch.tensor([999.0, 250.0])
ctx = torch.randn(2, 77, 768, generator=g) * 0.5
z = torch.randn(1, 4, 8, 8, generator=g)
with torch.no_grad():
    eps = model.model.diffusion_model(x, timesteps=t, context=ctx).float()
    cond = clip.encode_from_tokens(clip.tokenize(%(prompt)r)).float()
    img = vae.decode(z).float()
save_file({"x": x, "t": t, "ctx": ctx, "z": z, "eps": eps.contiguous(), "cond": cond.contiguous(), "img": img.contiguous()}, out + ".safetensors")
keys = [m for m in messages if "left over" in m or "missing" in m or "unexpected" in m]
with open(out + ".json", "w") as f:
    json.dump({"config": type(cfg).__name__, "unet_config": unet_cfg, "key_messages": keys,
               "unet_dtype": str(model.model.diffusion_model.dtype)}, f)
''' % {"prompt": PROMPT}


def test_checkpoint_is_cached_by_fingerprint(tmp_path):
    """Same seed/config: the file is not rewritten. Another seed: it is."""
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"not a checkpoint")
    assert read_fingerprint(path) is None
    cached = tiny_sd.checkpoint_file()  # the shared cached file (generated on first use)
    assert read_fingerprint(cached) == TinySD15Config().fingerprint()
    mtime = cached.stat().st_mtime_ns
    assert write_random_sd15_checkpoint(cached) == cached
    assert cached.stat().st_mtime_ns == mtime
    assert TinySD15Config(seed=1).fingerprint() != TinySD15Config().fingerprint()
    from safetensors import safe_open

    with safe_open(str(cached), framework="pt") as f:
        meta = f.metadata()
        assert meta["facebooth.kind"] == METADATA_KIND and meta["facebooth.seed"] == "0"
        dtypes = {f.get_slice(k).get_dtype() for k in list(f.keys())[:50]}
    assert dtypes == {"F16"}


@pytest.mark.slow
def test_file_holds_exactly_the_seeded_reference_models():
    """What tiny_sd reads back from the file equals what the seeded builders draw, bit for bit."""
    from facebooth.devmodels.sd15_checkpoint import build_text_encoder, build_unet, build_vae

    cfg = TinySD15Config()
    for read, build in ((tiny_sd.unet(), build_unet(cfg)), (tiny_sd.vae(), build_vae(cfg)),
                        (tiny_sd.text_encoder(), build_text_encoder(cfg))):
        a, b = read.state_dict(), build.state_dict()
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, different[:5]


@pytest.mark.slow
def test_comfyui_loads_it_as_sd15_and_matches_diffusers_and_transformers(comfyui_dir, tmp_path):
    ckpt = tiny_sd.checkpoint_file()
    script = tmp_path / "comfy_side.py"
    script.write_text(COMFY_SCRIPT)
    out = tmp_path / "comfy_out"
    proc = subprocess.run([sys.executable, str(script), str(comfyui_dir), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=comfyui_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["config"] == "SD15"
    uc = info["unet_config"]
    assert uc["model_channels"] == 320 and uc["context_dim"] == 768
    assert uc["channel_mult"] == [1, 2] and uc["num_res_blocks"] == [1, 1]
    assert uc["transformer_depth"] == [1, 1] and uc["transformer_depth_middle"] == 1
    assert uc["use_linear_in_transformer"] is False
    # Every key used, none missing. SD1.5 files have no logit_scale / text_projection; ComfyUI expects that.
    sd15_absent = ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")
    problems = [m for m in info["key_messages"]
                if not (m.startswith("clip missing") and all(k in m for k in sd15_absent) and m.count("'") == 4)]
    assert not problems, problems

    from safetensors.torch import load_file

    got = load_file(str(out) + ".safetensors")
    with torch.no_grad():
        eps = tiny_sd.unet()(got["x"], got["t"], encoder_hidden_states=got["ctx"]).sample
        tok = tiny_sd.clip_tokenizer(comfyui_dir)
        ids = tok(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = tiny_sd.text_encoder()(ids).last_hidden_state
        img = tiny_sd.vae().decode(got["z"]).sample
    img = ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    assert eps.abs().mean() > 0.05  # not a degenerate all-zero network
    torch.testing.assert_close(got["eps"], eps, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(got["cond"], cond, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(got["img"], img, atol=2e-4, rtol=1e-3)
