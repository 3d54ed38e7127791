"""PortraitBooth STEA and FastComposer loading without ComfyUI: official-layout state dicts (old key names, bf16/fp32
mix) load, and every computation matches an independent one (plain torch ops, transformers, diffusers)."""
from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from facebooth.devmodels import portraitbooth_models as pbm
from facebooth.pipelines.face.arcface import IResNet, IResNetConfig
from facebooth.pipelines.portraitbooth import fastcomposer_loading as fcl
from facebooth.pipelines.portraitbooth.stea import (
    STEAConfig,
    STEAError,
    STEAModel,
    SubjectFeatures,
    arcface_features,
    clip_image_input,
    fuse_subject_rows,
)
from facebooth.utils.files import load_state_dict_file
from helpers.fastcomposer_reference import reference_postfuse

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TINY_UNET = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TINY_VAE = dict(block_out_channels=[32, 64], norm_num_groups=8, layers_per_block=1, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu")


def _rand_(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0))
    return module.eval()


@pytest.fixture(scope="module")
def tiny_models():
    unet = _rand_(diffusers.UNet2DConditionModel(**TINY_UNET), 1)
    vae = _rand_(diffusers.AutoencoderKL(**TINY_VAE), 2)
    text = _rand_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), 3)
    vision = pbm.random_vision_encoder(4)
    post = pbm.random_postfuse(text_dim=32, feature_dim=768, seed=5).fuse
    return unet, vae, text, vision, post


@pytest.fixture(scope="module")
def fc_state(tiny_models):
    return pbm.fastcomposer_state_dict(*tiny_models)


# ------------------------------------------------------------------------------------------- the fuse MLP


def test_fuse_mlp_matches_plain_ops_from_official_keys(fc_state):
    post = {k[len("postfuse_module."):]: v for k, v in fc_state.items() if k.startswith("postfuse_module.")}
    assert set(post) == {f"{m}.{l}.{p}" for m in ("mlp1", "mlp2") for l in ("layernorm", "fc1", "fc2") for p in ("weight", "bias")} | {
        "layer_norm.weight", "layer_norm.bias"}
    parts = fcl.split_fastcomposer(fc_state)
    stea = fcl.stea_from_fastcomposer(parts)
    assert (stea.config.text_dim, stea.config.feature_dim, stea.config.hidden_dim) == (32, 768, 32)
    text, feat = torch.randn(3, 32), torch.randn(3, 768)
    torch.testing.assert_close(stea.fuse(text, feat), reference_postfuse(post, text, feat), rtol=1e-5, atol=1e-5)


def test_fuse_subject_rows_replaces_only_the_subject_rows():
    model = pbm.random_postfuse(text_dim=16, feature_dim=8, seed=0)
    cond = torch.randn(2, 10, 16)
    feats = torch.randn(2, 8)
    out = fuse_subject_rows(cond, [3, 7], feats, model.fuse)
    keep = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(out[:, keep], cond[:, keep])
    for row, k in ((3, 0), (7, 1)):
        torch.testing.assert_close(out[:, row], model.fuse(cond[:, row], feats[k].expand(2, -1)))
    feats.requires_grad_(True)
    fuse_subject_rows(cond, [3], feats[:1], model.fuse).sum().backward()
    assert feats.grad is not None and feats.grad[0].abs().sum() > 0
    with pytest.raises(STEAError, match="outside"):
        fuse_subject_rows(cond, [10], feats[:1], model.fuse)


def test_width_mismatches_say_what_to_use():
    model = pbm.random_postfuse(text_dim=16, feature_dim=8, seed=0)
    with pytest.raises(STEAError, match="SD1.x"):
        model.fuse(torch.randn(1, 1024), torch.randn(1, 8))
    with pytest.raises(STEAError, match="recognizer"):
        model.fuse(torch.randn(1, 16), torch.randn(1, 9))


# ------------------------------------------------------------------------------------------- identity features


def _tiny_arcface() -> IResNet:
    torch.manual_seed(0)
    net = IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(8, 16, 24, 32), stem_width=8, num_features=20))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_arcface_features_use_the_chosen_layers():
    net = _tiny_arcface()
    crops = torch.rand(2, 112, 112, 3)
    seen = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o)) for n in ("layer2", "layer4", "features")]  # first (reference) pass only
    with torch.no_grad():
        emb = net((crops.permute(0, 3, 1, 2) - 0.5) / 0.5)  # the backbone's own forward, as ArcFace runs it
        ours = arcface_features(net, crops, ("layer2", "embedding"))
    for h in hooks:
        h.remove()
    assert torch.allclose(emb, seen["features"])
    l2 = seen["layer2"].mean(dim=(2, 3))
    expect = torch.cat([F.normalize(l2, dim=-1) * math.sqrt(16), F.normalize(emb, dim=-1) * math.sqrt(20)], -1)
    torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-5)
    shallow = arcface_features(net, crops, ("layer4",))
    torch.testing.assert_close(shallow, F.normalize(seen["layer4"].mean(dim=(2, 3)), dim=-1) * math.sqrt(32))
    crops.requires_grad_(True)
    arcface_features(net, crops, ("layer1", "embedding")).sum().backward()
    assert crops.grad.abs().sum() > 0  # DIP backpropagates through it


