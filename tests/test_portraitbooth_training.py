"""PortraitBooth training: losses against hand-written formulas, the attention probe against diffusers' own attention,
dataset preparation from image + caption folders, and the accelerate script on tiny data: it runs, writes files the
loaders read, resumes exactly, and learns."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from facebooth.pipelines.face.align import crop_matrix, template_for, warp_affine
from facebooth.pipelines.face.analyzer import FaceAnalyzer
from facebooth.pipelines.face.arcface import IResNet, IResNetConfig
from facebooth.pipelines.portraitbooth import losses as L
from facebooth.pipelines.portraitbooth.fastcomposer_loading import load_stea
from facebooth.pipelines.portraitbooth.stea import fuse_rows_per_sample
from facebooth.training import f2d_data
from facebooth.training import portraitbooth_data as pdata
from facebooth.utils.files import atomic_save_safetensors
from helpers.tiny_training import save_png as _save_png
from helpers.tiny_training import write_tiny_sd

pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "man", "woman", "happy", "sad", "smiling", "in", "park", "the", "person"]


# ------------------------------------------------------------------------------------------- losses


def test_noise_loss_masks_half_the_samples_as_fastcomposer():
    # issue 10: FastComposer's rule (mask times prediction and target, plain mean), no longer area-normalised
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    got = L.noise_loss(pred, target, mask, torch.tensor([True, False]))
    err = (pred - target) ** 2
    masked = (err[0] * mask[0]).mean()  # mask is 0/1: (m*p - m*t)^2 = m*(p - t)^2
    torch.testing.assert_close(got, (masked + err[1].mean()) / 2)
    torch.testing.assert_close(L.noise_loss(pred, target), err.mean())


def test_predict_x0_inverts_the_forward_process():
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 250, 900])
    noisy = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(L.predict_x0(noisy, noise, sched.alphas_cumprod, t), x0, rtol=1e-4, atol=1e-4)
    v = sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(L.predict_x0(noisy, v, sched.alphas_cumprod, t, "v_prediction"), x0, rtol=1e-4, atol=1e-4)


def test_differentiable_warp_equals_the_face_aligner():
    img = torch.rand(96, 80, 3)
    lm = template_for(112).float() * 0.8 + torch.tensor([6.0, 10.0])
    m = crop_matrix("arcface_112", lm)
    ref = warp_affine(img, m, 112, antialias=False)
    ours = L.warp_batch(img.permute(2, 0, 1)[None], m[None].float(), 112)[0].permute(1, 2, 0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _tiny_backbone(seed: int = 0) -> IResNet:
    torch.manual_seed(seed)
    net = IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(8, 16, 24, 32), stem_width=8, num_features=20))
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            mod.running_var.uniform_(0.5, 1.5)
    return net.eval().requires_grad_(False)


def test_dip_loss_is_zero_for_the_reference_face_and_differentiable():
    net = _tiny_backbone()
    face = torch.rand(1, 3, 112, 112)
    eye = crop_matrix("arcface_112", template_for(112).float())[None].float()  # identity warp
    ref = F.normalize(L.arcface_features(net, face.permute(0, 2, 3, 1), ("embedding",)), dim=-1)
    decoded = face.clone().requires_grad_(True)
    loss = L.dip_identity_loss(decoded, eye, net, ref, torch.tensor([True]))
    assert float(loss.detach()) < 1e-4
    other = torch.rand(1, 3, 112, 112, requires_grad=True)
    loss2 = L.dip_identity_loss(other, eye, net, ref, torch.tensor([True]))
    loss2.backward()
    assert float(loss2.detach()) > 1e-3 and other.grad.abs().sum() > 0
    assert float(L.dip_identity_loss(other, eye, net, ref, torch.tensor([False]))) == 0.0


def test_localization_loss_is_eq_7():
    torch.manual_seed(0)
    b, heads = 2, 3
    layers = []
    for h in (4, 2):
        probs = torch.rand(b, heads, h * h, 2)
        layers.append(L.TokenAttention(probs, h, h))
    mask = torch.zeros(b, 8, 8)
    mask[:, 2:6, 1:5] = 1
    has_exp = torch.tensor([True, False])
    got = L.localization_loss(layers, mask, torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long),
                              has_expression=has_exp, beta=0.8, gamma=0.1, lam=1e-3, mu=1e-2)
    per_sample = torch.zeros(b)
    for layer in layers:
        m = F.interpolate(mask[:, None], size=(layer.height, layer.width), mode="bilinear", antialias=True, align_corners=False)[:, 0]
        for s in range(b):
            for col, cap, w, on in ((0, 0.8, 1e-3, True), (1, 0.1, 1e-2, bool(has_exp[s]))):
                if not on:
                    continue
                a = layer.probs[s, :, :, col].reshape(heads, layer.height, layer.width)
                per_sample[s] += w * ((a * (1 - m[s])).mean() + (torch.relu(cap - a) * m[s]).mean())
    torch.testing.assert_close(got, (per_sample / len(layers)).mean())
    # saturated identity attention inside the face, none outside: no loss from the identity term
    sat = [L.TokenAttention(torch.stack([mask.reshape(b, 1, 64).expand(b, heads, 64)] * 2, -1), 8, 8)]
    assert float(L.localization_loss(sat, mask, torch.zeros(b, dtype=torch.long))) < 1e-6


def test_per_sample_fusion_changes_only_active_rows():
    from facebooth.devmodels.portraitbooth_models import random_postfuse

    fuse = random_postfuse(text_dim=16, feature_dim=8, seed=0).fuse
    cond, feats = torch.randn(3, 10, 16), torch.randn(3, 8)
    out = fuse_rows_per_sample(cond, torch.tensor([2, 5, 7]), feats, fuse, torch.tensor([True, False, True]))
    assert torch.equal(out[1], cond[1])
    torch.testing.assert_close(out[0, 2], fuse(cond[0, 2], feats[0]))
    keep = [i for i in range(10) if i != 7]
    assert torch.equal(out[2, keep], cond[2, keep])


def test_attention_probe_keeps_the_unet_output_and_records_token_maps():
    from facebooth.training.train_portraitbooth import (
        AttentionProbe,
        install_probe,
        probed_layer_names,
    )

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=[16, 32], layers_per_block=1, cross_attention_dim=12, attention_head_dim=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        norm_num_groups=8,
    ).eval()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 12), torch.tensor([5, 500])
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
    assert all(".attn2." in n for n in probed_layer_names(unet, "all"))
    assert not any(n.startswith("down_blocks.0.") for n in probed_layer_names(unet, "middle"))
    probe = AttentionProbe()
    names = install_probe(unet, probe, "all")
    probe.reset(torch.tensor([[1, 3], [2, 6]]), (8, 8))
    with torch.no_grad():
        out = unet(x, t, ctx).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(probe.maps) == len(names)
    shapes = {(m.height, m.width) for m in probe.maps}
    assert shapes == {(8, 8), (4, 4)}
    first = probe.maps[0].probs
    assert first.shape[0] == 2 and first.shape[-1] == 2 and float(first.max()) <= 1.0 and float(first.min()) >= 0.0


# ------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    g = np.random.default_rng(0)
    captions = {"p0": "a photo of a happy woman in the park", "p1": "a photo of a man", "p2": "a photo of a park",
                "p3": "a photo of a sad man"}
    for stem, cap in captions.items():
        base = F.interpolate(torch.from_numpy(g.random((1, 3, 4, 4)).astype(np.float32)), size=48, mode="bilinear")[0]
        _save_png(base.numpy().transpose(1, 2, 0), root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(cap)
    _save_png(g.random((40, 40, 3)), root / "nocaption.png")
    return root


@pytest.fixture(scope="module")
def prepared(raw_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    analyzer = FaceAnalyzer(detector=None, recognizer=None, name="aligned")
    pdata.prepare_dataset(raw_dir, out, analyzer, resolution=32, mode="aligned")
    return out


def test_dataset_preparation_and_items(prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["items"] == ["p0", "p1", "p3"]
    assert "no caption" in index["skipped"]["nocaption"] and "names none" in index["skipped"]["p2"]
    meta = json.loads((prepared / "meta" / "p0.json").read_text())
    assert meta["identity_word"] == "woman" and meta["expression_word"] == "happy"
    assert json.loads((prepared / "meta" / "p1.json").read_text())["expression_word"] is None
    ds = pdata.PortraitBoothDataset(prepared)
    item = ds.get(0)
    assert item["pixel_values"].shape == (3, 32, 32) and item["ref"].shape == (112, 112, 3)
    assert item["mask"].shape == (32, 32) and 0 < float(item["mask"].mean()) < 1
    torch.testing.assert_close(item["landmarks"], template_for(112).float() * (32 / 112), rtol=1e-3, atol=1e-2)
    flipped = ds.get(0, flip=True)
    torch.testing.assert_close(flipped["pixel_values"], item["pixel_values"].flip(-1))
    torch.testing.assert_close(flipped["landmarks"][0, 0], 31 - item["landmarks"][1, 0])  # eyes swap sides
    bigger = pdata.PortraitBoothDataset(prepared, resolution=64).get(0)
    assert bigger["pixel_values"].shape == (3, 64, 64)
    assert pdata.find_word("A Woman-like statue of a man", ["woman", "man"]) == "man"


# ------------------------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    root = write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_pb"), WORDS, width=32, text_layers=2)
    atomic_save_safetensors(_tiny_backbone().state_dict(), root / "arcface.safetensors")
    return root


def _args(tiny_sd: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained-model", str(tiny_sd), "--arcface", str(tiny_sd / "arcface.safetensors"), "--data-dir", str(data),
            "--output-dir", str(out), "--batch-size", "2", "--max-steps", str(steps), "--save-every", "2",
            "--arcface-layers", "layer2", "embedding", "--loc-layers", "all", "--rt", "1000", *extra]


@pytest.mark.slow
def test_training_runs_writes_loadable_files_and_resumes_exactly(tiny_sd, prepared, tmp_path):
    from facebooth.training.train_portraitbooth import main
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert main(_args(tiny_sd, prepared, straight, 4, "--lr", "1e-3")) == 0
    log = f2d_data.read_log(straight)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in log) and any(r["loc"] > 0 for r in log) and any(r["id"] > 0 for r in log)
    stea = load_stea(straight / "stea.safetensors")
    assert stea.config.feature_source == "arcface" and stea.config.arcface_layers == ("layer2", "embedding")
    assert (stea.config.text_dim, stea.config.feature_dim) == (32, 16 + 20)
    unet_ldm = load_file(str(straight / "unet.safetensors"))
    assert "input_blocks.0.0.weight" in unet_ldm and "out.2.weight" in unet_ldm
    # the LDM file converts back with diffusers' own converter into the trained UNet
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet"))
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v.float() for k, v in unet_ldm.items()}, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert any(not torch.allclose(back[k], v.half().float()) for k, v in unet.state_dict().items())  # it was trained

    resumed = tmp_path / "resumed"
    assert main(_args(tiny_sd, prepared, resumed, 2, "--lr", "1e-3")) == 0
    assert main(_args(tiny_sd, prepared, resumed, 4, "--lr", "1e-3", "--resume", "latest")) == 0
    assert [r["step"] for r in f2d_data.read_log(resumed)] == [1, 2, 3, 4]
    a, b = load_stea(straight / "stea.safetensors").state_dict(), load_stea(resumed / "stea.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _fixed_eval_inputs(prepared):
    ds = pdata.PortraitBoothDataset(prepared)
    batch = ds.batch([0, 2, 0, 2], [False] * 4)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([50, 150, 200, 240])
    modes = (torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool), torch.tensor([True, False, True, False]))
    return batch, g, noise, t, modes


@pytest.mark.slow
def test_training_learns_on_tiny_data(tiny_sd, prepared, tmp_path):
    """The script's objective at fixed noise, timesteps and sample modes falls after a short run, evaluated with the
    files it writes (the UNet read back through diffusers' own LDM converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from facebooth.pipelines.face.arcface import load_arcface
    from facebooth.training import train_portraitbooth as tp
    from safetensors.torch import load_file

    def evaluate(run: Path) -> dict[str, float]:
        args = tp.build_parser().parse_args(_args(tiny_sd, prepared, run, 1))
        tok, te, vae, unet, sched = tp.load_diffusers_sd(str(tiny_sd), torch.float32, torch.device("cpu"))
        ldm = load_file(str(run / "unet.safetensors"))
        unet.load_state_dict(convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v.float() for k, v in ldm.items()},
                                                         dict(unet.config)))
        probe = tp.AttentionProbe()
        tp.install_probe(unet, probe, "all")
        batch, _, noise, t, modes = _fixed_eval_inputs(prepared)
        with torch.no_grad():
            out = tp.training_losses(batch, stea=load_stea(run / "stea.safetensors"), unet=unet.eval(), vae=vae, text_encoder=te,
                                     captions=tp.CaptionEncoder(tok), backbone=load_arcface(tiny_sd / "arcface.safetensors").backbone,
                                     scheduler=sched, probe=probe, args=args, device=torch.device("cpu"),
                                     fixed_noise=noise, fixed_timesteps=t, fixed_modes=modes)
        return {k: float(v) for k, v in out.items()}

    start = tmp_path / "start"
    assert tp.main(_args(tiny_sd, prepared, start, 1, "--lr", "0", "--weight-decay", "0")) == 0  # the initial weights
    trained = tmp_path / "trained"
    assert tp.main(_args(tiny_sd, prepared, trained, 20, "--lr", "1e-3", "--save-every", "20", "--no-flip", "--rt", "250",
                         "--uncond-prob", "0", "--text-only-prob", "0")) == 0
    before, after = evaluate(start), evaluate(trained)
    assert before["fused"] == 1.0 and before["dip_samples"] == 4
    assert after["loss"] < 0.75 * before["loss"], (before, after)
    assert after["noise"] < 0.75 * before["noise"], (before, after)


