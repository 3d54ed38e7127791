"""MSID encoder: official key layout, exactness against timm's ViT with the same weights, preprocessing."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from facebooth.pipelines.face2diffusion.msid import (
    MSIDConfig,
    MSIDEncoder,
    encode_identity,
    msid_config_from_state_dict,
    preprocess_aligned,
)

timm_vit = pytest.importorskip("timm.models.vision_transformer")

TINY = MSIDConfig(img_size=32, patch_size=8, embed_dim=48, depth=5, num_heads=4, feature_blocks=(1, 2, 4))


def _randomize(model: MSIDEncoder) -> dict[str, torch.Tensor]:
    """Random weights everywhere, including BN running statistics, so nothing is an identity by accident."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.2
    model.load_state_dict(sd)
    return sd


def _timm_reference(cfg: MSIDConfig, sd: dict[str, torch.Tensor]):
    """timm ViT (independent implementation) + torch BN/LN heads, loaded from the same official-layout dict."""
    vit = timm_vit.VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=0,
    )
    vit.load_state_dict({k: v for k, v in sd.items() if not k.startswith("norms.")}, strict=True)
    heads = {}
    for i in cfg.feature_blocks:
        h = torch.nn.Sequential(torch.nn.BatchNorm1d(cfg.embed_dim), torch.nn.LayerNorm(cfg.embed_dim))
        h.load_state_dict({k[len(f"norms.layer_{i}.") :]: v for k, v in sd.items() if k.startswith(f"norms.layer_{i}.")})
        heads[i] = h.eval()
    return vit.eval(), heads


def test_official_layout_keys_and_sizes():
    model = MSIDEncoder()
    sd = model.state_dict()
    assert len(sd) == 178
    assert sum(p.numel() for p in model.parameters()) == 21_450_624
    assert model.feature_dim == 1536
    shapes = {
        "cls_token": (1, 1, 384),
        "pos_embed": (1, 197, 384),
        "patch_embed.proj.weight": (384, 3, 8, 8),
        "blocks.11.attn.qkv.weight": (1152, 384),
        "blocks.11.attn.qkv.bias": (1152,),
        "blocks.0.mlp.fc1.weight": (1536, 384),
        "blocks.0.mlp.fc2.weight": (384, 1536),
        "norm.weight": (384,),
        "norms.layer_2.0.running_mean": (384,),
        "norms.layer_11.1.weight": (384,),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert sorted({k.split(".")[1] for k in sd if k.startswith("norms.")}) == ["layer_11", "layer_2", "layer_5", "layer_8"]
    # Everything but the BN+LN heads is exactly timm's ViT key set (the official model subclasses it).
    vit = timm_vit.VisionTransformer(
        img_size=112, patch_size=8, embed_dim=384, depth=12, num_heads=12, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0,
    )
    assert set(vit.state_dict()) == {k for k in sd if not k.startswith("norms.")}
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == {
        k: tuple(v.shape) for k, v in sd.items() if not k.startswith("norms.")
    }


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_timm_vit_per_level(batch):
    model = MSIDEncoder(TINY).eval()
    sd = _randomize(model)
    vit, heads = _timm_reference(TINY, sd)
    x = torch.rand(batch, 3, TINY.img_size, TINY.img_size) * 2 - 1
    with torch.no_grad():
        ours = model.forward_levels(x)
        cls = vit.forward_intermediates(
            x, indices=list(TINY.feature_blocks), return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        ref = [heads[i](prefix[:, 0]) for i, (_, prefix) in zip(TINY.feature_blocks, cls)]
        full = model(x)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, torch.cat(ref, 1), atol=1e-5, rtol=1e-5)
    # the heads matter: raw CLS tokens are not what comes out
    assert not torch.allclose(ours[0], cls[0][1][:, 0], atol=1e-3)


def test_full_size_matches_timm():
    """Official shapes end to end (one image), still exact against timm."""
    model = MSIDEncoder().eval()
    sd = _randomize(model)
    cfg = model.config
    vit, heads = _timm_reference(cfg, sd)
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        inter = vit.forward_intermediates(x, indices=list(cfg.feature_blocks), return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
        ref = torch.cat([heads[i](p[:, 0]) for i, (_, p) in zip(cfg.feature_blocks, inter)], 1)
        out = model(x)
    assert out.shape == (1, 1536)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_config_from_state_dict_roundtrip():
    model = MSIDEncoder(TINY)
    cfg = msid_config_from_state_dict(model.state_dict(), num_heads=4)
    assert cfg == TINY
    official = msid_config_from_state_dict(MSIDEncoder().state_dict())
    assert official == MSIDConfig()


def test_preprocess_aligned_range_and_layout():
    crops = torch.rand(2, 112, 112, 3)
    crops[0, 0, 0] = torch.tensor([0.0, 0.5, 1.0])
    x = preprocess_aligned(crops)
    assert x.shape == (2, 3, 112, 112)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(x, crops.permute(0, 3, 1, 2) * 2 - 1)
    with pytest.raises(ValueError, match="112x112"):
        preprocess_aligned(torch.rand(1, 128, 128, 3))
    with pytest.raises(ValueError, match="aligned face crops"):
        preprocess_aligned(torch.rand(1, 112, 112))


def test_encode_identity_uses_running_stats_and_restores_mode():
    cfg = MSIDConfig(img_size=112, patch_size=16, embed_dim=32, depth=3, num_heads=2, feature_blocks=(0, 2))
    model = MSIDEncoder(cfg)
    _randomize(model)
    model.train()
    crops = torch.rand(1, 112, 112, 3)
    v = encode_identity(model, crops)  # batch 1 would fail in BN training mode
    assert v.shape == (1, 64) and model.training
    with torch.no_grad():
        ref = model.eval()(preprocess_aligned(crops))
    torch.testing.assert_close(v, ref)


def test_wrong_input_shape_message():
    model = MSIDEncoder(TINY)
    with pytest.raises(ValueError, match="preprocess_aligned"):
        model(torch.rand(1, 3, 40, 40))
