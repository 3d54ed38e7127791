"""InstantBooth pipeline (no ComfyUI): adapter math against independent implementations, the host callable,
diffusers hooks, layout mapping, prompt/concept injection, reference preprocessing, files, dev models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from facebooth.devmodels.instantbooth_models import (
    TINY_CLIP_VISION,
    VIT_L14_224,
    clip_vision_shapes,
    random_clip_vision_state_dict,
    random_instantbooth_model,
    tiny_checkpoint_layout,
    write_random_instantbooth,
)
from facebooth.pipelines.face.types import Face, FaceSet
from facebooth.pipelines.instantbooth import (
    SD15_LAYOUT,
    AdapterPatch,
    AugmentConfig,
    DiffusersAdapterHooks,
    GatedSelfAttentionAdapter,
    IdentifierError,
    InstantBoothConfig,
    InstantBoothFileError,
    InstantBoothModel,
    LayoutError,
    ReferenceError,
    augment_reference,
    check_coverage,
    clip_preprocess,
    comfy_block_map,
    diffusers_layout,
    diffusers_to_ldm,
    identifier_rows,
    inject_concept,
    insert_identifier,
    load_instantbooth,
    masked_object_crop,
    parse_ldm_path,
    references_from_faces,
    references_from_images,
    save_instantbooth,
    sd_unet_layout,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _randomize(module: torch.nn.Module, seed: int = 0, gamma: float = 0.8) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim else 1.0))
            if name.endswith("gamma"):
                p.fill_(gamma)


def _reference_gated_attention(adapter: GatedSelfAttentionAdapter, y, f_p, beta):
    """Eq. 3 written out: project, concatenate, LayerNorm by hand, per-head softmax(QK^T / sqrt(d)) V, keep y rows."""
    w = {k: v.double() for k, v in adapter.state_dict().items()}
    y, f_p = y.double(), f_p.double()
    b, t, c = y.shape
    h = adapter.attn.num_heads
    p = f_p @ w["linear.weight"].T + w["linear.bias"]
    p = p.expand(b, -1, -1) if p.shape[0] == 1 else p
    z = torch.cat([y, p], dim=1)
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    z = (z - mu) / torch.sqrt(var + adapter.norm1.eps) * w["norm1.weight"] + w["norm1.bias"]
    q, k, v = (z @ w[f"attn.to_{n}.weight"].T for n in "qkv")
    out = torch.zeros_like(z)
    d = c // h
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., sl] = att @ v[..., sl]
    s = out @ w["attn.to_out.0.weight"].T + w["attn.to_out.0.bias"]
    return y + beta * torch.tanh(w["gamma"]) * s[:, :t]


# --- adapter math ---------------------------------------------------------------------------------------------


def test_adapter_equals_diffusers_gligen_gated_self_attention_without_ff():
    """GLIGEN's gated self-attention (diffusers) with its feed-forward gate closed is eq. 3 with beta = 1."""
    from diffusers.models.attention import GatedSelfAttentionDense

    ours = GatedSelfAttentionAdapter(64, 48, num_heads=4)
    _randomize(ours, gamma=0.7)
    ref = GatedSelfAttentionDense(query_dim=64, context_dim=48, n_heads=4, d_head=16)
    sd = {k.replace("gamma", "alpha_attn"): v for k, v in ours.state_dict().items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("ff.", "norm2.", "alpha_dense")) for k in missing)
    assert float(ref.alpha_dense.detach()) == 0.0  # tanh(0): no feed-forward contribution
    y, f_p = torch.randn(2, 36, 64), torch.randn(2, 10, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(y, f_p, beta=1.0), ref(y, f_p), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
def test_adapter_equals_explicit_gated_attention_for_any_number_of_references(n_refs):
    adapter = GatedSelfAttentionAdapter(32, 24, num_heads=4)
    _randomize(adapter, seed=n_refs, gamma=-0.4)
    y = torch.randn(3, 16, 32)
    f_p = torch.randn(n_refs, 5, 24).reshape(1, n_refs * 5, 24)  # references concatenated, shared by the batch
    with torch.no_grad():
        got = adapter(y, f_p, beta=0.3)
    torch.testing.assert_close(got.double(), _reference_gated_attention(adapter, y, f_p, 0.3), atol=1e-5, rtol=1e-5)
    per_sample = torch.randn(3, n_refs * 5, 24)  # training: each sample its own references
    with torch.no_grad():
        got = adapter(y, per_sample, beta=1.0)
    torch.testing.assert_close(got.double(), _reference_gated_attention(adapter, y, per_sample, 1.0), atol=1e-5, rtol=1e-5)


def test_fresh_adapter_and_beta_zero_leave_tokens_unchanged_and_gradients_reach_gamma():
    adapter = GatedSelfAttentionAdapter(32, 24, num_heads=4)
    y, f_p = torch.randn(2, 9, 32), torch.randn(1, 7, 24)
    assert float(adapter.gamma.detach()) == 0.0
    assert torch.equal(adapter(y, f_p), y)  # gamma initialised to 0: the UNet is untouched at the start
    _randomize(adapter, gamma=0.5)
    assert torch.equal(adapter(y, f_p, beta=0.0), y)
    assert not torch.allclose(adapter(y, f_p, beta=0.3), y)
    fresh = GatedSelfAttentionAdapter(32, 24, num_heads=4)
    fresh(y, f_p).sum().backward()
    assert fresh.gamma.grad is not None and fresh.gamma.grad.abs() > 0  # the gate can open from 0


def test_encoders_average_concepts_and_concatenate_patches():
    model = random_instantbooth_model({"input_blocks.1.1.transformer_blocks.0": 32}, clip_config=TINY_CLIP_VISION, text_dim=16, patch_dim=8)
    embeds, hidden = torch.randn(3, 24), torch.randn(3, 257, 32)
    fc = model.concept_encoder.fc
    expected = torch.stack([fc(e) for e in embeds]).mean(0) * 0.4
    torch.testing.assert_close(model.concept(embeds, alpha=0.4), expected)
    tokens = model.patch_tokens(hidden)
    assert tokens.shape == (3 * 257, 8)
    torch.testing.assert_close(tokens[257:514], model.patch_encoder.fc(hidden[1]))
    with pytest.raises(ValueError, match="N >= 1"):
        model.concept(torch.zeros(0, 24))


# --- the host callable (ComfyUI middle_patch signature) -------------------------------------------------------


def _small_model(gate=0.6):
    layout = {"input_blocks.1.1.transformer_blocks.0": 32, "middle_block.1.transformer_blocks.0": 64}
    cfg = InstantBoothConfig(clip_hidden_dim=32, clip_global_dim=24, text_dim=16, patch_dim=8, num_heads=4, adapters=layout)
    model = InstantBoothModel(cfg)
    _randomize(model, gamma=math.atanh(gate))
    return model.eval()


def test_patch_callable_applies_the_right_adapter_once_prepared():
    model = _small_model()
    f_p = torch.randn(2 * 257, 8)
    patch = AdapterPatch(model, f_p, comfy_block_map(model.config.adapters), beta=0.3)
    x = torch.randn(4, 64, 64)
    opts = {"block": ("middle", 0), "block_index": 0, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0, 5.0])}
    with torch.no_grad():
        got = patch(x, opts)
        expected = model.adapter("middle_block.1.transformer_blocks.0")(x, f_p[None], beta=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    prepared = dict(patch._prepared)
    assert len(prepared) == 1
    patch(x, opts)
    assert all(patch._prepared[k] is v for k, v in prepared.items())  # patch-token projection computed once
    # a block without an adapter and a non-transformer call pass through
    assert patch(x, {**opts, "block": ("output", 7)}) is x
    assert patch(x, {}) is x


def test_patch_cond_only_range_and_attention_mask():
    model = _small_model()
    f_p = torch.randn(257, 8)
    paths = comfy_block_map(model.config.adapters)
    x = torch.randn(4, 16, 32)  # chunks [cond, uncond], 2 latents each, a 4x4 token grid
    opts = {"block": ("input", 1), "block_index": 0, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0]),
            "activations_shape": [4, 32, 4, 4]}
    both = AdapterPatch(model, f_p, paths, beta=0.5)(x, opts)
    cond = AdapterPatch(model, f_p, paths, beta=0.5, apply_to="cond only")(x, opts)
    torch.testing.assert_close(cond[:2], both[:2])
    assert torch.equal(cond[2:], x[2:])
    # start/end by sigma: active while sigma_end <= sigma <= sigma_start
    ranged = AdapterPatch(model, f_p, paths, beta=0.5, sigma_range=(2.0, 0.5))
    assert torch.equal(ranged(x, opts), x)
    torch.testing.assert_close(ranged(x, {**opts, "sigmas": torch.tensor([1.0])}), both)
    # attention mask: left half on, right half off (at the block's 4x4 grid)
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    masked = AdapterPatch(model, f_p, paths, beta=0.5, attn_mask=mask)(x, opts)
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[:, :2] = True
    on = grid.flatten()
    torch.testing.assert_close(masked[:, on], both[:, on])
    assert torch.equal(masked[:, ~on], x[:, ~on])
    assert torch.equal(AdapterPatch(model, f_p, paths, beta=0.0)(x, opts), x)