def test_stea_model_feature_routing_and_errors():
    net = _tiny_arcface()
    cfg = STEAConfig(text_dim=16, feature_dim=24 + 20, hidden_dim=16, feature_source="arcface", arcface_layers=("layer3", "embedding"))
    model = STEAModel(cfg)
    crops = torch.rand(3, 112, 112, 3)
    subject = SubjectFeatures(arcface_crops=crops, embeddings=torch.randn(3, 20), name="anna")
    with torch.no_grad():
        got = model.features(subject, net)
        torch.testing.assert_close(got, arcface_features(net, crops, cfg.arcface_layers).mean(0))
    with pytest.raises(STEAError, match="PyTorch ArcFace backbone"):
        model.features(subject, None)
    deep = STEAModel(STEAConfig(text_dim=16, feature_dim=20, hidden_dim=16, feature_source="arcface", arcface_layers=("embedding",)))
    assert not deep.needs_backbone
    torch.testing.assert_close(deep.features(subject), (F.normalize(subject.embeddings, dim=-1) * math.sqrt(20)).mean(0))
    with pytest.raises(STEAError, match="subset"):
        STEAConfig(feature_source="arcface", arcface_layers=("layer9",))


def test_clip_image_input_is_fastcomposers_preprocessing():
    tv = pytest.importorskip("torchvision.transforms.v2")
    img = torch.rand(1, 90, 60, 3)  # portrait: padded left and right
    ref = tv.Compose([
        tv.Pad([15, 0, 15, 0], fill=0.0),
        tv.Resize((224, 224), interpolation=tv.InterpolationMode.BILINEAR, antialias=True),
        tv.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    ])(img.permute(0, 3, 1, 2))
    torch.testing.assert_close(clip_image_input(img), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- FastComposer checkpoint


def test_official_layout_has_the_quirks_we_handle(fc_state):
    assert "text_encoder.embeddings.position_ids" in fc_state and fc_state["text_encoder.embeddings.position_ids"].dtype == torch.int64
    assert not any(k.startswith("text_encoder.text_model.") for k in fc_state)
    assert "vae.encoder.mid_block.attentions.0.query.weight" in fc_state
    assert "image_encoder.vision_model.embeddings.position_ids" in fc_state
    dtypes = {v.dtype for v in fc_state.values()}
    assert {torch.bfloat16, torch.float32} <= dtypes
    assert fc_state["unet.conv_in.weight"].dtype == torch.float32
    assert fc_state["vae.decoder.conv_in.weight"].dtype == torch.bfloat16


def test_image_encoder_and_stea_match_transformers_and_plain_ops(fc_state, tiny_models, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(fc_state, path)
    parts, stea = fcl.load_fastcomposer(path)
    # independent image encoder: transformers built from the file's own tensors (bf16 parts upcast)
    vision_sd = {k[len("image_encoder."):]: v.float() for k, v in fc_state.items()
                 if k.startswith("image_encoder.") and not k.endswith("position_ids")}
    ref_vision = transformers.CLIPVisionModelWithProjection(tiny_models[3].config).eval()
    ref_vision.load_state_dict(vision_sd, strict=False)
    faces = torch.rand(2, 100, 100, 3)
    with torch.no_grad():
        got = stea.features(SubjectFeatures(clip_images=faces))
        pixels = clip_image_input(faces)
        ref_emb = ref_vision(pixel_values=pixels).image_embeds.mean(0)
    torch.testing.assert_close(got, ref_emb, rtol=1e-5, atol=1e-5)
    post = {k[len("postfuse_module."):]: v for k, v in fc_state.items() if k.startswith("postfuse_module.")}
    cond = torch.randn(1, 77, 32)
    with torch.no_grad():
        out = fuse_subject_rows(cond, [5], got[None], stea.fuse)
    torch.testing.assert_close(out[0, 5], reference_postfuse(post, cond[0, 5], ref_emb), rtol=1e-5, atol=1e-5)


def test_unet_conversion_round_trips_through_diffusers_own_ldm_converter(tiny_models):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_models[0]
    sd = unet.state_dict()
    ldm = fcl.unet_diffusers_to_ldm(sd)
    assert "input_blocks.0.0.weight" in ldm and "out.2.weight" in ldm and "middle_block.1.proj_in.weight" in ldm
    back = convert_ldm_unet_checkpoint({fcl.LDM_UNET + k: v for k, v in ldm.items()}, dict(unet.config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_unet_conversion_of_a_full_sd15_layout_matches_diffusers():
    """SD1.5's real block structure (4 levels, 2 resnets, no attention on the last level), keys only."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        )
    sd = unet.state_dict()
    ldm = fcl.unet_diffusers_to_ldm(sd)
    assert "output_blocks.2.1.conv.weight" in ldm  # up level 0 has no transformer: upsampler at .1
    assert "output_blocks.5.2.conv.weight" in ldm  # up level 1 has one: upsampler at .2
    assert "input_blocks.11.0.in_layers.0.weight" in ldm and "input_blocks.9.0.op.weight" in ldm
    back = convert_ldm_unet_checkpoint({fcl.LDM_UNET + k: v for k, v in ldm.items()}, dict(unet.config))
    assert set(back) == set(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)


def test_vae_with_old_attention_names_converts_like_diffusers(tiny_models, fc_state):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = tiny_models[1]
    old = {k[len("vae."):]: v for k, v in fc_state.items() if k.startswith("vae.")}
    ldm = fcl.vae_diffusers_to_ldm(old)
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.0.block.0.conv1.weight" in ldm
    back = convert_ldm_vae_checkpoint({fcl.LDM_VAE + k: v for k, v in ldm.items()}, dict(vae.config))
    new = vae.state_dict()
    assert set(back) == set(new)
    for k, v in new.items():
        torch.testing.assert_close(back[k].float().reshape(v.shape), v.to(torch.bfloat16).float())
    # the new (>= 0.17) names give the same LDM keys
    assert set(fcl.vae_diffusers_to_ldm(new)) == set(ldm)


def test_text_encoder_keys_gain_text_model_and_lose_position_ids(fc_state, tiny_models):
    parts = fcl.split_fastcomposer(fc_state)
    hf = fcl.text_encoder_to_hf(parts.text_encoder)
    assert all(k.startswith("text_model.") for k in hf) and not any(k.endswith("position_ids") for k in hf)
    ref = transformers.CLIPTextModel(tiny_models[2].config).eval()
    missing, unexpected = ref.load_state_dict({k.removeprefix("text_model."): v.float() for k, v in hf.items()}, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("position_ids")]
    ldm = fcl.fastcomposer_to_ldm_checkpoint(parts)
    assert {k.split(".")[0] for k in ldm} == {"model", "first_stage_model", "cond_stage_model"}
    assert fcl.LDM_CLIP + "embeddings.token_embedding.weight" in ldm


def test_bad_files_are_refused_with_a_message(tmp_path, fc_state):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.bin"
    with open(bad, "wb") as f:
        pickle.dump({"unet.x": Evil()}, f)
    with pytest.raises(fcl.FastComposerWeightsError, match="weights-only"):
        fcl.read_weights(bad)
    trunc = tmp_path / "trunc.bin"
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1000)}, buf)
    trunc.write_bytes(buf.getvalue()[:500])
    with pytest.raises(fcl.FastComposerWeightsError, match="truncated"):
        fcl.read_weights(trunc)
    with pytest.raises(fcl.FastComposerWeightsError, match="not a FastComposer checkpoint"):
        fcl.split_fastcomposer({"unet.conv_in.weight": torch.zeros(1)}, "x.bin")
    broken = dict(fc_state)
    broken["postfuse_module.mlp1.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises((fcl.FastComposerWeightsError, STEAError)):
        fcl.stea_from_fastcomposer(fcl.split_fastcomposer(broken))


def test_our_stea_file_round_trips_and_loads_fastcomposer_too(tmp_path, fc_state):
    path = pbm.write_random_stea(tmp_path / "stea.safetensors", layers=("layer3", "embedding"), arcface_widths=(8, 16, 24, 32),
                                 num_features=20)
    sd, meta = load_state_dict_file(path)
    assert meta["method"] == "portraitbooth" and meta["component"] == "stea" and all(k.startswith("stea.") for k in sd)
    model = fcl.load_stea(path)
    assert model.config.feature_source == "arcface" and model.config.arcface_layers == ("layer3", "embedding")
    assert model.config.feature_dim == 24 + 20 and model.image_encoder is None
    x, f = torch.randn(2, 768), torch.randn(2, 44)
    ref = {k[len("stea."):]: v for k, v in sd.items()}
    torch.testing.assert_close(model.fuse(x, f), reference_postfuse(ref, x, f), rtol=1e-5, atol=1e-5)
    bin_path = tmp_path / "fc.bin"
    torch.save(fc_state, bin_path)
    assert fcl.load_stea(bin_path).config.feature_source == "clip_image"
    meta["config"] = meta["config"].replace('"feature_dim": 44', '"feature_dim": 45')
    with pytest.raises(fcl.FastComposerWeightsError, match="damaged"):
        fcl.stea_from_state_dict(sd, meta)
