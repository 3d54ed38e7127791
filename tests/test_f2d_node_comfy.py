"""Face2Diffusion nodes with ComfyUI imported as a library (skipped without COMFYUI_DIR).

The reference for every conditioning is the host-independent pipeline: ``encode_with_identities`` on a
transformers ``CLIPTextModel``, which replaces the placeholder rows after the embedding layer as the official
code does. The nodes run ComfyUI's own SD1 CLIP with the same weights, fed through ``clip.tokenize`` and
``encode_from_tokens_scheduled``. MSID and mapping files are random, in the official layout (plain
``torch.save`` state dicts), or come from the training scripts.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facebooth.devmodels.face2diffusion_models import write_random_mapping, write_random_msid, write_random_pair
from facebooth.pipelines.face.types import Face, FaceSet
from facebooth.pipelines.face2diffusion import (
    F2DMappingConfig,
    F2DWeightsError,
    IdentityTokens,
    MSIDConfig,
    PlaceholderError,
    encode_identity,
    encode_with_identities,
    load_mapping,
    load_msid,
)

transformers = pytest.importorskip("transformers")

COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or "/nonexistent").expanduser()
pytestmark = pytest.mark.skipif(
    not (COMFYUI_DIR / "comfy" / "sd1_clip.py").is_file(),
    reason="needs ComfyUI's code: set COMFYUI_DIR to a ComfyUI source tree (e.g. ~/ComfyUI)",
)

FOLDER_KEY = "facebooth/face2diffusion"
F_ID, L_ID = 325, 331  # "f</w>", "l</w>" in the CLIP BPE vocabulary
# A small SD1-shaped text encoder: CLIP-L width (768, what F2D writes into) and vocabulary, 2 layers.
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=512, num_hidden_layers=2, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=49407)
SMALL_MSID = MSIDConfig(embed_dim=64, depth=3, num_heads=2, feature_blocks=(0, 2))  # 128-d identities, 32-d heads
SMALL_MAPPING = F2DMappingConfig(id_dim=128, hidden_dim=96, out_dim=768)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def comfy(comfy):  # the conftest's in-process ComfyUI (CPU), with what these tests use
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import folder_paths

    from facebooth.nodes import face2diffusion as node

    return SimpleNamespace(sd=comfy.sd, sd1_clip=comfy.sd1_clip, base=comfy.supported_models_base,
                           folder_paths=folder_paths, node=node)


@pytest.fixture(scope="module")
def hf_text():
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()
    with torch.no_grad():  # wider than the default init so that differences between rows show
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _inner_sd(hf) -> dict[str, torch.Tensor]:
    inner = getattr(hf, "text_model", hf)
    return {"text_model." + k: v for k, v in inner.state_dict().items() if not k.endswith("position_ids")}


def _comfy_clip(comfy, hf, dtype=torch.float32):
    overrides = {k: TEXT_CONFIG[k] for k in ("intermediate_size", "num_hidden_layers")}
    target = comfy.base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": overrides, "dtype": dtype})
    missing, unexpected = clip.load_sd(_inner_sd(hf))
    assert not unexpected and all(k.startswith("text_projection") for k in missing), (missing, unexpected)
    return clip


@pytest.fixture(scope="module")
def sd1_clip(comfy, hf_text):
    return _comfy_clip(comfy, hf_text)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.CLIPTokenizer.from_pretrained(str(COMFYUI_DIR / "comfy" / "sd1_tokenizer"), model_max_length=77)


@pytest.fixture(scope="module")
def f2d_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("f2d_models")
    write_random_pair(folder, seed=0, msid_config=SMALL_MSID, mapping_config=SMALL_MAPPING)
    return folder


@pytest.fixture
def models_folder(comfy, f2d_dir, monkeypatch) -> Path:
    """Point ComfyUI's facebooth/face2diffusion model folder at the test files."""
    exts = {".safetensors", ".pt", ".pth"}
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, FOLDER_KEY, ([str(f2d_dir)], exts))
    return f2d_dir


@pytest.fixture
def f2d(comfy, models_folder):
    return comfy.node.F2DLoader.execute(msid_file="msid.pt", mapping_file="mapping.pt", device="cpu")[0]


