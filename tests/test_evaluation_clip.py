"""CLIP score through open_clip equals transformers' CLIPModel carrying the same random weights.

The reference is independent of our code: transformers' CLIP, loaded with the open_clip state dict converted
key by key below, scores the same pixels and token ids. A small custom open_clip config keeps it cheap; one
real-size ViT-B/32 (quickgelu, OpenAI layout) check runs on the text tower and a 224 px image as well.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from facebooth.pipelines.evaluation.clip_score import clip_score_from_cosine, load_clip_scorer, to_pil  # noqa: E402

TINY = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 24},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter random (not open_clip's init), layer-norm scales near 1 so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or k.endswith("attn_mask"):
            out[k] = v.clone()
        elif k.split(".")[-2].startswith("ln_") if "." in k else False:
            out[k] = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(v.shape, generator=g)
        elif k == "logit_scale":
            out[k] = torch.tensor(math.log(1 / 0.07))
        else:
            out[k] = 0.05 * torch.randn(v.shape, generator=g)
    return out


def to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip (OpenAI layout) state dict -> transformers CLIPModel state dict, key by key."""
    out: dict[str, torch.Tensor] = {}

    def tower(src: str, dst: str) -> None:
        layers = sorted({int(k.split(".")[2 if src == "" else 3]) for k in sd if k.startswith(f"{src}transformer.resblocks.")})
        for i in layers:
            a, b = f"{src}transformer.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            q, k_, v = sd[a + "attn.in_proj_weight"].chunk(3)
            qb, kb, vb = sd[a + "attn.in_proj_bias"].chunk(3)
            out.update({
                b + "self_attn.q_proj.weight": q, b + "self_attn.k_proj.weight": k_, b + "self_attn.v_proj.weight": v,
                b + "self_attn.q_proj.bias": qb, b + "self_attn.k_proj.bias": kb, b + "self_attn.v_proj.bias": vb,
                b + "self_attn.out_proj.weight": sd[a + "attn.out_proj.weight"], b + "self_attn.out_proj.bias": sd[a + "attn.out_proj.bias"],
                b + "layer_norm1.weight": sd[a + "ln_1.weight"], b + "layer_norm1.bias": sd[a + "ln_1.bias"],
                b + "layer_norm2.weight": sd[a + "ln_2.weight"], b + "layer_norm2.bias": sd[a + "ln_2.bias"],
                b + "mlp.fc1.weight": sd[a + "mlp.c_fc.weight"], b + "mlp.fc1.bias": sd[a + "mlp.c_fc.bias"],
                b + "mlp.fc2.weight": sd[a + "mlp.c_proj.weight"], b + "mlp.fc2.bias": sd[a + "mlp.c_proj.bias"],
            })

    tower("", "text_model")
    tower("visual.", "vision_model")
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["text_model.final_layer_norm.weight"] = sd["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = sd["ln_final.bias"]
    out["text_projection.weight"] = sd["text_projection"].t()
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["vision_model.pre_layrnorm.weight"] = sd["visual.ln_pre.weight"]
    out["vision_model.pre_layrnorm.bias"] = sd["visual.ln_pre.bias"]
    out["vision_model.post_layernorm.weight"] = sd["visual.ln_post.weight"]
    out["vision_model.post_layernorm.bias"] = sd["visual.ln_post.bias"]
    out["visual_projection.weight"] = sd["visual.proj"].t()
    out["logit_scale"] = sd["logit_scale"]
    return out


def _hf_model(cfg: dict) -> "transformers.CLIPModel":
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    config = transformers.CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_attention_heads=t["heads"],
                         num_hidden_layers=t["layers"], max_position_embeddings=t["context_length"],
                         vocab_size=t["vocab_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         eos_token_id=49407, bos_token_id=49406, pad_token_id=0),
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"],
                           num_attention_heads=v["width"] // v.get("head_width", 64), num_hidden_layers=v["layers"],
                           image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="quick_gelu",
                           layer_norm_eps=1e-5),
    )
    return transformers.CLIPModel(config).eval()


def _write_model(tmp_path, name: str, cfg: dict, seed: int):
    cfg_path = tmp_path / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model(name, pretrained=None)
    state = _random_state(model, seed)
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return cfg_path, weights, state