# --- layout ---------------------------------------------------------------------------------------------------


def _meta_unet(**kwargs):
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**kwargs)


def test_layout_matches_diffusers_module_names_for_sd15_and_the_test_checkpoint():
    from facebooth.devmodels.sd15_checkpoint import TinySD15Config, unet_diffusers_config

    # SD1.5 itself is checked against ComfyUI's own diffusers<->LDM key map in test_instantbooth_comfy.py
    assert len(SD15_LAYOUT) == 16 and sorted(set(SD15_LAYOUT.values())) == [320, 640, 1280]
    assert diffusers_layout(_meta_unet(**unet_diffusers_config(TinySD15Config()))) == tiny_checkpoint_layout()
    assert sorted(set(tiny_checkpoint_layout().values())) == [320, 640]
    # uneven res blocks per level
    uneven = _meta_unet(block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1), cross_attention_dim=16,
                        norm_num_groups=8, attention_head_dim=8,
                        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
    assert diffusers_layout(uneven) == sd_unet_layout(32, (1, 2, 2), (1, 2, 1), (True, True, True))


def test_layout_names_and_coverage_errors():
    assert parse_ldm_path("output_blocks.11.1.transformer_blocks.0") == (("output", 11, 0), 1)
    assert parse_ldm_path("middle_block.1.transformer_blocks.2") == (("middle", 0, 2), 1)
    assert diffusers_to_ldm("up_blocks.1.attentions.2.transformer_blocks.0", 2, 4) == "output_blocks.5.1.transformer_blocks.0"
    with pytest.raises(LayoutError, match="not a UNet transformer-block path"):
        parse_ldm_path("input_blocks.1.0.in_layers")
    with pytest.raises(LayoutError, match="trained for a different UNet"):
        check_coverage(tiny_checkpoint_layout(), SD15_LAYOUT)
    wrong = dict(SD15_LAYOUT, **{"middle_block.1.transformer_blocks.0": 1024})
    with pytest.raises(LayoutError, match="1024 wide"):
        check_coverage(wrong, SD15_LAYOUT)
    assert check_coverage({**SD15_LAYOUT, "input_blocks.99.1.transformer_blocks.0": 320}, SD15_LAYOUT) == [
        "input_blocks.99.1.transformer_blocks.0"]


