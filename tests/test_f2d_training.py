"""Face2Diffusion training scripts on tiny synthetic data: they learn, write files loading.py reads, and resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facebooth.pipelines.face2diffusion import (
    IdentityTokens,
    MSIDConfig,
    MSIDEncoder,
    encode_with_identities,
    load_mapping,
    load_msid,
    save_msid,
)
from facebooth.training import f2d_data
from facebooth.training.train_f2d_mapping import cgdr_loss, cgdr_target, latent_mask
from facebooth.training.train_f2d_msid import ArcFaceHead
from helpers.tiny_training import save_png as _save_png
from helpers.tiny_training import write_clip_tokenizer

pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MSID_ARGS = [
    "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "4", "--num-heads", "2",
    "--feature-blocks", "0", "1", "2", "3", "--batch-size", "8", "--lr-schedule", "constant",
]


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory) -> Path:
    """4 synthetic 'people': each a smooth colour pattern, images = pattern + noise."""
    root = tmp_path_factory.mktemp("ids")
    g = np.random.default_rng(0)
    for k in range(4):
        base = F.interpolate(torch.from_numpy(g.random((1, 3, 4, 4)).astype(np.float32)), size=112, mode="bilinear")[0]
        for j in range(6):
            x = base.numpy() + 0.08 * g.standard_normal((3, 112, 112))
            _save_png(x.transpose(1, 2, 0), root / f"person_{k}" / f"{j}.png")
    return root


# --- MSID pretraining ------------------------------------------------------------------------------------------


def test_arcface_head_margin_and_gradient():
    head = ArcFaceHead(8, 3, scale=10.0, margin=0.5)
    feats = torch.randn(4, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    loss = head(feats, labels)
    loss.backward()
    assert feats.grad.abs().sum() > 0
    # the margin makes the loss strictly larger than the plain normalised softmax loss
    cos = F.linear(F.normalize(feats), F.normalize(head.weight))
    assert loss.item() > F.cross_entropy(cos * 10.0, labels).item()
    head.margin = 0.0
    head.th, head.mm = -1.0, 0.0
    torch.testing.assert_close(head(feats, labels), F.cross_entropy(cos * 10.0, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_msid_training_learns_saves_and_resumes_exactly(identity_dir, tmp_path):
    from facebooth.training.train_f2d_msid import main

    straight = tmp_path / "straight"
    assert main(["--data-dir", str(identity_dir), "--output-dir", str(straight), "--max-steps", "24", "--save-every", "8", *MSID_ARGS]) == 0
    losses = [r["loss"] for r in f2d_data.read_log(straight)]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:3]), losses

    model = load_msid(straight / "msid.safetensors")
    assert model.config.embed_dim == 32 and model.config.feature_blocks == (0, 1, 2, 3) and model.config.num_heads == 2
    # the trained encoder separates the identities: same-person cosine > different-person cosine
    data = f2d_data.IdentityFolderDataset(identity_dir, image_size=32)
    batch = data.batch(list(range(len(data))), [False] * len(data))
    with torch.no_grad():
        v = F.normalize(model(batch["pixels"]), dim=-1)
    sim = v @ v.T
    same = batch["labels"][:, None] == batch["labels"][None, :]
    off_diag = ~torch.eye(len(data), dtype=torch.bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.2

    # interrupted at 16 (checkpoint every 8), resumed to 24: bit-identical to the straight run
    resumed = tmp_path / "resumed"
    assert main(["--data-dir", str(identity_dir), "--output-dir", str(resumed), "--max-steps", "16", "--save-every", "8", *MSID_ARGS]) == 0
    assert f2d_data.latest_checkpoint(resumed).name == "step-0000016"
    assert main(["--data-dir", str(identity_dir), "--output-dir", str(resumed), "--max-steps", "24", "--save-every", "8", "--resume", "latest", *MSID_ARGS]) == 0
    steps = [r["step"] for r in f2d_data.read_log(resumed)]
    assert steps == list(range(1, 25))
    a = load_msid(straight / "msid.safetensors").state_dict()
    b = load_msid(resumed / "msid.safetensors").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # old checkpoints are pruned (keep 2), and nothing pickled is written
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-0000016", "step-0000024"]
    assert not [p for p in resumed.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]


def test_identity_dataset_errors(tmp_path):
    _save_png(np.zeros((112, 112, 3)), tmp_path / "only_one" / "a.png")
    with pytest.raises(ValueError, match="at least two identity"):
        f2d_data.IdentityFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        f2d_data.IdentityFolderDataset(tmp_path / "nope")


def test_step_batches_deterministic_and_epoch_reshuffle():
    sb = f2d_data.StepBatches(10, 4, seed=3)
    assert sb.per_epoch == 2
    assert sb(0) == f2d_data.StepBatches(10, 4, seed=3)(0)
    first_epoch = sb(0)[0] + sb(1)[0]
    assert len(set(first_epoch)) == 8
    assert sb(2) != sb(0)
    r0 = f2d_data.StepBatches(10, 2, seed=3, rank=0, world=2)(0)[0]
    r1 = f2d_data.StepBatches(10, 2, seed=3, rank=1, world=2)(0)[0]
    assert not set(r0) & set(r1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        f2d_data.StepBatches(3, 4, seed=0)


# --- CGDR ------------------------------------------------------------------------------------------------------


def test_cgdr_target_and_loss():
    eps = torch.randn(2, 4, 8, 8)
    eps_c = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    t = cgdr_target(eps, eps_c, mask)
    torch.testing.assert_close(t[:, :, 3, 3], eps[:, :, 3, 3])
    torch.testing.assert_close(t[:, :, 0, 0], eps_c[:, :, 0, 0])
    # the whole-image mask is plain denoising (eq. 1); an empty mask only follows the class prompt
    hat = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.testing.assert_close(cgdr_loss(hat, eps, eps_c, torch.ones(2, 1, 8, 8)), F.mse_loss(hat, eps))
    torch.testing.assert_close(cgdr_loss(hat, eps, eps_c, torch.zeros(2, 1, 8, 8)), F.mse_loss(hat, eps_c))
    # eps_c is a target, not a path for gradients
    eps_c.requires_grad_(True)
    cgdr_loss(hat, eps, eps_c, mask).backward()
    assert eps_c.grad is None and hat.grad is not None
    lm = latent_mask(torch.ones(1, 1, 32, 32).tril(), (8, 8))
    assert lm.shape == (1, 1, 8, 8) and 0 < lm.mean() < 1


# --- mapping training on a tiny random SD1-like model ----------------------------------------------------------

WORDS = ["a", "photo", "of", "f", "l", "person"]


def _write_tiny_tokenizer(folder: Path) -> int:
    """A real CLIP BPE tokenizer over WORDS; returns the vocab size (also used by test_f2d_node_comfy)."""
    return write_clip_tokenizer(folder, WORDS)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    vocab = _write_tiny_tokenizer(root / "tokenizer")
    tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"), model_max_length=77)
    tok.save_pretrained(str(root / "tokenizer"))
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    te.save_pretrained(str(root / "text_encoder"))
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(str(root / "unet"))
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
    ).save_pretrained(str(root / "vae"))
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(str(root / "scheduler"))
    return root


@pytest.fixture(scope="module")
def mapping_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("f2d_data")
    g = np.random.default_rng(1)
    for i in range(4):
        _save_png(g.random((32, 32, 3)), root / "images" / f"face{i}.png")
        _save_png(g.random((112, 112, 3)), root / "crops" / f"face{i}.png")
        if i < 3:  # one image without mask: whole image
            m = np.zeros((32, 32, 3))
            m[8:24, 8:24] = 1
            _save_png(m, root / "masks" / f"face{i}.png")
        if i % 2 == 0:  # half the images have expression coefficients
            (root / "exp").mkdir(exist_ok=True)
            np.save(root / "exp" / f"face{i}.npy", g.standard_normal(64).astype(np.float32))
    torch.manual_seed(0)
    msid = MSIDEncoder(MSIDConfig(img_size=112, patch_size=16, embed_dim=32, depth=2, num_heads=2, feature_blocks=(0, 1)))
    save_msid(msid, root / "msid.safetensors")
    return {k: root / k for k in ("images", "crops", "masks", "exp")} | {"msid": root / "msid.safetensors"}


def test_mapping_dataset_items(mapping_data):
    ds = f2d_data.FaceMappingDataset(mapping_data["images"], mapping_data["crops"], resolution=32,
                                     mask_dir=mapping_data["masks"], expression_dir=mapping_data["exp"])
    item = ds.get(0)
    assert item["pixel_values"].shape == (3, 32, 32) and item["id_pixels"].shape == (3, 112, 112)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 16 * 16
    assert item["has_expression"] and not ds.get(1)["has_expression"]
    assert ds.get(3)["mask"].min() == 1  # no mask file: whole image
    flipped = ds.get(0, flip=True)
    torch.testing.assert_close(flipped["pixel_values"], item["pixel_values"].flip(-1))
    torch.testing.assert_close(flipped["id_pixels"], item["id_pixels"].flip(-1))
    with pytest.raises(ValueError, match="ArcFace-aligned crop"):
        f2d_data.FaceMappingDataset(mapping_data["images"], mapping_data["masks"], resolution=32)


def _mapping_args(tiny_sd: Path, data: dict[str, Path], out: Path, steps: int) -> list[str]:
    return [
        "--pretrained-model", str(tiny_sd), "--msid", str(data["msid"]), "--data-dir", str(data["images"]),
        "--crop-dir", str(data["crops"]), "--mask-dir", str(data["masks"]), "--expression-dir", str(data["exp"]),
        "--output-dir", str(out), "--resolution", "32", "--batch-size", "2", "--lr", "1e-3", "--mapping-hidden", "48",
        "--max-steps", str(steps), "--save-every", "2",
    ]


@pytest.mark.slow
def test_mapping_training_runs_saves_loads_and_resumes(tiny_sd, mapping_data, tmp_path):
    from facebooth.training.train_f2d_mapping import main

    straight = tmp_path / "straight"
    assert main(_mapping_args(tiny_sd, mapping_data, straight, 4)) == 0
    log = f2d_data.read_log(straight)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    mapping = load_mapping(straight / "mapping.safetensors")
    assert (mapping.config.id_dim, mapping.config.hidden_dim, mapping.config.out_dim) == (64, 48, 32)

    # the written mapping drives the text encoder end to end
    te = transformers.CLIPTextModel.from_pretrained(str(tiny_sd / "text_encoder")).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))
    ids = tok("a photo of f l", padding="max_length", max_length=77, return_tensors="pt").input_ids
    msid = load_msid(mapping_data["msid"])
    with torch.no_grad():
        v = msid(torch.rand(1, 3, 112, 112) * 2 - 1)
        cond = encode_with_identities(te, ids, [IdentityTokens(tok.convert_tokens_to_ids("f</w>"), mapping(v)[0])])[0]
    assert cond.shape == (1, 77, 32) and torch.isfinite(cond).all()

    resumed = tmp_path / "resumed"
    assert main(_mapping_args(tiny_sd, mapping_data, resumed, 2)) == 0
    assert main(_mapping_args(tiny_sd, mapping_data, resumed, 4) + ["--resume", "latest"]) == 0
    assert [r["step"] for r in f2d_data.read_log(resumed)] == [1, 2, 3, 4]
    a = load_mapping(straight / "mapping.safetensors").state_dict()
    b = load_mapping(resumed / "mapping.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    logs_a = [r["loss"] for r in f2d_data.read_log(straight)]
    logs_b = [r["loss"] for r in f2d_data.read_log(resumed)]
    assert logs_a == logs_b


@pytest.mark.slow
def test_mapping_training_learns_class_guided_background(tiny_sd, mapping_data, tmp_path):
    """With an all-background mask, eq. 7 asks eps_hat("a photo of f l") to equal eps_c("a photo of a person").

    The optimum is reachable (S* equal to the hidden rows of "a person" at the same slots makes both
    conditionings identical, loss 0), so training must cut the loss substantially, evaluated at fixed noise.
    """
    from facebooth.training import train_f2d_mapping as tm

    one = tmp_path / "one"
    for sub in ("images", "crops"):
        (one / sub).mkdir(parents=True)
        (one / sub / "face0.png").write_bytes((mapping_data[sub] / "face0.png").read_bytes())
    _save_png(np.zeros((32, 32, 3)), one / "masks" / "face0.png")

    def args(steps: int) -> list[str]:
        return [
            "--pretrained-model", str(tiny_sd), "--msid", str(mapping_data["msid"]), "--data-dir", str(one / "images"),
            "--crop-dir", str(one / "crops"), "--mask-dir", str(one / "masks"), "--output-dir", str(tmp_path / "run"),
            "--resolution", "32", "--batch-size", "1", "--lr", "3e-3", "--mapping-hidden", "48", "--max-steps", str(steps),
            "--save-every", "100", "--no-flip", "--dropout", "0", "--resume", "latest",
        ]

    tok, te, vae, unet, sched = tm.load_diffusers_sd(str(tiny_sd), torch.float32, torch.device("cpu"))
    msid = load_msid(mapping_data["msid"])
    ds = f2d_data.FaceMappingDataset(one / "images", one / "crops", resolution=32, mask_dir=one / "masks")
    batch = ds.batch([0, 0, 0, 0], [False] * 4)
    assert batch["mask"].sum() == 0
    ids = tm._prompt_ids(tok, "a photo of f l")
    with torch.no_grad():
        class_cond = te(input_ids=tm._prompt_ids(tok, "a photo of a person"))[0]

    class _NoAutocast:
        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    def eval_loss(path: Path) -> float:
        torch.manual_seed(123)  # same latents, noise and timesteps for both evaluations
        with torch.no_grad():
            return tm._cgdr_step(batch, load_mapping(path), msid, vae, unet, te, sched, ids, class_cond,
                                 tok.convert_tokens_to_ids("f</w>"), 0.0, vae.config.scaling_factor, "epsilon",
                                 torch.device("cpu"), torch.float32, _NoAutocast()).item()

    assert tm.main(args(1)) == 0
    before = eval_loss(tmp_path / "run" / "mapping.safetensors")
    assert tm.main(args(30)) == 0
    after = eval_loss(tmp_path / "run" / "mapping.safetensors")
    assert after < 0.5 * before, (before, after)