def _crops(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 112, 112, 3, generator=torch.Generator().manual_seed(seed))


def _faceset(crops: torch.Tensor, policy: str = "error") -> FaceSet:
    faces = [Face(image_index=i, box=(0.0, 0.0, 112.0, 112.0), score=1.0, landmarks=torch.zeros(5, 2),
                  mask=torch.ones(112, 112), crops={"arcface_112": c}) for i, c in enumerate(crops)]
    return FaceSet(images=crops.clone(), faces=faces, missing=[], no_face_policy=policy)


def _reference_vectors(folder: Path, crops: torch.Tensor, expression: torch.Tensor | None = None,
                       msid_name: str = "msid.pt", mapping_name: str = "mapping.pt") -> torch.Tensor:
    """S1*, S2* straight from the pipeline: several photos -> mean MSID vector -> mapping."""
    msid, mapping = load_msid(folder / msid_name), load_mapping(folder / mapping_name)
    with torch.no_grad():
        v = encode_identity(msid, crops).mean(0, keepdim=True)
        return mapping(v, None if expression is None else expression.reshape(1, -1))[0]


def _ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids


def _reference(hf, tokenizer, prompt: str, identities: list[IdentityTokens]) -> torch.Tensor:
    with torch.no_grad():
        return encode_with_identities(hf, _ids(tokenizer, prompt), identities).last_hidden_state


def _cond(conditioning) -> torch.Tensor:
    assert isinstance(conditioning, list) and len(conditioning) == 1
    cond, extra = conditioning[0]
    assert "pooled_output" in extra
    return cond


def _encode(comfy, clip, f2d, text, **kw):
    kw.setdefault("placeholder", "f")
    kw.setdefault("strength", 1.0)
    return _cond(comfy.node.F2DEncode.execute(clip=clip, f2d=f2d, text=text, **kw)[0])


def _plain(clip, text: str) -> torch.Tensor:
    return _cond(clip.encode_from_tokens_scheduled(clip.tokenize(text)))


# ------------------------------------------------------------------------------------------------ loader


def test_loader_reads_official_pt_files_and_caches(comfy, models_folder):
    files = comfy.node._model_files()
    assert set(files) == {"msid.pt", "mapping.pt"}
    out = comfy.node.F2DLoader.execute(msid_file="msid.pt", mapping_file="mapping.pt", device="cpu")[0]
    assert out.msid.feature_dim == 128 and out.mapping.config.out_dim == 768
    assert not out.msid.training and not out.mapping.training
    again = comfy.node.F2DLoader.execute(msid_file="msid.pt", mapping_file="mapping.pt", device="cpu")[0]
    assert again is out  # module-level cache
    # the official files are plain pickled state dicts: loadable with weights_only=True, nothing else inside
    sd = torch.load(models_folder / "msid.pt", weights_only=True)
    assert isinstance(sd, dict) and "norms.layer_2.0.running_var" in sd and "cls_token" in sd
    # the schema offers the msid file first for the encoder and the mapping file first for the mapping
    schema = comfy.node.F2DLoader.define_schema()
    assert schema.inputs[0].default == "msid.pt" and schema.inputs[1].default == "mapping.pt"