# --- diffusers hooks (training) -------------------------------------------------------------------------------


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    return unet


def _model_for(unet, gate):
    cfg = InstantBoothConfig(clip_hidden_dim=32, clip_global_dim=24, text_dim=16, patch_dim=8, num_heads=4, adapters=diffusers_layout(unet))
    model = InstantBoothModel(cfg)
    _randomize(model, gamma=math.atanh(gate) if gate else 0.0)
    return model


def test_diffusers_hook_gives_eq3_inside_a_transformer_block():
    """One diffusers BasicTransformerBlock with the hooks equals the block computed step by step with eq. 3 in between."""
    unet = _tiny_unet()
    model = _model_for(unet, gate=0.5)
    name = "down_blocks.1.attentions.0.transformer_blocks.0"
    block = unet.get_submodule(name)
    adapter = model.adapter(diffusers_to_ldm(name, 1, 2))
    h, ctx, f_p = torch.randn(2, 16, 64), torch.randn(2, 5, 16), torch.randn(2, 11, 8)
    hooks = DiffusersAdapterHooks(unet, model, beta=0.7)
    hooks.set_patch_tokens(f_p)
    with torch.no_grad():
        got = block(h, encoder_hidden_states=ctx)
        hooks.remove()
        y = h + block.attn1(block.norm1(h))
        y = adapter(y, f_p, beta=0.7)
        y = y + block.attn2(block.norm2(y), encoder_hidden_states=ctx)
        expected = y + block.ff(block.norm3(y))
        plain = block(h, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_diffusers_hooks_closed_gates_or_beta_zero_reproduce_the_unet_and_train():
    unet = _tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = unet(x, t, ctx).sample
    fresh = _model_for(unet, gate=0.0)
    hooks = DiffusersAdapterHooks(unet, fresh)
    hooks.set_patch_tokens(torch.randn(2, 7, 8))
    out = unet(x, t, ctx).sample
    assert torch.equal(out, plain)  # gamma = 0 at init: the pretrained UNet is reproduced
    out.pow(2).mean().backward()
    assert all(a.gamma.grad is not None and a.gamma.grad.abs() > 0 for _, a in fresh.adapter_items())
    hooks.remove()
    opened = _model_for(unet, gate=0.5)
    hooks = DiffusersAdapterHooks(unet, opened, beta=0.0)
    hooks.set_patch_tokens(torch.randn(1, 7, 8))
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, plain)
        hooks.beta = 1.0
        assert not torch.allclose(unet(x, t, ctx).sample, plain, atol=1e-4)
        hooks.remove()
        assert torch.equal(unet(x, t, ctx).sample, plain)  # removed cleanly


