"""The four training scripts give the same model on 1 and 2 processes (issue 12).

Per script, on tiny random models and data, with the same seed and global batch (4):

* ``one``: 1 process, batch 4, 4 steps (in this pytest process);
* ``two``: 2 processes x batch 2, 4 steps (a real 2-process gloo run: ``ACCELERATE_USE_CPU=true accelerate launch
  --multi_gpu --num_processes 2``);
* ``one_to_two``: 2 processes resuming ``one``'s step-2 checkpoint, launched with ``--batch-size 4`` (the 1-process
  command line): the run keeps the global batch by taking 2 per process;
* ``two_to_one``: 1 process resuming ``two``'s step-2 checkpoint with ``--batch-size 2``: 4 per process.

All 2-process runs of the four scripts share one launch (a driver calls each script's ``main`` in turn), since
starting processes costs more than these tiny runs. Assertions: the final weights (and the step-2 weights) equal the
1-process run's to float noise, far below what the last steps moved them; the logged loss equals the 1-process loss;
each log step, each console line and the checkpoint's ``state.json`` appear once, with every process's RNG file.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from facebooth.training import run_state  # noqa: E402 -- after the importorskips
from facebooth.training.distributed import SampleRandom, check_world_size  # noqa: E402 -- after the importorskips
from helpers.tiny_training import save_png, write_tiny_sd  # noqa: E402 -- after the importorskips

SCRIPTS = ("msid", "mapping", "portraitbooth", "instantbooth")
MODULES = {name: f"facebooth.training.{m}" for name, m in (
    ("msid", "train_f2d_msid"), ("mapping", "train_f2d_mapping"), ("portraitbooth", "train_portraitbooth"),
    ("instantbooth", "train_instantbooth"))}
DONE_LINE = {"msid": "MSID pretraining done", "mapping": "F2D mapping training done",
             "portraitbooth": "PortraitBooth training done", "instantbooth": "InstantBooth training done"}
WORDS = ["a", "photo", "of", "f", "l", "person", "man", "woman", "happy", "sad", "in", "the", "park", "sks"]
STEPS = 4


# --- tiny models and data ------------------------------------------------------------------------------------


def _tiny_sd(root: Path) -> Path:
    return write_tiny_sd(root, WORDS, width=16, text_layers=1)


def _setup(root: Path) -> dict[str, list[str]]:
    """Builds everything and returns each script's common arguments (without output dir, batch, steps)."""
    from facebooth.devmodels.instantbooth_models import (
        TINY_CLIP_VISION,
        random_clip_vision_state_dict,
    )
    from facebooth.pipelines.face.analyzer import FaceAnalyzer
    from facebooth.pipelines.face.arcface import IResNet, IResNetConfig
    from facebooth.pipelines.face2diffusion import MSIDConfig, MSIDEncoder, save_msid
    from facebooth.training.portraitbooth_data import prepare_dataset
    from facebooth.utils.files import atomic_save_safetensors

    g = np.random.default_rng(0)
    sd = _tiny_sd(root / "sd")
    # MSID: 4 identities x 2 crops (32 px)
    for k in range(4):
        base = g.random((1, 1, 3))
        for j in range(2):
            save_png(base + 0.1 * g.standard_normal((32, 32, 3)), root / "ids" / f"p{k}" / f"{j}.png")
    msid_args = ["--data-dir", str(root / "ids"), "--img-size", "32", "--patch-size", "8", "--embed-dim", "32",
                 "--depth", "2", "--num-heads", "2", "--feature-blocks", "0", "1", "--lr", "1e-3",
                 "--lr-schedule", "cosine", "--warmup-steps", "1"]
    # F2D mapping: 4 faces with crops, masks (one missing) and expressions (half)
    for i in range(4):
        save_png(g.random((32, 32, 3)), root / "f2d" / "images" / f"f{i}.png")
        save_png(g.random((32, 32, 3)), root / "f2d" / "crops" / f"f{i}.png")
        if i < 3:
            m = np.zeros((32, 32, 3))
            m[8:24, 8:24] = 1
            save_png(m, root / "f2d" / "masks" / f"f{i}.png")
        if i % 2 == 0:
            (root / "f2d" / "exp").mkdir(parents=True, exist_ok=True)
            np.save(root / "f2d" / "exp" / f"f{i}.npy", g.standard_normal(64).astype(np.float32))
    torch.manual_seed(0)
    save_msid(MSIDEncoder(MSIDConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, feature_blocks=(0, 1))),
              root / "f2d" / "msid.safetensors")
    mapping_args = ["--pretrained-model", str(sd), "--msid", str(root / "f2d" / "msid.safetensors"),
                    "--data-dir", str(root / "f2d" / "images"), "--crop-dir", str(root / "f2d" / "crops"),
                    "--mask-dir", str(root / "f2d" / "masks"), "--expression-dir", str(root / "f2d" / "exp"),
                    "--resolution", "32", "--lr", "1e-3", "--mapping-hidden", "24", "--exp-dropout", "0.5"]
    # PortraitBooth: a prepared folder of 4 aligned faces with captions, and a tiny ArcFace
    captions = ["a photo of a happy woman in the park", "a photo of a man", "a photo of a sad man", "a woman in the park"]
    for i, cap in enumerate(captions):
        save_png(np.kron(g.random((4, 4, 3)), np.ones((8, 8, 1))), root / "pb_raw" / f"p{i}.png")
        (root / "pb_raw" / f"p{i}.txt").write_text(cap)
    prepare_dataset(root / "pb_raw", root / "pb", FaceAnalyzer(detector=None, recognizer=None, name="aligned"),
                    resolution=32, mode="aligned")
    torch.manual_seed(0)
    net = IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(8, 8, 8, 8), stem_width=8, num_features=8))
    atomic_save_safetensors(net.state_dict(), root / "arcface.safetensors")
    # --rt 500: the identity loss runs on most samples (the paper's 250 would leave it idle in 4 tiny steps), but not
    # near t = 1000, where x^0 divides by sqrt(alpha_bar) ~ 0.07 and the decoded image saturates: the loss's gradient
    # then runs through the few unclamped pixels, and which ones they are flips with float rounding (batch 4 on one
    # process vs 2 + 2): a ~1 % gradient change whatever the process count (seen with --rt 1000 once the random draws moved).
    pb_args = ["--pretrained-model", str(sd), "--arcface", str(root / "arcface.safetensors"), "--data-dir", str(root / "pb"),
               "--arcface-layers", "layer2", "embedding", "--loc-layers", "all", "--rt", "500", "--lr", "1e-3",
               "--uncond-prob", "0.2", "--text-only-prob", "0.2", "--save-dtype", "fp32"]
    # InstantBooth: 4 images with masks, a tiny CLIP vision tower
    for i in range(4):
        img = 0.3 * g.random((32, 32, 3))
        img[4 + 2 * i : 20 + 2 * i, 6:22] = g.random(3)
        save_png(img, root / "ib" / "images" / f"q{i}.png")
        m = np.zeros((32, 32, 3))
        m[4 + 2 * i : 20 + 2 * i, 6:22] = 1
        save_png(m, root / "ib" / "masks" / f"q{i}.png")
    (root / "ib" / "images" / "q1.txt").write_text("a photo of a woman in the park")
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_CLIP_VISION))
    hf.load_state_dict({k: v.float() for k, v in random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0).items()}, strict=False)
    hf.save_pretrained(str(root / "clip_vision"))
    ib_args = ["--pretrained-model", str(sd), "--clip-vision", str(root / "clip_vision"), "--data-dir", str(root / "ib" / "images"),
               "--mask-dir", str(root / "ib" / "masks"), "--resolution", "32", "--patch-dim", "16", "--num-heads", "4",
               "--lr-adapter", "3e-3", "--lr-heads", "3e-3", "--eval-every", "2"]
    return {"msid": msid_args, "mapping": mapping_args, "portraitbooth": pb_args, "instantbooth": ib_args}