def test_loader_errors_name_the_problem(comfy, models_folder, tmp_path, monkeypatch):
    with pytest.raises(F2DWeightsError, match="mapping file was expected"):
        comfy.node.F2DLoader.execute(msid_file="msid.pt", mapping_file="msid.pt", device="cpu")
    other = tmp_path / "other"
    write_random_msid(other / "msid_big.pt", config=MSIDConfig(embed_dim=64, depth=3, num_heads=2, feature_blocks=(0, 1, 2)))
    (other / "mapping.pt").symlink_to(models_folder / "mapping.pt")
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, FOLDER_KEY, ([str(other)], {".pt"}))
    with pytest.raises(F2DWeightsError, match="do not belong together"):
        comfy.node.F2DLoader.execute(msid_file="msid_big.pt", mapping_file="mapping.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="facebooth/face2diffusion"):
        comfy.node.F2DLoader.execute(msid_file="nope.pt", mapping_file="mapping.pt", device="cpu")


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-weights"])
def test_encode_equals_pipeline_reference(comfy, hf_text, sd1_clip, tokenizer, f2d, models_folder, dtype):
    """Two photos of one person, ComfyUI's SD1 CLIP vs the transformers reference with the same weights.

    fp16: ComfyUI keeps the weights in fp16 and computes in fp32, so the reference gets the same rounded weights;
    the position correction must use the rounded position embedding too.
    """
    hf, clip = hf_text, sd1_clip
    if dtype == torch.float16:
        hf = copy.deepcopy(hf_text)
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.half().float())
        clip = _comfy_clip(comfy, hf, torch.float16)
    crops = _crops(2, seed=1)
    prompt = "a photo of f l person, smiling"
    got = _encode(comfy, clip, f2d, prompt, faces=_faceset(crops))
    vectors = _reference_vectors(models_folder, crops)
    ref = _reference(hf, tokenizer, prompt, [IdentityTokens(F_ID, vectors)])
    assert got.shape == ref.shape == (1, 77, 768)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the injection is real: the plain prompt differs at the pair and after it (causal attention), not before
    plain = _plain(clip, prompt)
    diff = (got - plain).abs().amax(-1)[0]
    assert diff[:4].max() < 1e-5 and diff[4:6].min() > 1e-2 and diff[6:].max() > 1e-2


def test_faces_and_face_crops_inputs_agree(comfy, sd1_clip, f2d):
    crops = _crops(1, seed=2)
    a = _encode(comfy, sd1_clip, f2d, "f l at the beach", faces=_faceset(crops))
    b = _encode(comfy, sd1_clip, f2d, "f l at the beach", face_crops=crops)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # 224 ArcFace-aligned crops (Detect Faces' aligned_faces) are resized to 112; RGBA loses its alpha
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=112, mode="bilinear").permute(0, 2, 3, 1)
    big = torch.nn.functional.interpolate(smooth.permute(0, 3, 1, 2), size=224, mode="bilinear").permute(0, 2, 3, 1)
    rgba = torch.cat([big, torch.ones(1, 224, 224, 1)], dim=-1)
    resized = comfy.node._crops_from_images(rgba)
    assert resized.shape == (1, 112, 112, 3)
    torch.testing.assert_close(resized, smooth, rtol=0, atol=0.03)
    c = _encode(comfy, sd1_clip, f2d, "f l at the beach", face_crops=rgba)
    assert c.shape == a.shape and torch.isfinite(c).all()
    with pytest.raises(ValueError, match="square"):
        _encode(comfy, sd1_clip, f2d, "f l", face_crops=torch.rand(1, 112, 100, 3))
    with pytest.raises(ValueError, match="not both"):
        _encode(comfy, sd1_clip, f2d, "f l", faces=_faceset(crops), face_crops=crops)
    with pytest.raises(ValueError, match="connect 'faces'"):
        _encode(comfy, sd1_clip, f2d, "f l")