# --- prompt and concept token ----------------------------------------------------------------------------------


def test_identifier_goes_before_the_class_noun():
    assert insert_identifier("A photo of a person playing guitar") == "A photo of a sks person playing guitar"
    assert insert_identifier("a Woman in the kitchen, a person") == "a sks Woman in the kitchen, a person"
    assert insert_identifier("photo of sks man") == "photo of sks man"
    assert insert_identifier("a photo of a cat", "V", ("cat", "kitten")) == "a photo of a V cat"
    assert insert_identifier("a boyish grin on a man") == "a boyish grin on a sks man"  # whole words only
    with pytest.raises(IdentifierError, match="Write it like 'a photo of sks person"):
        insert_identifier("a bowl of fruit")


def test_concept_replaces_the_identifier_rows_and_keeps_gradients():
    chunks = [[49406, 320, 48136, 2533] + [49407] * 73, [49406, 48136, 49407] + [49407] * 74]
    rows = identifier_rows(chunks, 48136)
    assert rows == [2, 78]
    with pytest.raises(IdentifierError):
        identifier_rows([[49406, 320, 49407]], 48136)
    assert identifier_rows([[49406, torch.zeros(4), 48136]], 48136) == [2]  # embedding tensors in slots are skipped
    cond = torch.randn(2, 154, 16)
    concept = torch.randn(16, requires_grad=True)
    out = inject_concept(cond, rows, concept)
    keep = [i for i in range(154) if i not in rows]
    assert torch.equal(out[:, keep], cond[:, keep])
    assert torch.equal(out[0, 2], concept.detach()) and torch.equal(out[1, 78], concept.detach())
    out.sum().backward()
    assert torch.equal(concept.grad, torch.full((16,), 4.0))
    per_sample = inject_concept(cond, [2], torch.stack([torch.ones(16), 2 * torch.ones(16)]))
    assert per_sample[0, 2, 0] == 1 and per_sample[1, 2, 0] == 2
    with pytest.raises(ValueError, match="trained for another text encoder"):
        inject_concept(cond, rows, torch.zeros(8))