def _argv(common: list[str], out: Path, batch: int, *extra: str) -> list[str]:
    return [*common, "--output-dir", str(out), "--batch-size", str(batch), "--max-steps", str(STEPS),
            "--save-every", "2", "--keep-checkpoints", "3", "--seed", "7", *extra]


def _resume_dir(src: Path, dst: Path) -> Path:
    """A new output folder holding only ``src``'s step-2 checkpoint and its log up to step 2."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step-0000002", dst / "checkpoints" / "step-0000002")
    lines = [r for r in run_state.read_log(src) if r["step"] <= 2]
    (dst / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return dst


# Runs several scripts' main() in one launch. FORK_LAUNCHED=1 (accelerate's flag for launchers that own the process
# group) makes each script's end_training() keep the group for the next run; the driver destroys it at the end.
DRIVER = textwrap.dedent('''
    import importlib, json, sys
    import torch.distributed as dist
    for item in json.load(open(sys.argv[1])):
        rc = importlib.import_module(item["module"]).main(item["argv"])
        if rc:
            sys.exit(rc)
    if dist.is_initialized():
        dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(plan: list[dict], folder: Path) -> subprocess.CompletedProcess:
    (folder / "driver.py").write_text(DRIVER)
    (folder / "plan.json").write_text(json.dumps(plan))
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.exists():
        cmd.append("launch")
    cmd += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            str(folder / "driver.py"), str(folder / "plan.json")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "FORK_LAUNCHED": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mp_training")
    common = _setup(root)
    import importlib

    outs: dict[str, dict[str, Path]] = {s: {} for s in SCRIPTS}
    for s in SCRIPTS:  # 1 process, global batch 4
        outs[s]["one"] = root / s / "one"
        assert importlib.import_module(MODULES[s]).main(_argv(common[s], outs[s]["one"], 4)) == 0
    plan = []
    for s in SCRIPTS:  # 2 processes x 2: fresh, and resuming the 1-process checkpoint (given --batch-size 4)
        outs[s]["two"] = root / s / "two"
        outs[s]["one_to_two"] = _resume_dir(outs[s]["one"], root / s / "one_to_two")
        plan.append({"module": MODULES[s], "argv": _argv(common[s], outs[s]["two"], 2)})
        plan.append({"module": MODULES[s], "argv": _argv(common[s], outs[s]["one_to_two"], 4, "--resume", "latest")})
    proc = _launch_two_processes(plan, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for s in SCRIPTS:  # 1 process resuming the 2-process checkpoint (given --batch-size 2)
        outs[s]["two_to_one"] = _resume_dir(outs[s]["two"], root / s / "two_to_one")
        assert importlib.import_module(MODULES[s]).main(_argv(common[s], outs[s]["two_to_one"], 2, "--resume", "latest")) == 0
    return {"outs": outs, "console": proc.stdout + proc.stderr, "root": root}


LR = {"msid": 1e-3, "mapping": 1e-3, "portraitbooth": 1e-3, "instantbooth": 3e-3}  # the largest rate of each run


def _state(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_state.checkpoint_dir(out, step) / "state.safetensors"))


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _state(out, step).items() if not k.startswith("optim.")}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# --- the 2-process runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_train_the_same_model_as_one(runs, script, record_property):
    """Adam's first moment is linear in the gradients: it must agree to float rounding, tensor by tensor. The weights
    agree to a small fraction of one step (Adam normalises each element, so rounding in a gradient that is ~0 can
    become a visible part of lr; every bug seen here moved weights by about lr)."""
    outs = runs["outs"][script]
    one4, one2 = _weights(outs["one"], 4), _weights(outs["one"], 2)
    moved = _max_diff(one4, one2)  # what the last two steps changed
    diffs = {name: _max_diff(one4, _weights(outs[name], 4)) for name in ("two", "one_to_two", "two_to_one")}
    diffs["two@2"] = _max_diff(one2, _weights(outs["two"], 2))
    record_property("max_param_diff", diffs)
    print(f"\n[{script}] largest |w_1proc - w|: {diffs}; last-two-steps movement {moved:.3g}")
    tol = 0.1 * LR[script]
    assert moved > 10 * tol, "the tiny run must move the weights for the comparison to mean anything"
    for name, d in diffs.items():
        assert d <= tol, (name, d, tol, moved)
    ref = {k: v for k, v in _state(outs["one"], 4).items() if k.endswith(".exp_avg")}
    for name in ("two", "one_to_two", "two_to_one"):
        got = {k: v for k, v in _state(outs[name], 4).items() if k.endswith(".exp_avg")}
        assert got.keys() == ref.keys(), (name, sorted(got.keys() ^ ref.keys()))  # the same parameters were trained
        for k, m in ref.items():
            assert float((got[k] - m).abs().max()) <= 1e-3 * float(m.abs().max()) + 1e-12, (name, k)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_logged_loss_is_the_global_loss_once_per_step(runs, script):
    outs = runs["outs"][script]
    ref = [r for r in run_state.read_log(outs["one"]) if "loss" in r]
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    for name in ("two", "one_to_two", "two_to_one"):
        got = [r for r in run_state.read_log(outs[name]) if "loss" in r]
        assert [r["step"] for r in got] == [1, 2, 3, 4], name  # each step once (steps 1-2 copied for resumes)
        for a, b in zip(ref, got):
            assert a.keys() == b.keys(), name
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (name, a["step"], key)
    if script == "portraitbooth":  # the split of active samples over the 2 processes was uneven at some step
        assert any(round(r["fused"] * 4) % 2 == 1 for r in ref), ref
        assert any(round(r["dip_samples"]) % 2 == 1 for r in ref), ref  # the identity loss's too
    if script == "instantbooth":  # eval on the main process only, once per eval step
        assert [r["step"] for r in run_state.read_log(outs["two"]) if "eval_loss" in r] == [0, 2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_outputs_and_console_lines_once(runs, script):
    outs, lines = runs["outs"][script], runs["console"].splitlines()
    for name in ("two", "one_to_two"):
        out = outs[name]
        done = [line for line in lines if f"{DONE_LINE[script]}: step {STEPS} in" in line]
        assert sum(line.rstrip().endswith(f"outputs in {out}") for line in done) == 1, name
        ckpt = run_state.checkpoint_dir(out, 4)
        assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rng_")) == ["rng_0.safetensors", "rng_1.safetensors"]
        info = run_state.read_run_info(ckpt)
        assert (info["world_size"], info["batch_size"]) == (2, 2), info
        assert not list(out.rglob("*.tmp"))
    resumed = outs["one_to_two"]
    assert sum(f"Resumed from {resumed}" in line for line in lines) == 1
    assert sum("per-process batch 2 (not 4) keeps the checkpoint's global batch of 4" in line for line in lines) == len(SCRIPTS)
    assert run_state.read_run_info(run_state.checkpoint_dir(outs["two_to_one"], 4))["world_size"] == 1


# --- rules without a launch ------------------------------------------------------------------------------------


def test_keep_global_batch_rule():
    info = {"world_size": 2, "batch_size": 3, "gradient_accumulation_steps": 1}
    assert run_state.keep_global_batch(info, 3, 2) == 3
    assert run_state.keep_global_batch(info, 3, 1) == 6
    assert run_state.keep_global_batch(info, 1, 3) == 2
    assert run_state.keep_global_batch(None, 5, 4) == 5
    with pytest.raises(SystemExit, match="global batch of 6"):
        run_state.keep_global_batch(info, 2, 4)
    with pytest.raises(SystemExit, match="gradient-accumulation-steps 1"):
        run_state.keep_global_batch(info, 3, 2, accumulation=2)


def test_a_world_size_accelerate_did_not_join_is_refused(tmp_path, monkeypatch):
    check_world_size(2, {"WORLD_SIZE": "2"})
    check_world_size(1, {})
    with pytest.raises(SystemExit, match="ACCELERATE_USE_CPU=true accelerate launch --multi_gpu"):
        check_world_size(1, {"WORLD_SIZE": "2"})
    # what `accelerate launch --multi_gpu` without a backend gives every process: WORLD_SIZE=2, a 1-process accelerator
    from facebooth.training.train_f2d_msid import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(SystemExit, match="WORLD_SIZE=2"):
        main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_sample_draws_do_not_depend_on_the_split():
    whole = SampleRandom(3, 5, range(4))
    halves = [SampleRandom(3, 5, range(2)), SampleRandom(3, 5, range(2, 4))]
    assert torch.equal(whole.randn("noise", (2, 3)), torch.cat([h.randn("noise", (2, 3)) for h in halves]))
    assert torch.equal(whole.randint("t", 1000), torch.cat([h.randint("t", 1000) for h in halves]))
    assert not torch.equal(whole.randn("noise", (2, 3)), whole.randn("other", (2, 3)))
    assert not torch.equal(whole.randn("noise", (2, 3)), SampleRandom(3, 6, range(4)).randn("noise", (2, 3)))