@pytest.mark.slow
def test_every_loss_term_pulls_its_way(tiny_sd, prepared):
    """A few optimizer steps on the script's objective (fixed inputs, loc weights raised so the term is visible)
    lower each term: the DIP identity gradient reaches the UNet and STEA through the VAE decoder, the warp and
    ArcFace, and the ECAC gradient through the probed cross-attention."""
    from facebooth.pipelines.face.arcface import load_arcface
    from facebooth.pipelines.portraitbooth.stea import STEAConfig, STEAModel
    from facebooth.training import train_portraitbooth as tp

    args = tp.build_parser().parse_args(_args(tiny_sd, prepared, Path("unused"), 1, "--lambda-loc", "1", "--mu-loc", "1"))
    tok, te, vae, unet, sched = tp.load_diffusers_sd(str(tiny_sd), torch.float32, torch.device("cpu"))
    unet.train().requires_grad_(True)  # trained below
    probe = tp.AttentionProbe()
    tp.install_probe(unet, probe, "all")
    torch.manual_seed(0)
    stea = STEAModel(STEAConfig(text_dim=32, feature_dim=16 + 20, hidden_dim=32, feature_source="arcface",
                                arcface_layers=("layer2", "embedding")))
    backbone = load_arcface(tiny_sd / "arcface.safetensors").backbone
    batch, _, noise, t, modes = _fixed_eval_inputs(prepared)
    params = list(unet.parameters()) + list(stea.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    history = []
    for _ in range(6):
        out = tp.training_losses(batch, stea=stea, unet=unet, vae=vae, text_encoder=te, captions=tp.CaptionEncoder(tok),
                                 backbone=backbone, scheduler=sched, probe=probe, args=args, device=torch.device("cpu"),
                                 fixed_noise=noise, fixed_timesteps=t, fixed_modes=modes)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    first, last = history[0], history[-1]
    for term in ("noise", "loc", "id"):
        assert last[term] < first[term], (term, history)
    assert last["id"] < 0.6 * first["id"], history