# --- references ------------------------------------------------------------------------------------------------


def _photo_with_object():
    img = torch.full((60, 80, 3), 0.8)
    img[10:30, 40:60] = torch.tensor([0.9, 0.2, 0.1])  # the object, 20x20
    mask = torch.zeros(60, 80)
    mask[10:30, 40:60] = 1
    return img, mask


def test_masked_object_crop_centres_the_object_on_black():
    img, mask = _photo_with_object()
    crop, cmask = masked_object_crop(img, mask, size=48, margin=0.1)
    assert crop.shape == (48, 48, 3)
    # 20 px object + 10% margin per side = 24 px square -> the object spans 40 of 48 px, centred
    inner = crop[8:40, 8:40]
    torch.testing.assert_close(inner.mean((0, 1)), torch.tensor([0.9, 0.2, 0.1]), atol=0.02, rtol=0)
    assert crop[:3].abs().max() == 0 and crop[:, -3:].abs().max() == 0  # background masked out
    assert cmask[24, 24] == 1 and cmask[1, 1] == 0
    # object at the border: the square leaves the image, the outside is black too
    edge = torch.zeros(60, 80)
    edge[0:10, 75:80] = 1  # 12 px square from x = 71, y = -1: 3 columns right of the image, 1 row above it
    crop2, _ = masked_object_crop(img, edge, size=32)
    assert crop2.shape == (32, 32, 3) and crop2[:, -5:].abs().max() == 0 and crop2[0].abs().max() == 0
    assert crop2[16, 16].min() > 0.05
    # no mask: the centred square of the whole image
    full, fm = masked_object_crop(img, None, size=30)
    assert fm.min() == 1 and full.shape == (30, 30, 3)
    with pytest.raises(ReferenceError, match="mask is empty"):
        masked_object_crop(img, torch.zeros(60, 80))
    batch = references_from_images(torch.stack([img, img]), mask[None], size=24)
    assert batch.shape == (2, 24, 24, 3)
    with pytest.raises(ReferenceError, match="3 masks for 2"):
        references_from_images(torch.stack([img, img]), torch.ones(3, 60, 80))


def test_face_references_are_aligned_crops_with_the_face_mask():
    from facebooth.pipelines.face.align import template_for

    img = torch.rand(150, 150, 3) * 0.5 + 0.5
    landmarks = (template_for(112) + 19).float()  # a face placed at (19, 19)
    mask = torch.zeros(150, 150)
    mask[30:120, 30:120] = 1
    face = Face(image_index=0, box=(19.0, 19.0, 131.0, 131.0), score=1.0, landmarks=landmarks, mask=mask)
    faces = FaceSet(images=img[None], faces=[face, face], missing=[])
    refs = references_from_faces(faces, size=224)
    assert refs.shape == (2, 224, 224, 3)
    # the 112 px face frame scaled to the 224 crop: the masked square [30, 120) -> [22, 202) in the crop
    assert refs[0, 5, 5].abs().max() == 0 and refs[0, 215, 215].abs().max() == 0
    assert refs[0, 112, 112].min() > 0.4
    with pytest.raises(ReferenceError, match="no faces"):
        references_from_faces(FaceSet(images=img[None], faces=[], missing=[0]))