def test_strength_blends_toward_the_plain_words(comfy, hf_text, sd1_clip, tokenizer, f2d, models_folder):
    crops = _crops(1, seed=3)
    prompt = "portrait of f l in the rain"
    zero = _encode(comfy, sd1_clip, f2d, prompt, face_crops=crops, strength=0.0)
    torch.testing.assert_close(zero, _plain(sd1_clip, prompt), rtol=0, atol=1e-6)
    s = 0.4
    vectors = _reference_vectors(models_folder, crops)
    ids = _ids(tokenizer, prompt)
    slot = ids[0].tolist().index(F_ID)
    emb = getattr(hf_text, "text_model", hf_text).embeddings
    with torch.no_grad():
        plain_rows = emb(input_ids=ids)[0, slot : slot + 2]  # token + position embedding of "f l"
    blended = plain_rows + s * (vectors - plain_rows)
    ref = _reference(hf_text, tokenizer, prompt, [IdentityTokens(F_ID, blended)])
    got = _encode(comfy, sd1_clip, f2d, prompt, face_crops=crops, strength=s)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_expression_reference_changes_the_vectors_as_the_mapping_does(comfy, hf_text, sd1_clip, tokenizer, f2d,
                                                                     models_folder, tmp_path):
    exp_dir = models_folder / "expressions"
    exp_dir.mkdir(exist_ok=True)
    coeffs = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    np.save(exp_dir / "smile.npy", coeffs)
    try:
        assert "expressions/smile.npy" not in comfy.node._model_files()  # not offered as a model file
        assert "smile.npy" in comfy.node._expression_files()
        expression = comfy.node.F2DLoadExpression.execute(expression_file="smile.npy")[0]
        torch.testing.assert_close(expression, torch.from_numpy(coeffs))
        crops = _crops(1, seed=4)
        prompt = "a photo of f l"
        got = _encode(comfy, sd1_clip, f2d, prompt, face_crops=crops, expression=expression)
        ref = _reference(hf_text, tokenizer, prompt,
                         [IdentityTokens(F_ID, _reference_vectors(models_folder, crops, torch.from_numpy(coeffs)))])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        neutral = _encode(comfy, sd1_clip, f2d, prompt, face_crops=crops)
        assert (got - neutral).abs().max() > 1e-3
        np.save(exp_dir / "bad.npy", np.zeros(10, dtype=np.float32))
        with pytest.raises(ValueError, match="64"):
            comfy.node.F2DLoadExpression.execute(expression_file="bad.npy")
        with pytest.raises(FileNotFoundError):
            comfy.node.F2DLoadExpression.execute(expression_file="../msid.pt")
    finally:
        for f in exp_dir.iterdir():
            f.unlink()
        exp_dir.rmdir()


# ------------------------------------------------------------------------------------------------ several people


def test_two_identities_one_prompt(comfy, hf_text, sd1_clip, tokenizer, f2d, models_folder):
    a, b = _crops(1, seed=5), _crops(2, seed=6)
    va, vb = _reference_vectors(models_folder, a), _reference_vectors(models_folder, b)
    chain = comfy.node.F2DIdentityNode.execute(f2d=f2d, placeholder="v", strength=1.0, face_crops=b)[0]
    assert len(chain) == 1 and chain[0].faces == 2
    prompt = "v l shaking hands with f l"
    got = _encode(comfy, sd1_clip, f2d, prompt, faces=_faceset(a), identities=chain)
    v_id = tokenizer("v", add_special_tokens=False).input_ids[0]
    ref = _reference(hf_text, tokenizer, prompt, [IdentityTokens(F_ID, va), IdentityTokens(v_id, vb)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)

    # same placeholder twice: filled in order, the Encode node's own faces first, then the chain
    same = comfy.node.F2DIdentityNode.execute(f2d=f2d, placeholder="f", strength=1.0, face_crops=b)[0]
    got2 = _encode(comfy, sd1_clip, f2d, "f l and f l", face_crops=a, identities=same)
    ref2 = _reference(hf_text, tokenizer, "f l and f l", [IdentityTokens(F_ID, va), IdentityTokens(F_ID, vb)])
    torch.testing.assert_close(got2, ref2, rtol=1e-4, atol=1e-4)

    # chain only (no faces on the Encode node); a person without a face keeps plain words but uses up the first pair
    empty = comfy.node.F2DIdentityNode.execute(f2d=f2d, placeholder="f", strength=1.0,
                                               faces=FaceSet(images=torch.rand(1, 64, 64, 3), faces=[], missing=[0],
                                                             no_face_policy="pass_through"))[0]
    both = comfy.node.F2DIdentityNode.execute(f2d=f2d, placeholder="f", strength=1.0, face_crops=b, identities=empty)[0]
    got3 = _encode(comfy, sd1_clip, f2d, "f l and f l", identities=both)
    ids = _ids(tokenizer, "f l and f l")[0].tolist()
    second = ids.index(F_ID, ids.index(F_ID) + 2)
    with torch.no_grad():
        ref3 = encode_with_identities(hf_text, torch.tensor([ids[:second] + [0] + ids[second + 1:]]),
                                      [IdentityTokens(0, vb)]).last_hidden_state  # a unique marker at the 2nd pair
    torch.testing.assert_close(got3, ref3, rtol=1e-4, atol=1e-4)

    with pytest.raises(PlaceholderError, match="identity 2"):
        _encode(comfy, sd1_clip, f2d, "only f l here", face_crops=a, identities=same)


# ------------------------------------------------------------------------------------------------ errors and policies


def test_prompt_without_placeholder_is_refused_clearly(comfy, sd1_clip, f2d):
    with pytest.raises(PlaceholderError, match="f l"):
        _encode(comfy, sd1_clip, f2d, "a photo of a person", face_crops=_crops(1, 7))
    with pytest.raises(PlaceholderError, match="single token"):
        _encode(comfy, sd1_clip, f2d, "a photo of zxqv l", face_crops=_crops(1, 7), placeholder="zxqv")
    # a custom single-token placeholder works
    cond = _encode(comfy, sd1_clip, f2d, "a photo of sks l", face_crops=_crops(1, 7), placeholder="sks")
    assert (cond - _plain(sd1_clip, "a photo of sks l")).abs().max() > 1e-2


def test_no_face_passes_the_plain_prompt_through_with_a_warning(comfy, sd1_clip, f2d, caplog):
    none = FaceSet(images=torch.rand(2, 64, 64, 3), faces=[], missing=[0, 1], no_face_policy="pass_through")
    with caplog.at_level(logging.WARNING, logger="facebooth"):
        cond = _encode(comfy, sd1_clip, f2d, "a photo of f l", faces=none)
    torch.testing.assert_close(cond, _plain(sd1_clip, "a photo of f l"), rtol=0, atol=0)
    assert any("no face" in r.getMessage() for r in caplog.records)
    skipped = FaceSet(images=torch.rand(1, 64, 64, 3), faces=[], missing=[0], no_face_policy="skip")
    with pytest.raises(ValueError, match="pass through"):
        _encode(comfy, sd1_clip, f2d, "a photo of f l", faces=skipped)


def _tiny_clip(comfy, target_tokenizer, target_clip, options: dict):
    target = comfy.base.ClipTarget(target_tokenizer, target_clip)
    return comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32})