PROMPTS = ["a photo of a person on the beach", "a person with a sad expression", "a watercolor painting of a woman"]


def _images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, size + 16 * i, 3, generator=g) for i in range(n)]


def _reference_scores(hf, scorer, images, texts):
    """transformers' CLIP on the same pixels and token ids: cosine of its projected features."""
    pixels = scorer.pixels(images)
    tokens = scorer.tokenizer(texts)
    with torch.no_grad():
        # the towers' pooled outputs through the projections, spelled out (get_*_features changed type across versions)
        img = F.normalize(hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        txt = F.normalize(hf.text_projection(hf.text_model(input_ids=tokens).pooler_output), dim=-1)
    return (img * txt).sum(-1), img


def test_tiny_open_clip_score_equals_transformers_clip(tmp_path):
    cfg_path, weights, state = _write_model(tmp_path, "FaceBoothTinyCLIP", TINY, seed=0)
    scorer = load_clip_scorer("ignored-when-config-given", weights, config=cfg_path)
    hf = _hf_model(TINY)
    missing, unexpected = hf.load_state_dict(to_transformers(state), strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected

    images = _images(3, 40, seed=1)
    ours = scorer.text_scores(images, PROMPTS)
    ref, ref_img = _reference_scores(hf, scorer, images, PROMPTS)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    assert ours.std() > 1e-3  # random weights still separate the pairs, so equality is not trivial
    # CLIP-I and the Hessel CLIPScore form
    torch.testing.assert_close(scorer.encode_images(images), ref_img, atol=2e-5, rtol=0)
    torch.testing.assert_close(clip_score_from_cosine(ours, 2.5, 0.0), 2.5 * ref.clamp(min=0), atol=5e-5, rtol=0)


def test_quick_gelu_matters(tmp_path):
    """The same file under the plain-GELU architecture scores differently: the -quickgelu names are needed for
    OpenAI weights, and this test would notice if the activation were ignored."""
    cfg_path, weights, state = _write_model(tmp_path, "FaceBoothTinyCLIPq", TINY, seed=3)
    plain = dict(TINY, quick_gelu=False)
    plain_path = tmp_path / "FaceBoothTinyCLIPgelu.json"
    plain_path.write_text(json.dumps(plain))
    images = _images(2, 36, seed=4)
    a = load_clip_scorer("x", weights, config=cfg_path).text_scores(images, PROMPTS[:2])
    b = load_clip_scorer("x", weights, config=plain_path).text_scores(images, PROMPTS[:2])
    assert (a - b).abs().max() > 1e-4


def test_real_size_vit_b_32_text_and_image_match_transformers(tmp_path):
    """ViT-B-32-quickgelu at full size (the protocols' default model), random weights in a local file."""
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    state = _random_state(model, seed=5)
    weights = tmp_path / "vit_b_32.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    del model
    scorer = load_clip_scorer("ViT-B-32-quickgelu", weights)
    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    hf = _hf_model(cfg)
    hf.load_state_dict(to_transformers(state), strict=False)
    images = _images(2, 256, seed=6)
    ours = scorer.text_scores(images, PROMPTS[:2])
    ref, _ = _reference_scores(hf, scorer, images, PROMPTS[:2])
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=0)


def test_never_downloads_and_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit.safetensors is missing in folder"):
        load_clip_scorer("ViT-B-32-quickgelu", tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="local weight file"):
        load_clip_scorer("hf-hub:laion/CLIP-ViT-B-32", tmp_path / "x")
    with pytest.raises(ValueError, match="no architecture"):
        load_clip_scorer("ViT-Nope", tmp_path / "x")


def test_tensor_and_pil_inputs_give_the_same_score(tmp_path):
    cfg_path, weights, _ = _write_model(tmp_path, "FaceBoothTinyCLIPp", TINY, seed=7)
    scorer = load_clip_scorer("x", weights, config=cfg_path)
    img = _images(1, 48, seed=8)[0]
    a = scorer.text_scores([img], PROMPTS[:1])
    b = scorer.text_scores([to_pil(img)], PROMPTS[:1])
    torch.testing.assert_close(a, b)
