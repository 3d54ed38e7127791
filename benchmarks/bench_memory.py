"""Peak memory while sampling with each method, divided by plain sampling with the same checkpoint, in one process.

    COMFYUI_DIR=~/ComfyUI python benchmarks/bench_memory.py [--device cpu|cuda] [--size small] [--steps N] [--px N]

Each method runs in a fresh process (plain first and last, to see drift), which imports ComfyUI, loads the checkpoint,
sets the method up through its own node (random weights in the real layouts; nothing is downloaded), unloads all
models, and samples once with ComfyUI's own sampler (euler, CFG 5), so the run loads what it needs through ComfyUI's
memory management (ModelPatcher + load_models_gpu). The figure for a method is its peak / the plain peak:
- cuda: ``torch.cuda.max_memory_allocated`` during the sampling call;
- cpu: the process RSS sampled every 2 ms by a thread during the sampling call. On CPU the "offloaded" models stay in
  RAM, so this counts everything the method keeps resident (e.g. the F2D networks), plus the checkpoint, which
  dominates; the MiB added during sampling are printed too.
``small``: the random SD1.5-layout test checkpoint (full-size CLIP-L, small UNet), 64 px, 4 steps by default.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


class PeakRSS:
    """RSS peak of this process while the block runs (CPU), sampled by a thread."""

    def __init__(self, every: float = 0.002) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _import_comfy(root: Path, device: str):
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    return comfy


METHODS = ["plain", "face2diffusion", "instantbooth", "portraitbooth", "personamagic"]


def _setup_method(name: str, comfy, model, clip, work: Path) -> tuple:
    """(MODEL, positive CONDITIONING) of one method, built by its own node."""
    if name == "plain":
        return model, clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a man smiling"))
    if name == "face2diffusion":
        return _face2diffusion(model, clip, work)
    if name == "instantbooth":
        return _instantbooth(model, clip, work)
    if name == "portraitbooth":
        return _portraitbooth(model, clip)
    return _personamagic(model, clip)


def _face2diffusion(model, clip, work: Path) -> tuple:
    import folder_paths
    from facebooth.devmodels.face2diffusion_models import write_random_pair
    from facebooth.nodes import face2diffusion
    from facebooth.pipelines.face2diffusion import F2DMappingConfig, MSIDConfig

    f2d_dir = work / "f2d"
    f2d_dir.mkdir()
    write_random_pair(f2d_dir, seed=0, msid_config=MSIDConfig(), mapping_config=F2DMappingConfig())  # official sizes
    folder_paths.folder_names_and_paths["facebooth/face2diffusion"] = ([str(f2d_dir)], {".pt"})
    f2d = face2diffusion.F2DLoader.execute(msid_file="msid.pt", mapping_file="mapping.pt", device="auto")[0]
    crops = torch.rand(1, 112, 112, 3)
    return model, face2diffusion.F2DEncode.execute(clip=clip, f2d=f2d, text="a photo of f l smiling", placeholder="f",
                                                   strength=1.0, face_crops=crops)[0]


def _instantbooth(model, clip, work: Path) -> tuple:
    import comfy.clip_vision
    import folder_paths
    from facebooth.devmodels.instantbooth_models import (
        TINY_CLIP_VISION,
        random_clip_vision_state_dict,
        random_instantbooth_model,
        tiny_checkpoint_layout,
    )
    from facebooth.nodes import instantbooth
    from facebooth.pipelines.instantbooth import save_instantbooth

    ib_dir = work / "ib"
    ib_dir.mkdir()
    save_instantbooth(random_instantbooth_model(tiny_checkpoint_layout(), seed=3, clip_config=TINY_CLIP_VISION, gate=0.5),
                      ib_dir / "ib.safetensors")
    folder_paths.folder_names_and_paths["facebooth/instantbooth"] = ([str(ib_dir)], {".safetensors"})
    cfg = work / "clip_vision.json"
    cfg.write_text(json.dumps({**TINY_CLIP_VISION, "model_type": "clip_vision_model"}))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(cfg))
    clip_vision.load_sd(dict(random_clip_vision_state_dict(TINY_CLIP_VISION, seed=0)))
    ib = instantbooth.InstantBoothLoader.execute(instantbooth_file="ib.safetensors")[0]
    patched, positive, _ = instantbooth.InstantBoothApply.execute(
        model=model, clip=clip, clip_vision=clip_vision, instantbooth=ib, text="a photo of sks man smiling", beta=0.3,
        alpha=0.4, start_at=0.0, end_at=1.0, apply_to="both", reference=torch.rand(4, 96, 96, 3))
    return patched, positive


def _portraitbooth(model, clip) -> tuple:
    from facebooth.devmodels.portraitbooth_models import random_postfuse
    from facebooth.nodes import portraitbooth
    from facebooth.pipelines.face.types import Face, FaceSet

    stea = portraitbooth._wrap(random_postfuse(feature_dim=512, seed=3, source="arcface", layers=("embedding",)), "random")
    face = Face(image_index=0, box=(0.0, 0.0, 64.0, 64.0), score=1.0, landmarks=torch.zeros(5, 2), mask=torch.ones(64, 64),
                embedding=torch.nn.functional.normalize(torch.randn(512), dim=0))
    faces = FaceSet(images=torch.rand(1, 64, 64, 3), faces=[face], missing=[])
    return model, portraitbooth.PortraitBoothConditioning.execute(stea, clip, faces, "a photo of a man smiling", "man", 0.2)[0]


def _personamagic(model, clip) -> tuple:
    from facebooth.nodes import personamagic
    from facebooth.pipelines.personamagic.files import PersonaMagicFile
    from facebooth.pipelines.personamagic.mapper import MapperConfig, PersonaMagicMapper
    from facebooth.pipelines.personamagic.stages import PRESETS

    word = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight[1710].detach().float().cpu().clone()
    torch.manual_seed(5)
    pm = PersonaMagicFile(mapper=PersonaMagicMapper(MapperConfig(image_dim=24), word).eval().requires_grad_(False),
                          plan=PRESETS["official"], family="sd1", image_embed=torch.randn(24))
    return tuple(personamagic.PersonaMagicApply.execute(model=model, clip=clip, personamagic=pm, prompt="a photo of <persona> smiling",
                                                        trigger_word="<persona>", bins=100, v_path=True))


def child(args) -> int:
    """One method in this (fresh) process: set it up through its node, then measure one sampling run."""
    root = Path(os.environ.get("COMFYUI_DIR") or "~/ComfyUI").expanduser()
    comfy = _import_comfy(root, args.device)
    mm = comfy.model_management

    from facebooth.devmodels.sd15_checkpoint import (
        TinySD15Config,
        checkpoint_name,
        write_random_sd15_checkpoint,
    )

    cache = Path(os.environ.get("FACEBOOTH_TEST_CACHE") or Path.home() / ".cache" / "facebooth-test").expanduser()
    ckpt = write_random_sd15_checkpoint(cache / "checkpoints" / checkpoint_name(0), TinySD15Config(seed=0))
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        model, clip, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:3]
        m, positive = _setup_method(args.child, comfy, model, clip, Path(tmp))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, args.px // 8, args.px // 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        mm.unload_all_models()  # the run loads what it needs itself
        mm.soft_empty_cache()

        def run() -> None:
            comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=0)

        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            with PeakRSS() as rss:
                run()
            peak, start = rss.peak, rss.start
    print("CHILD " + json.dumps({"name": args.child, "peak": peak, "start": start}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["small"], default="small")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(os.environ.get("COMFYUI_DIR") or "~/ComfyUI").expanduser()
    if not (root / "comfy" / "sd.py").is_file():
        print("set COMFYUI_DIR to a ComfyUI source tree", file=sys.stderr)
        return 2
    if args.child:
        return child(args)
    peaks: dict[str, list[int]] = {}
    for name in ["plain", *METHODS[1:], "plain"]:  # each in a fresh process; plain first and last (drift check)
        cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--px", str(args.px),
               "--threads", str(args.threads), "--child", name]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((l for l in run.stdout.splitlines() if l.startswith("CHILD ")), None)
        if run.returncode or line is None:
            print(run.stdout[-2000:] + run.stderr[-4000:], file=sys.stderr)
            return 1
        data = json.loads(line[6:])
        peaks.setdefault(name, []).append(data["peak"])
        print(f"{name:15s} peak {data['peak'] / 2**20:9.1f} MiB (+{(data['peak'] - data['start']) / 2**20:7.1f} MiB during sampling)",
              flush=True)
    plain = max(peaks["plain"])
    unit = "cuda_max_allocated" if args.device == "cuda" else "cpu_rss"
    print(f"device {args.device}, {args.px} px, {args.steps} steps; plain runs {[round(p / 2**20, 1) for p in peaks['plain']]} MiB")
    for name in METHODS[1:]:
        print(f"RESULT memory_{name}_over_plain_{unit} {max(peaks[name]) / plain:.3f} target <= 1.25")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
