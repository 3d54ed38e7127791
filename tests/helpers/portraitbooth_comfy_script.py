"""Runs inside ComfyUI's code base (a separate process: ComfyUI parses argv and keeps global state).

    python portraitbooth_comfy_script.py COMFYUI_DIR WORK_DIR OUT_JSON {fastcomposer|multidiffusion}

Writes a FastComposer-layout checkpoint (old key names, bf16/fp32 mix) built from the random SD1.5 test models, loads
it with our nodes in ComfyUI, and measures every output against independent references: diffusers / transformers
models with the same weights, FastComposer's post-fuse MLP in plain torch ops, ComfyUI's own prompt weighting, and
ComfyUI's own mask-conditioning for MultiDiffusion. Results (errors, flags) go to OUT_JSON; the pytest side asserts.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
comfy_dir, work, out_json, MODE = sys.argv[1:5]
sys.argv = [sys.argv[0], "--cpu", "--fp32-unet", "--fp32-text-enc", "--fp32-vae"]
sys.path.insert(0, comfy_dir)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402
from facebooth.devmodels import face_models, portraitbooth_models as pbm  # noqa: E402
from facebooth.devmodels.sd15_checkpoint import load_reference_models  # noqa: E402
from facebooth.nodes import model_folders  # noqa: E402
from facebooth.nodes import multidiffusion as mdn  # noqa: E402
from facebooth.nodes import portraitbooth as pbn  # noqa: E402
from facebooth.pipelines.face.analyzer import FaceAnalyzer  # noqa: E402
from facebooth.pipelines.face.arcface import ArcFaceRecognizer, iresnet_from_state_dict  # noqa: E402
from facebooth.pipelines.face.types import Face, FaceSet  # noqa: E402
from facebooth.pipelines.portraitbooth.stea import clip_image_input  # noqa: E402

import tiny_sd  # noqa: E402  (this script's folder, tests/helpers, is sys.path[0])
from fastcomposer_reference import reference_postfuse  # noqa: E402

results: dict = {}
work = Path(work)
torch.manual_seed(0)


def maxerr(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def bf16(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return module


def check(name, mode):
    def deco(fn):
        if mode != MODE:
            return fn
        start = time.perf_counter()
        try:
            fn()
        except Exception:  # record and go on: the pytest side reports which check failed and why
            results[name + "_error"] = traceback.format_exc()[-3000:]
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        return fn
    return deco


# --------------------------------------------------------------------------------------- setup
pb_dir, emb_dir = work / "portraitbooth", work / "embeddings"
pb_dir.mkdir(parents=True, exist_ok=True)
emb_dir.mkdir(parents=True, exist_ok=True)
model_folders.register_model_folders()
folder_paths.folder_names_and_paths["facebooth/portraitbooth"] = ([str(pb_dir)], {".bin", ".safetensors"})
folder_paths.folder_names_and_paths["embeddings"] = ([str(emb_dir)], {".safetensors"})
from safetensors.torch import save_file  # noqa: E402

save_file({"emb_params": torch.randn(2, 768) * 0.3}, str(emb_dir / "myemb.safetensors"))

if MODE == "fastcomposer":
    unet_ref, vae_ref, text_ref = load_reference_models(tiny_sd.checkpoint_file())
    vision = pbm.random_vision_encoder(7)
    post = pbm.random_postfuse(seed=8).fuse
    fc_sd = pbm.fastcomposer_state_dict(unet_ref, vae_ref, text_ref, vision, post)
    torch.save(fc_sd, pb_dir / "fastcomposer.bin")
    post_sd = {k[len("postfuse_module."):]: v for k, v in fc_sd.items() if k.startswith("postfuse_module.")}
    vision_ref = pbm.random_vision_encoder(7)  # independent copy, then the file's dtypes
    vision_ref.load_state_dict({k[len("image_encoder."):]: v.float() for k, v in fc_sd.items()
                                if k.startswith("image_encoder.") and not k.endswith("position_ids")}, strict=False)
    bf16(text_ref)
    bf16(vae_ref)

    results["seconds"] = {"setup": round(time.perf_counter() - T0, 1)}
    t_load = time.perf_counter()
    model, clip, vae, stea = pbn.FastComposerLoader.execute("fastcomposer.bin").result
    results["seconds"]["load"] = round(time.perf_counter() - t_load, 1)
else:
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_sd.checkpoint_file()))[:3]
results["model_class"] = type(model.model.model_config).__name__


@check("unet", "fastcomposer")
def _unet():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3
    ctx = torch.randn(2, 77, 768, generator=g) * 0.5
    sigma = torch.tensor([7.0, 0.8])
    ms = model.model.model_sampling
    with torch.no_grad():
        ours = model.model.apply_model(x, sigma, c_crossattn=ctx)
        t = ms.timestep(sigma).float()
        eps = unet_ref(x / torch.sqrt(sigma ** 2 + 1)[:, None, None, None], t, ctx).sample
        ref = x - sigma[:, None, None, None] * eps
    results["unet_err"] = maxerr(ours, ref)
    results["unet_scale"] = float(ref.abs().max())


@check("clip", "fastcomposer")
def _clip():
    tokens = clip.tokenize("a photo of a woman with red hair")
    ids = torch.tensor([[t[0] for t in tokens["l"][0]]])
    with torch.no_grad():
        ours = clip.encode_from_tokens(tokens)
        ref = text_ref(input_ids=ids).last_hidden_state
    results["clip_err"] = maxerr(ours, ref)


@check("vae", "fastcomposer")
def _vae():
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = vae.decode(z)
        ref = ((vae_ref.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    results["vae_err"] = maxerr(ours, ref)


def make_faces(n: int, seed: int) -> FaceSet:
    g = torch.Generator().manual_seed(seed)
    faces = []
    for i in range(n):
        faces.append(Face(
            image_index=i, box=(0.0, 0.0, 64.0, 64.0), score=1.0, landmarks=torch.zeros(5, 2), mask=torch.ones(64, 64),
            crops={"ffhq_512": torch.rand(512, 512, 3, generator=g), "arcface_112": torch.rand(112, 112, 3, generator=g),
                   "clip_224": torch.rand(224, 224, 3, generator=g)},
            embedding=F.normalize(torch.randn(512, generator=g), dim=0),
        ))
    return FaceSet(images=torch.rand(n, 64, 64, 3, generator=g), faces=faces, missing=[])


FILLER = " ".join(["mountain", "river", "forest", "cloud", "city", "street", "garden", "window"] * 11)
PROMPT = f"a (woman:1.3) next to embedding:myemb a man, {FILLER}, the man waves"


@check("stea", "fastcomposer")
def _stea():
    faces = make_faces(2, 3)
    (cond,) = pbn.PortraitBoothConditioning.execute(stea, clip, faces, PROMPT, "man, woman", 0.0).result
    tokens = clip.tokenize(PROMPT)
    n_chunks = len(tokens["l"])
    results["stea_chunks"] = n_chunks
    with torch.no_grad():
        plain = clip.encode_from_tokens(tokens)
        unweighted = clip.encode_from_tokens({"l": [[(t[0], 1.0) for t in c] for c in tokens["l"]]})
        empty = clip.encode_from_tokens(clip.tokenize(""))
    fused = cond[0][0]
    changed = sorted(set(torch.nonzero((fused - plain).abs().amax(-1)[0] > 0).flatten().tolist()))
    inv = pbn._sd_tokenizer(clip).inv_vocab
    flat = [t for c in tokens["l"] for t in c]
    results["stea_changed_rows"] = changed
    results["stea_changed_words"] = [inv.get(flat[i][0], "?") if isinstance(flat[i][0], int) else "<tensor>" for i in changed]
    results["stea_has_embedding_token"] = any(not isinstance(t[0], int) for t in flat)
    # independent reference per subject: transformers vision tower + plain-op MLP + ComfyUI's weighting rule
    errs = []
    for subject_row, face, weight in ((changed[0], faces.faces[1], 1.3), (changed[1], faces.faces[0], 1.0)):
        with torch.no_grad():
            emb = vision_ref(pixel_values=clip_image_input(face.crops["ffhq_512"][None])).image_embeds[0]
            row = reference_postfuse(post_sd, unweighted[0, subject_row], emb)
        slot = subject_row % 77
        row = (row - empty[0, slot]) * weight + empty[0, slot]
        errs.append(maxerr(fused[0, subject_row], row))
    results["stea_errs"] = errs
    results["stea_other_rows_equal"] = bool(torch.equal(
        fused[0, [i for i in range(fused.shape[1]) if i not in changed]], plain[0, [i for i in range(fused.shape[1]) if i not in changed]]))
    (delayed,) = pbn.PortraitBoothConditioning.execute(stea, clip, faces, PROMPT, "man, woman", 0.2).result
    results["delayed_ranges"] = [[e[1].get("start_percent"), e[1].get("end_percent")] for e in delayed]
    results["delayed_text_is_plain"] = bool(torch.allclose(delayed[0][0], plain, atol=1e-6))
    results["delayed_fused_is_fused"] = bool(torch.allclose(delayed[1][0], fused, atol=1e-6))
    for name, text, subjects in (("missing", "a photo of a woman", "man"), ("embedding", PROMPT, "embedding:myemb")):
        try:
            pbn.PortraitBoothConditioning.execute(stea, clip, faces, text, subjects, 0.0)
            results[f"error_{name}"] = None
        except Exception as exc:  # noqa: BLE001
            results[f"error_{name}"] = f"{type(exc).__name__}: {exc}"
    (single,) = pbn.PortraitBoothConditioning.execute(stea, clip, make_faces(3, 4), "a photo of a man", "man", 0.0).result
    results["single_avg_ok"] = bool(torch.isfinite(single[0][0]).all())


@check("arcface_stea", "fastcomposer")
def _arcface():
    path = pbm.write_random_stea(pb_dir / "stea.safetensors", layers=("layer3", "embedding"))  # the reference below reads these
    (loaded,) = pbn.STEALoader.execute("stea.safetensors").result
    backbone = iresnet_from_state_dict(face_models.random_arcface_state_dict(18, seed=5))
    analyzer = FaceAnalyzer(detector=None, recognizer=ArcFaceRecognizer(backbone.eval(), device="cpu"), name="t")
    faces = make_faces(1, 6)
    prompt = "portrait of a smiling woman"
    (cond,) = pbn.PortraitBoothConditioning.execute(loaded, clip, faces, prompt, "woman", 0.0, analyzer).result
    seen = {}
    hooks = [getattr(backbone, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in ("layer3", "features")]
    with torch.no_grad():
        backbone((faces.faces[0].crops["arcface_112"][None].permute(0, 3, 1, 2).contiguous() - 0.5) / 0.5)
    for h in hooks:
        h.remove()
    feat = torch.cat([F.normalize(seen["layer3"].mean((2, 3)), dim=-1) * 16.0, F.normalize(seen["features"], dim=-1) * (512 ** 0.5)], -1)[0]
    tokens = clip.tokenize(prompt)
    with torch.no_grad():
        plain = clip.encode_from_tokens(tokens)
    inv = pbn._sd_tokenizer(clip).inv_vocab
    row = next(i for i, t in enumerate(tokens["l"][0]) if inv.get(t[0]) == "woman</w>")
    from safetensors.torch import load_file

    stea_sd = {k[len("stea."):]: v for k, v in load_file(str(path)).items()}
    with torch.no_grad():
        ref = reference_postfuse(stea_sd, plain[0, row], feat)
    results["arcface_stea_err"] = maxerr(cond[0][0][0, row], ref)
    try:
        pbn.PortraitBoothConditioning.execute(loaded, clip, faces, prompt, "woman", 0.0, None)
        results["arcface_needs_analyzer"] = None
    except Exception as exc:  # noqa: BLE001
        results["arcface_needs_analyzer"] = str(exc)


@check("multidiffusion", "multidiffusion")
def _multidiffusion():
    w_px, h_px = 96, 64
    latent = torch.zeros(1, 4, h_px // 8, w_px // 8)

    def enc(text):
        return [[clip.encode_from_tokens(clip.tokenize(text)), {}]]

    bg, left, right = enc("a quiet park"), enc("a woman in red"), enc("a man in blue")
    neg = enc("blurry")
    m_left = torch.zeros(h_px, w_px)
    m_left[:, :32] = 1
    m_right = torch.zeros(h_px, w_px)
    m_right[:, 64:] = 1
    (regions,) = mdn.MultiDiffusionRegion.execute(left, 0, 0, 1, 1, m_left[None], None).result
    (regions,) = mdn.MultiDiffusionRegion.execute(right, 0, 0, 1, 1, m_right[None], regions).result
    (patched,) = mdn.MultiDiffusionSampling.execute(model, regions, 0.0, 512, 64, 0, 0, None).result
    calls = []

    def counter(executor, *args, **kwargs):
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_counter", counter)
    noise = comfy.sample.prepare_noise(latent, 0)
    ours = comfy.sample.sample(patched, noise, 2, 4.0, "euler", "normal", bg, neg, latent, seed=0, disable_pbar=True)
    # ComfyUI's own masked conditioning: the same mask-weighted average, computed by ComfyUI
    m_bg = 1 - m_left - m_right

    def masked(c, m):
        return [[c[0][0], {"mask": m[None], "mask_strength": 1.0, "set_area_to_bounds": False}]]

    native_pos = masked(bg, m_bg) + masked(left, m_left) + masked(right, m_right)
    native = comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", native_pos, neg, latent, seed=0, disable_pbar=True)
    plain = comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", bg, neg, latent, seed=0, disable_pbar=True)
    results["md_vs_native_err"] = maxerr(ours, native)
    results["md_vs_plain_diff"] = maxerr(ours, plain)
    results["md_calls"] = calls
    # windows + bootstrapping in a real sampler run
    (boot,) = mdn.MultiDiffusionSampling.execute(model, regions, 0.4, 64, 16, 0, 0, vae).result
    out = comfy.sample.sample(boot, noise, 3, 4.0, "euler", "normal", bg, neg, latent, seed=0, disable_pbar=True)
    results["md_boot_finite"] = bool(torch.isfinite(out).all())
    results["md_boot_differs"] = maxerr(out, ours)
    try:
        mdn.MultiDiffusionSampling.execute(model, regions, 0.4, 512, 64, 0, 0, None)
        results["md_needs_vae"] = None
    except Exception as exc:  # noqa: BLE001
        results["md_needs_vae"] = str(exc)


Path(out_json).write_text(json.dumps(results, indent=1))
