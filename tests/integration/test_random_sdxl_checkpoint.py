"""The random SDXL-family checkpoint (devmodels/sdxl_checkpoint.py): ComfyUI's own loader detects it as an SDXL
model, uses every key, and gives finite conditioning; its CLIP-L really holds the file's weights (the
transformers-5 ``text_model.`` prefix gotcha would load it as garbage without any warning), checked against
transformers' CLIPTextModel with the same tensors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facebooth.devmodels import sdxl_checkpoint as sx
from helpers import tiny_sd

PROMPT = "a photo of a person"

# Runs inside ComfyUI's code base (separate process: ComfyUI's modules parse argv and set global state).
COMFY_SCRIPT = r'''
import json, logging, sys, time
comfy_dir, ckpt, out = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]
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
import comfy.model_base, comfy.sd
from safetensors.torch import save_file
model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt)[:3]
cfg = model.model.model_config
unet_cfg = {k: v for k, v in cfg.unet_config.items() if isinstance(v, (int, float, str, list, type(None)))}
tokens = clip.tokenize(%(prompt)r)
with torch.no_grad():
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    l_only = clip.cond_stage_model.clip_l.encode_token_weights(tokens["l"])[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([1.0])
    y = model.model.encode_adm(pooled_output=pooled, width=64, height=64, device="cpu")
    start = time.perf_counter()
    x0 = model.model.apply_model(x, sigma, c_crossattn=cond, y=y)
    step_s = time.perf_counter() - start
    img = vae.decode(torch.randn(1, 4, 8, 8, generator=g))
ids = [t for t, _ in tokens["l"][0]]
save_file({"cond": cond.float().contiguous(), "pooled": pooled.float().contiguous(), "l_only": l_only.float().contiguous(),
           "x0": x0.float().contiguous(), "img": img.float().contiguous(), "ids_l": torch.tensor([ids])}, out + ".safetensors")
keys = [m for m in messages if "left over" in m or "missing" in m or "unexpected" in m or "Missing" in m]
with open(out + ".json", "w") as f:
    json.dump({"config": type(cfg).__name__, "is_sdxl": isinstance(model.model, comfy.model_base.SDXL),
               "unet_config": unet_cfg, "key_messages": keys, "step_s": step_s,
               "vae": type(vae.first_stage_model).__name__}, f)
''' % {"prompt": PROMPT}


def sdxl_checkpoint_file() -> Path:
    return sx.write_random_sdxl_checkpoint(tiny_sd.cache_dir() / "checkpoints" / sx.checkpoint_name())


def test_fingerprint_changes_with_the_config():
    assert sx.TinySDXLConfig().fingerprint() != sx.TinySDXLConfig(seed=1).fingerprint()
    assert sx.TinySDXLConfig().fingerprint() != sx.TinySDXLConfig(transformer_depth=(0, 2, 6)).fingerprint()


def test_clip_g_layout_has_the_full_bigg_tower():
    shapes = sx.clip_g_shapes()
    assert shapes["transformer.resblocks.31.attn.in_proj_weight"] == (3 * 1280, 1280)
    assert "transformer.resblocks.32.ln_1.weight" not in shapes
    assert shapes["text_projection"] == (1280, 1280)


@pytest.mark.slow
def test_comfyui_loads_it_as_sdxl_family_with_every_key(comfyui_dir, tmp_path):
    ckpt = sdxl_checkpoint_file()
    assert sx.read_fingerprint(ckpt) == sx.TinySDXLConfig().fingerprint()
    script = tmp_path / "comfy_side.py"
    script.write_text(COMFY_SCRIPT)
    out = tmp_path / "comfy_out"
    proc = subprocess.run([sys.executable, str(script), str(comfyui_dir), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=comfyui_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["is_sdxl"], info["config"]
    assert info["config"] == "KOALA_700M"
    uc = info["unet_config"]
    assert uc["context_dim"] == 2048 and uc["adm_in_channels"] == 2816 and uc["use_linear_in_transformer"] is True
    assert info["vae"] == "TAESD"
    # Every key used, none missing. SDXL files carry no CLIP-L logit_scale / text_projection; ComfyUI expects that.
    absent_ok = ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")
    problems = [m for m in info["key_messages"]
                if not (m.startswith("clip missing") and all(k in m for k in absent_ok) and m.count("'") == 4)]
    assert not problems, problems

    from safetensors.torch import load_file

    got = load_file(str(out) + ".safetensors")
    assert got["cond"].shape == (1, 77, 2048) and got["pooled"].shape == (1, 1280)
    for name in ("cond", "pooled", "x0", "img"):
        assert torch.isfinite(got[name]).all(), name
    assert got["cond"].std() > 0.05 and got["pooled"].std() > 0.05  # not a degenerate (all-equal) output
    assert info["step_s"] < 10

    # CLIP-L against transformers with the file's tensors: penultimate hidden state, no final LayerNorm.
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from facebooth.devmodels.sd15_checkpoint import CLIP_L_TEXT_CONFIG

    ref = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)).eval()
    with safe_open(str(ckpt), framework="pt") as f:
        weights = {k[len(sx.CLIP_L_PREFIX):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(sx.CLIP_L_PREFIX)}
    own = ref.state_dict()
    prefixed = next(iter(own)).startswith("text_model.")
    missing = ref.load_state_dict({("text_model." + k if prefixed else k): v for k, v in weights.items()}, strict=False)
    assert not missing.unexpected_keys and all("position_ids" in k for k in missing.missing_keys)
    with torch.no_grad():
        hidden = ref(got["ids_l"].long(), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(got["l_only"], hidden, atol=2e-4, rtol=1e-3)