def test_clip_preprocess_resizes_short_side_crops_quantises_and_normalises():
    img = torch.rand(1, 300, 400, 3)
    x = clip_preprocess(img, 224)
    assert x.shape == (1, 3, 224, 224)
    flat = torch.full((1, 50, 70, 3), 0.601)  # 153.26 -> level 153
    got = clip_preprocess(flat, 224)
    expected = (torch.tensor(153 / 255.0) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(got[0, :, 100, 100], expected, atol=1e-6, rtol=0)


def test_augmentation_is_heavy_seeded_and_keeps_the_background_black():
    img, mask = _photo_with_object()
    crop, cmask = masked_object_crop(img, mask, size=64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = augment_reference(crop, cmask, g1), augment_reference(crop, cmask, g2)
    assert torch.equal(a, b)
    outs = [augment_reference(crop, cmask, g1) for _ in range(6)]
    assert all(not torch.allclose(o, crop, atol=0.05) for o in outs)
    assert all(o.min() >= 0 and o.max() <= 1 for o in outs)
    calm = AugmentConfig(flip_p=0, rotate_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0, saturation=0,
                         hue=0, grayscale_p=0, blur_p=0)
    torch.testing.assert_close(augment_reference(crop, cmask, g1, calm), crop, atol=1e-4, rtol=0)
    corner = augment_reference(crop, cmask, torch.Generator().manual_seed(0))
    assert corner[0, 0].abs().max() == 0 and corner[-1, -1].abs().max() == 0



def _smooth_masked_crop(size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.5 + 0.3 * torch.sin(3 * xx + 1), 0.4 + 0.3 * torch.cos(2 * yy), 0.3 + 0.4 * xx * yy], dim=-1)
    mask = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.16).float()
    return img * mask[..., None], mask


def test_augmentation_matches_opencv_colorsys_and_scipy_for_given_draws():
    """apply_augment against independent code: OpenCV's warpAffine for the geometry, colorsys and the written-out
    brightness / contrast / saturation formulas for the colour, ITU-R 601 grey and scipy's Gaussian filter."""
    import colorsys

    import numpy as np

    cv2 = pytest.importorskip("cv2")
    ndimage = pytest.importorskip("scipy.ndimage")
    from facebooth.pipelines.instantbooth.references import AugmentParams, apply_augment, draw_augment_params

    img, mask = _smooth_masked_crop()
    s = img.shape[0]
    calm = dict(flip=False, angle_deg=0.0, scale=1.0, translate=(0.0, 0.0), brightness=1.0, contrast=1.0,
                saturation=1.0, hue=0.0, grayscale=False, blur_sigma=None)

    # geometry: flip, then rotate 17 deg clockwise and scale 0.85 about the centre, then shift
    p = AugmentParams(**{**calm, "flip": True, "angle_deg": 17.0, "scale": 0.85, "translate": (0.06, -0.04)})
    got = apply_augment(img, mask, p).numpy()
    rgbm = np.concatenate([img.numpy(), mask[..., None].numpy()], axis=-1)[:, ::-1].copy()
    mat = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), -17.0, 0.85)  # OpenCV: positive is counter-clockwise
    mat[:, 2] += (0.06 * s, -0.04 * s)
    warped = cv2.warpAffine(rgbm, mat, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside, outside = warped[..., 3] > 0.98, warped[..., 3] == 0
    assert inside.sum() > 300 and outside.sum() > 300
    np.testing.assert_allclose(got[inside], warped[..., :3][inside], atol=1e-3, rtol=0)
    assert np.abs(got[outside]).max() == 0

    # colour, in this order: brightness, contrast about the object's mean, saturation, hue
    p = AugmentParams(**{**calm, "brightness": 1.2, "contrast": 0.8, "saturation": 1.3, "hue": 0.07})
    got = apply_augment(img, mask, p).numpy()
    m = mask.numpy()[..., None]
    x = np.clip(img.numpy() * 1.2, 0, 1)
    mean = (x * m).sum() / (3 * m.sum())
    x = np.clip((x - mean) * 0.8 + mean, 0, 1)
    grey = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    x = np.clip((x - grey) * 1.3 + grey, 0, 1)
    hsv = [colorsys.rgb_to_hsv(*px) for px in x.reshape(-1, 3)]
    x = np.array([colorsys.hsv_to_rgb((h + 0.07) % 1.0, sat, v) for h, sat, v in hsv]).reshape(x.shape) * (m > 0.02)
    np.testing.assert_allclose(got, x, atol=2e-3, rtol=0)

    # grey, then a Gaussian blur of radius ceil(2 sigma) with a mirrored border
    p = AugmentParams(**{**calm, "grayscale": True, "blur_sigma": 0.9})
    got = apply_augment(img, mask, p).numpy()
    grey = img.numpy() @ np.array([0.299, 0.587, 0.114])
    blurred = ndimage.gaussian_filter(grey, sigma=0.9, mode="mirror", truncate=2 / 0.9)
    np.testing.assert_allclose(got, np.repeat(blurred[..., None], 3, -1) * (m > 0.02), atol=2e-3, rtol=0)

    # the draws come from the generator alone, inside the configured ranges
    cfg = AugmentConfig()
    draws = [draw_augment_params(torch.Generator().manual_seed(k), cfg) for k in range(200)]
    assert draws[0] == draw_augment_params(torch.Generator().manual_seed(0), cfg)
    assert all(abs(d.angle_deg) <= cfg.rotate_deg and cfg.scale[0] <= d.scale <= cfg.scale[1] for d in draws)
    assert 0.3 < np.mean([d.flip for d in draws]) < 0.7 and 0.1 < np.mean([d.blur_sigma is not None for d in draws]) < 0.3


# --- files and dev models ------------------------------------------------------------------------------------


def test_file_round_trip_metadata_and_errors(tmp_path):
    layout = {"input_blocks.1.1.transformer_blocks.0": 64, "middle_block.1.transformer_blocks.0": 128}
    model = random_instantbooth_model(layout, clip_config=TINY_CLIP_VISION, seed=2, patch_dim=32)
    path = tmp_path / "ib.safetensors"
    save_instantbooth(model, path, {"trained_steps": 12})
    loaded = load_instantbooth(path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["method"] == "instantbooth" and meta["format_version"] == "1" and meta["trained_steps"] == "12"
    assert json.loads(meta["config"])["adapters"] == layout
    assert "adapters.middle_block.1.transformer_blocks.0.attn.to_out.0.bias" in keys
    assert "adapters.input_blocks.1.1.transformer_blocks.0.gamma" in keys
    # fp16 files load into fp32 models; a file without metadata is read from its shapes
    from safetensors.torch import save_file

    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in a.items()}, str(half))
    assert load_instantbooth(half).config.adapters == model.config.adapters
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InstantBoothFileError, match="not an InstantBooth weight file"):
        load_instantbooth(tmp_path / "other.safetensors")
    bad = {k: v for k, v in a.items() if not k.endswith("norm1.bias")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InstantBoothFileError, match="missing"):
        load_instantbooth(tmp_path / "bad.safetensors")