def test_sd2_and_sdxl_clips_are_refused_by_type(comfy, f2d):
    import comfy.sdxl_clip as sdxl  # the module, not the fixture
    import comfy.text_encoders.sd2_clip as sd2

    small = {"num_hidden_layers": 3, "intermediate_size": 64}  # penultimate-layer models need 3+
    sd2_clip = _tiny_clip(comfy, sd2.SD2Tokenizer, sd2.SD2ClipModel,
                          {"clip_h_model_config": {**small, "hidden_size": 64, "num_attention_heads": 2}})
    with pytest.raises(comfy.node.UnsupportedBaseModelError, match=r"SD1\.x.*SD2\.x"):
        _encode(comfy, sd2_clip, f2d, "a photo of f l", face_crops=_crops(1, 8))
    # SDXL's CLIP-L half is 768 wide like SD1's: a width check alone would let it through
    sdxl_clip = _tiny_clip(comfy, sdxl.SDXLTokenizer, sdxl.SDXLClipModel,
                           {"clip_l_model_config": small,
                            "clip_g_model_config": {**small, "hidden_size": 64, "num_attention_heads": 2}})
    assert sdxl_clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight.shape[-1] == 768
    with pytest.raises(comfy.node.UnsupportedBaseModelError, match="SDXL"):
        _encode(comfy, sdxl_clip, f2d, "a photo of f l", face_crops=_crops(1, 8))
    # refused before any face work: even with no faces connected the message is about the model family
    with pytest.raises(comfy.node.UnsupportedBaseModelError):
        comfy.node.F2DEncode.execute(clip=sdxl_clip, f2d=f2d, text="f l", placeholder="f", strength=1.0)


# ------------------------------------------------------------------------------------------------ training outputs


def _training_helpers():
    import test_f2d_training  # tests/ is on pytest's pythonpath

    return test_f2d_training


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)


def _tiny_sd768(root: Path) -> Path:
    """A diffusers SD1-like folder whose text encoder is 768 wide (what the mapping must produce for SD1)."""
    diffusers = pytest.importorskip("diffusers")
    vocab = _training_helpers()._write_tiny_tokenizer(root / "tokenizer")
    tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"), model_max_length=77)
    tok.save_pretrained(str(root / "tokenizer"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(str(root / "text_encoder"))
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(str(root / "unet"))
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
    ).save_pretrained(str(root / "vae"))
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).save_pretrained(str(root / "scheduler"))
    return root


