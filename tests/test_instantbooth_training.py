"""InstantBooth training on tiny synthetic data: the frozen/trainable split, the data pipeline, and a learning run
whose output file the loader reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from facebooth.devmodels.instantbooth_models import (
    TINY_CLIP_VISION,
    random_clip_vision_state_dict,
)
from facebooth.pipelines.instantbooth import load_instantbooth
from facebooth.training import f2d_data
from facebooth.training.train_instantbooth import (
    InstantBoothDataset,
    build_parser,
    clip_vision_config_from_state_dict,
    load_clip_vision,
    main,
)
from helpers.tiny_training import write_clip_tokenizer
from PIL import Image

pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "sks", "person", "woman", "man", "in", "the", "kitchen", "red", "square"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ib_models")
    torch.manual_seed(0)
    sd = root / "sd"
    vocab = write_clip_tokenizer(sd / "tokenizer", WORDS)
    tok = transformers.CLIPTokenizer.from_pretrained(str(sd / "tokenizer"), model_max_length=77)
    tok.save_pretrained(str(sd / "tokenizer"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(str(sd / "text_encoder"))
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(str(sd / "unet"))
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
    ).save_pretrained(str(sd / "vae"))
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(str(sd / "scheduler"))
    # CLIP vision: the ComfyUI-format file and the same tower as a transformers folder
    cv_file = root / "clip_vision.safetensors"
    from safetensors.torch import save_file

    state = random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0)
    save_file(state, str(cv_file))
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_CLIP_VISION))
    hf.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    hf.save_pretrained(str(root / "clip_vision_hf"))
    (root / "clip_vision.json").write_text(json.dumps(TINY_CLIP_VISION))
    return {"sd": sd, "clip_file": cv_file, "clip_dir": root / "clip_vision_hf", "clip_json": root / "clip_vision.json"}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> dict[str, Path]:
    """4 'people': a coloured square on a noisy background, its mask, captions (one without a class noun)."""
    root = tmp_path_factory.mktemp("ib_data")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    g = np.random.default_rng(0)
    captions = ["a photo of a person", "a woman in the kitchen", None, "a red square"]
    for i in range(4):
        img = 0.3 * g.random((40, 48, 3))
        m = np.zeros((40, 48))
        y, x = 6 + 3 * i, 8 + 4 * i
        m[y : y + 20, x : x + 18] = 1
        img[m > 0] = g.random(3)
        Image.fromarray((img * 255).astype(np.uint8)).save(images / f"p{i}.png")
        if i != 2:
            Image.fromarray((m * 255).astype(np.uint8)).save(masks / f"p{i}.png")
        if captions[i]:
            (images / f"p{i}.txt").write_text(captions[i])
    return {"images": images, "masks": masks}


def test_paper_learning_rates_are_the_defaults():
    args = build_parser().parse_args(["--pretrained-model", "x", "--clip-vision", "y", "--data-dir", "d", "--output-dir", "o"])
    assert args.lr_adapter == 1e-6 and args.lr_heads == 1e-4
    assert args.identifier == "sks" and args.batch_size == 16


def test_dataset_masks_crops_augments_and_places_the_identifier(dataset_dir):
    ds = InstantBoothDataset(dataset_dir["images"], dataset_dir["masks"], resolution=32, reference_size=64)
    assert ds.prompts == ["a photo of a sks person", "a sks woman in the kitchen", "a photo of a sks person",
                          "a red square, a photo of a sks person"]
    plain = ds.get(0, flip=False, generator=None)
    assert plain["pixel_values"].shape == (3, 32, 32) and -1 <= plain["pixel_values"].min() and plain["pixel_values"].max() <= 1
    ref = plain["reference"]
    assert ref.shape == (64, 64, 3) and ref[0, 0].abs().max() == 0  # masked background
    assert ds.get(2, False, None)["reference"][32, 0].abs().max() > 0  # no mask: the whole image
    aug1 = ds.get(0, False, torch.Generator().manual_seed(1))["reference"]
    aug2 = ds.get(0, False, torch.Generator().manual_seed(2))["reference"]
    assert not torch.allclose(aug1, ref, atol=0.05) and not torch.allclose(aug1, aug2, atol=0.05)
    flipped = ds.get(0, flip=True, generator=None)["pixel_values"]
    torch.testing.assert_close(flipped, plain["pixel_values"].flip(-1))
    batch = ds.batch([0, 1], [False, True], None)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["reference"].shape == (2, 64, 64, 3)


def test_comfyui_clip_vision_file_loads_like_the_transformers_folder(tiny_models):
    cfg = json.loads(tiny_models["clip_json"].read_text())
    from_file = load_clip_vision(str(tiny_models["clip_file"]), str(tiny_models["clip_json"]), torch.float32, torch.device("cpu"))
    from_dir = load_clip_vision(str(tiny_models["clip_dir"]), None, torch.float32, torch.device("cpu"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(from_file(pixel_values=x).image_embeds, from_dir(pixel_values=x).image_embeds)
    assert not any(p.requires_grad for p in from_file.parameters())
    with pytest.raises(ValueError, match="--clip-vision-config"):
        clip_vision_config_from_state_dict(random_clip_vision_state_dict(TINY_CLIP_VISION))  # width 32: unknown tower
    from facebooth.devmodels.instantbooth_models import VIT_L14_224, clip_vision_shapes

    vit_l = {k: torch.empty(s, device="meta") for k, s in clip_vision_shapes(VIT_L14_224).items()}
    got = clip_vision_config_from_state_dict(vit_l)
    assert {k: got[k] for k in cfg if k in got} == {k: VIT_L14_224[k] for k in cfg if k in got}


def _args(models, data, out, steps, *extra):
    return ["--pretrained-model", str(models["sd"]), "--clip-vision", str(models["clip_dir"]),
            "--data-dir", str(data["images"]), "--mask-dir", str(data["masks"]), "--output-dir", str(out),
            "--resolution", "32", "--batch-size", "2", "--max-steps", str(steps), "--patch-dim", "16", "--num-heads", "4",
            "--save-every", "1000", *extra]


@pytest.mark.slow
def test_training_learns_and_writes_a_file_the_loader_reads(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "run"
    # the paper's learning rates are for 320k steps; a tiny run uses larger ones to show learning in seconds
    assert main(_args(tiny_models, dataset_dir, out, 40, "--lr-adapter", "3e-3", "--lr-heads", "3e-3", "--eval-every", "40")) == 0
    log = f2d_data.read_log(out)
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 40]
    assert evals[1] < 0.9 * evals[0], evals  # fixed batch, fixed noise: the denoising loss went down
    model = load_instantbooth(out / "instantbooth.safetensors")
    cfg = model.config
    assert cfg.clip_hidden_dim == 32 and cfg.clip_global_dim == 24 and cfg.text_dim == 32 and cfg.patch_dim == 16
    assert len(cfg.adapters) == 7 and sorted(set(cfg.adapters.values())) == [32, 64]
    assert all(abs(g) > 1e-4 for g in model.gates().values())  # every gate opened from 0
    from safetensors import safe_open

    with safe_open(str(out / "instantbooth.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith(("concept_encoder.fc.", "patch_encoder.fc.", "adapters.")) for k in keys)  # SD/CLIP not saved
    assert meta["trained_steps"] == "40" and meta["method"] == "instantbooth"
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]


@pytest.mark.slow
def test_only_heads_and_adapters_change_and_resume_continues(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_models, dataset_dir, out, 2, "--save-every", "2")) == 0  # paper learning rates
    first = load_instantbooth(out / "instantbooth.safetensors").state_dict()
    assert main(_args(tiny_models, dataset_dir, out, 4, "--save-every", "2", "--resume", "latest")) == 0
    assert [r["step"] for r in f2d_data.read_log(out)] == [1, 2, 3, 4]
    second = load_instantbooth(out / "instantbooth.safetensors").state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith("concept_encoder"))
    # lr 1e-6 on the adapters: they move, but by about lr per step (Adam), far less than the heads at 1e-4
    gamma = [k for k in first if k.endswith("gamma")]
    adapter_move = max(float((second[k] - first[k]).abs()) for k in gamma)
    head_move = float((second["patch_encoder.fc.weight"] - first["patch_encoder.fc.weight"]).abs().max())
    assert 0 < adapter_move < 1e-5 < head_move