def test_random_instantbooth_file_is_cached_by_fingerprint(tmp_path):
    layout = {"input_blocks.1.1.transformer_blocks.0": 64}
    path = write_random_instantbooth(tmp_path / "r.safetensors", layout=layout, clip_config=TINY_CLIP_VISION)
    mtime = path.stat().st_mtime_ns
    assert write_random_instantbooth(path, layout=layout, clip_config=TINY_CLIP_VISION).stat().st_mtime_ns == mtime
    model = load_instantbooth(path)
    assert all(abs(g - 0.5) < 1e-3 for g in model.gates().values())  # gates open: a demo run exercises them
    write_random_instantbooth(path, seed=1, layout=layout, clip_config=TINY_CLIP_VISION)
    assert not torch.equal(load_instantbooth(path).patch_encoder.fc.weight, model.patch_encoder.fc.weight)


def test_random_clip_vision_is_the_transformers_layout_comfyui_reads():
    """ComfyUI's clip_vision format is the transformers CLIPVisionModelWithProjection state dict."""
    def hf(cfg):
        return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))

    with torch.device("meta"):
        big = hf(VIT_L14_224)
    expected = {k: tuple(v.shape) for k, v in big.state_dict().items() if not k.endswith("position_ids")}
    assert clip_vision_shapes(VIT_L14_224) == expected
    assert expected["vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    tiny = hf(TINY_CLIP_VISION).eval()
    sd = random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0)
    missing, unexpected = tiny.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    with torch.no_grad():
        out = tiny(pixel_values=clip_preprocess(torch.rand(2, 224, 224, 3)))
    assert out.last_hidden_state.shape == (2, 257, 32) and out.image_embeds.shape == (2, 24)
    assert torch.isfinite(out.last_hidden_state).all() and out.last_hidden_state.std() > 0.1