@pytest.mark.slow
def test_node_loads_what_the_training_scripts_write(comfy, hf_text, sd1_clip, tokenizer, tmp_path, monkeypatch):
    """train_f2d_msid (2 steps) -> msid.safetensors; train_f2d_mapping (1 step, 768-wide text encoder) ->
    mapping.safetensors; the loader node reads both and Encode matches the pipeline reference."""
    pytest.importorskip("accelerate")
    from facebooth.training import train_f2d_mapping, train_f2d_msid

    g = np.random.default_rng(0)
    for k in range(2):
        for j in range(3):
            _save_png(g.random((112, 112, 3)), tmp_path / "ids" / f"person_{k}" / f"{j}.png")
    msid_run, map_run = tmp_path / "msid_run", tmp_path / "map_run"
    assert train_f2d_msid.main([
        "--data-dir", str(tmp_path / "ids"), "--output-dir", str(msid_run), "--patch-size", "16", "--embed-dim", "32",
        "--depth", "2", "--num-heads", "2", "--feature-blocks", "0", "1", "--batch-size", "4", "--max-steps", "2",
        "--save-every", "2", "--lr-schedule", "constant",
    ]) == 0
    for i in range(2):
        _save_png(g.random((16, 16, 3)), tmp_path / "images" / f"face{i}.png")
        _save_png(g.random((112, 112, 3)), tmp_path / "crops" / f"face{i}.png")
    sd_root = _tiny_sd768(tmp_path / "tiny_sd")
    assert train_f2d_mapping.main([
        "--pretrained-model", str(sd_root), "--msid", str(msid_run / "msid.safetensors"), "--data-dir", str(tmp_path / "images"),
        "--crop-dir", str(tmp_path / "crops"), "--output-dir", str(map_run), "--resolution", "16", "--batch-size", "2",
        "--mapping-hidden", "48", "--max-steps", "1", "--save-every", "1",
    ]) == 0

    folder = tmp_path / "models"
    folder.mkdir()
    for src in (msid_run / "msid.safetensors", map_run / "mapping.safetensors"):
        (folder / src.name).symlink_to(src)
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, FOLDER_KEY, ([str(folder)], {".safetensors", ".pt"}))
    assert set(comfy.node._model_files()) == {"msid.safetensors", "mapping.safetensors"}
    f2d = comfy.node.F2DLoader.execute(msid_file="msid.safetensors", mapping_file="mapping.safetensors", device="cpu")[0]
    assert f2d.msid.config.num_heads == 2 and f2d.mapping.config.id_dim == 64 and f2d.mapping.config.hidden_dim == 48

    crops = _crops(1, seed=9)
    got = _encode(comfy, sd1_clip, f2d, "a photo of f l", face_crops=crops)
    vectors = _reference_vectors(folder, crops, msid_name="msid.safetensors", mapping_name="mapping.safetensors")
    ref = _reference(hf_text, tokenizer, "a photo of f l", [IdentityTokens(F_ID, vectors)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_official_and_safetensors_formats_of_one_model_give_the_same_conditioning(comfy, sd1_clip, tmp_path, monkeypatch):
    folder = tmp_path / "both"
    write_random_msid(folder / "msid.pt", seed=3, config=SMALL_MSID)
    write_random_msid(folder / "msid.safetensors", seed=3, config=SMALL_MSID)
    write_random_mapping(folder / "mapping.pt", seed=3, config=SMALL_MAPPING)
    write_random_mapping(folder / "mapping.safetensors", seed=3, config=SMALL_MAPPING)
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, FOLDER_KEY, ([str(folder)], {".safetensors", ".pt"}))
    crops = _crops(1, seed=10)
    conds = []
    for suffix in (".pt", ".safetensors"):
        f2d = comfy.node.F2DLoader.execute(msid_file="msid" + suffix, mapping_file="mapping" + suffix, device="cpu")[0]
        conds.append(_encode(comfy, sd1_clip, f2d, "f l", face_crops=crops))
    torch.testing.assert_close(conds[0], conds[1], rtol=0, atol=0)
