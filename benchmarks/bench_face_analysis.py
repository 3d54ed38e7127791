"""Face analysis per image: FaceBooth's PyTorch pipeline against insightface's FaceAnalysis, side by side.

    python benchmarks/bench_face_analysis.py [--reps 5] [--cold-reps 1] [--det-size 640]

Both sides run the real architectures with one CPU thread each:

* ours: MTCNN with facenet-pytorch's real weights (they ship in its wheel), IResNet-50 ArcFace with random
  weights, and everything Detect Faces does per image (detect, select all faces, the three aligned crops
  ArcFace 112 / CLIP 224 / FFHQ 512, identity embeddings; masks are built lazily, so not here).
* insightface: FaceAnalysis with buffalo_l's layout: SCRFD-10G-KPS (``det_10g.onnx``) at det_size 640 and the
  same IResNet-50 weights exported to ``w600k_r50.onnx``, on onnxruntime: ``det_model.detect`` then
  ``rec_model.get`` per face, which is what ``FaceAnalysis.get`` runs for these two models.

A random SCRFD finds no faces, so after insightface's detector network has run, insightface is given the faces
our MTCNN found (same boxes and landmarks): both sides then align and embed the same faces. The detector
networks themselves both run on every image.

Images: scikit-image's astronaut (512x512, and resized to 1024x1024 and 2048x2048) and insightface's group
photo t1.jpg (1280x886). Per-image figures are process CPU time (both sides run one thread, so CPU time is their
cost and other jobs on a shared machine do not leak in), ABBA per repetition, ratio of medians.

Cold start (imports, loading, first 512 photo) and peak memory (VmHWM, which counts every resident page, shared
libraries and mapped files included) are measured the same way for both sides, in fresh processes, ABBA: the
time as process CPU time (wall clock printed too; it is unreliable on a shared machine), the peak as the largest
of the runs. Twice: in a bare Python process (ours then pays for importing torch, which insightface does not
need; its share is printed), and in a process that has already imported torch, as every node of ComfyUI runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FACEBOOTH_BENCH_CACHE", Path.home() / ".cache" / "facebooth" / "bench_face_analysis"))
ARCFACE_SEED = 7


def _ensure_package() -> None:
    try:
        import facebooth  # noqa: F401
    except ImportError:  # run from a checkout without the editable install
        sys.path.insert(0, str(REPO.parent))


def model_files() -> tuple[Path, Path, Path]:
    """(insightface root, ArcFace .pth, MTCNN folder); built once into the cache folder."""
    _ensure_package()
    from facebooth.devmodels.face_models import facenet_pytorch_data_dir, random_arcface_state_dict
    from facebooth.devmodels.insightface_packs import write_real_architecture_pack
    from facebooth.devmodels import save_official_pickle

    pth = CACHE / "arcface_r50_random.pth"
    root = CACHE / "insightface"
    if not pth.is_file() or not (root / "models" / "buffalo_l" / "w600k_r50.onnx").is_file():
        state = random_arcface_state_dict(50, seed=ARCFACE_SEED)
        write_real_architecture_pack(root, arcface_state=state)
        save_official_pickle(state, pth)
    mtcnn = facenet_pytorch_data_dir()
    if mtcnn is None:
        raise SystemExit("facenet-pytorch is needed for its real MTCNN weights: pip install facenet-pytorch --no-deps")
    return root, pth, mtcnn


def photos() -> dict[str, "object"]:
    """name -> (H, W, 3) uint8 RGB numpy array."""
    import numpy as np
    from PIL import Image
    from skimage import data

    import insightface

    astro = Image.fromarray(data.astronaut())
    t1 = Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB")
    return {
        "512": np.asarray(astro),
        "group_t1": np.asarray(t1),
        "1024": np.asarray(astro.resize((1024, 1024), Image.BICUBIC)),
        "2048": np.asarray(astro.resize((2048, 2048), Image.BICUBIC)),
    }


def build_ours(mtcnn: Path, pth: Path, det_size: int):
    _ensure_package()
    from facebooth.pipelines.face.analyzer import FaceAnalyzer
    from facebooth.pipelines.face.arcface import load_arcface
    from facebooth.pipelines.face.mtcnn import load_mtcnn

    try:
        return FaceAnalyzer(detector=load_mtcnn(mtcnn), recognizer=load_arcface(pth, channels_last=True), det_size=det_size)
    except TypeError:  # before the detection size cap existed (for measuring the old code)
        return FaceAnalyzer(detector=load_mtcnn(mtcnn), recognizer=load_arcface(pth, channels_last=True))


def build_insightface(root: Path):
    import onnxruntime as ort
    from insightface.app import FaceAnalysis

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    app = FaceAnalysis(name="buffalo_l", root=str(root), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"], sess_options=so)
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


def run_insightface(app, bgr, faces) -> list:
    """FaceAnalysis.get for detection + recognition, with our faces in place of the random detector's none."""
    from insightface.app.common import Face

    boxes, _ = app.det_model.detect(bgr, max_num=0, metric="default")
    assert len(boxes) == 0, "the random SCRFD should find nothing"
    out = []
    for box, kps in faces:
        face = Face(bbox=box, kps=kps, det_score=1.0)
        app.models["recognition"].get(bgr, face)
        out.append(face)
    return out


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cold(which: str, det_size: int, paths: list[str], kps: list, host: str) -> None:
    """A fresh process: import the stack, load the models, analyse the 512 photo once (same face both sides).

    ``host="torch"``: torch is imported first, untimed, as in ComfyUI (every node pack, insightface-based ones
    included, runs in a process that has torch loaded before any node runs). ``host="none"``: a bare Python.
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()))
    if host == "torch":
        import torch  # noqa: F401
    base_rss = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    root, pth, mtcnn = (Path(p) for p in paths)
    torch_import = None
    if which == "ours":
        import torch

        if host == "none":  # what torch's own import costs: ours cannot run without it, insightface does not need it
            torch_import = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                            "rss_mb": _status_mb("VmRSS") - base_rss}
        torch.set_num_threads(1)
        ours = build_ours(mtcnn, pth, det_size)
        n = len(ours.analyze(torch.from_numpy(rgb.copy()).float() / 255.0, select="all", no_face="skip").faces)
    else:
        app = build_insightface(root)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        n = len(run_insightface(app, bgr, [(np.zeros(4, np.float32), np.asarray(k, np.float32)) for k in kps]))
    print(json.dumps({"which": which, "host": host, "seconds": time.perf_counter() - t0,
                      "cpu_seconds": time.process_time() - c0, "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base_rss,
                      "faces": n, "torch_import": torch_import}))


def cold_starts(det_size: int, extra: str, host: str, reps: int) -> dict[str, dict]:
    """Fresh processes ABBA; per side the median time and the largest peak memory."""
    runs: dict[str, list] = {"ours": [], "insightface": []}
    for _ in range(reps):
        for which in ("ours", "insightface", "insightface", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "--cold", which, "--cold-host", host, "--det-size", str(det_size), "--cold-args", extra],
                capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {}
    for which, rs in runs.items():
        result[which] = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "base_rss_mb")}
        result[which]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        imports = [r["torch_import"] for r in rs if r["torch_import"]]
        if imports:
            result[which]["torch_import"] = {k: statistics.median(i[k] for i in imports) for k in imports[0]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="ABBA repetitions per image")
    p.add_argument("--det-size", type=int, default=640, help="our detection size cap (long side), like insightface's det_size")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only: onnxruntime runs on CPU here")
    p.add_argument("--cold-reps", type=int, default=1, help="ABBA repetitions of the fresh-process cold starts")
    p.add_argument("--cold", choices=["ours", "insightface"], help=argparse.SUPPRESS)
    p.add_argument("--cold-host", choices=["none", "torch"], default="none", help=argparse.SUPPRESS)
    p.add_argument("--cold-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cold:
        extra = json.loads(args.cold_args)
        cold(args.cold, args.det_size, extra["paths"], extra["kps"], args.cold_host)
        return

    import numpy as np
    import torch

    torch.set_num_threads(1)
    root, pth, mtcnn = model_files()
    ours = build_ours(mtcnn, pth, args.det_size)
    app = build_insightface(root)
    print("insightface detector: random SCRFD-10G-KPS network runs; it finds nothing, so insightface aligns and "
          "embeds the faces our MTCNN found (same boxes and landmarks).")
    ratios = {}
    cold_kps: list = []
    for name, rgb in photos().items():
        image = torch.from_numpy(rgb.copy()).float() / 255.0
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        found = ours.analyze(image, select="all", no_face="skip")
        faces = [(np.array(f.box, np.float32), f.landmarks.numpy().astype(np.float32)) for f in found.faces]
        theirs = run_insightface(app, bgr, faces)
        if name == "512":
            cold_kps = [k.tolist() for _, k in faces]
        cos = [float(np.dot(f.embedding.numpy(), t.embedding / np.linalg.norm(t.embedding))) for f, t in zip(found.faces, theirs)]
        times = {"ours": [], "insightface": []}

        def a(image=image, times=times):  # loop values bound now (B023)
            t = time.process_time()
            ours.analyze(image, select="all", no_face="skip")
            times["ours"].append(time.process_time() - t)

        def b(bgr=bgr, faces=faces, times=times):
            t = time.process_time()
            run_insightface(app, bgr, faces)
            times["insightface"].append(time.process_time() - t)

        for _ in range(args.reps):
            a(), b(), b(), a()
        mo, mi = statistics.median(times["ours"]), statistics.median(times["insightface"])
        ratios[name] = mo / mi
        h, w = rgb.shape[:2]
        print(f"{name:9s} {w}x{h}  faces {len(faces)}  ours {mo * 1000:7.1f} ms  insightface {mi * 1000:7.1f} ms (CPU)  "
              f"ratio {mo / mi:.2f}  embedding cosine ours-vs-insightface min {min(cos) if cos else float('nan'):.4f}")

    extra = json.dumps({"paths": [str(root), str(pth), str(mtcnn)], "kps": cold_kps})
    colds = {host: cold_starts(args.det_size, extra, host, args.cold_reps) for host in ("none", "torch")}
    for host, label in (("none", "fresh Python process"), ("torch", "process with torch already imported (as ComfyUI)")):
        for which in ("ours", "insightface"):
            c = colds[host][which]
            print(f"cold start, {label}: {which:11s} {c['cpu_seconds']:.2f} s CPU ({c['seconds']:.2f} s wall) for imports + load + "
                  f"first 512 photo; peak RSS {c['peak_rss_mb']:.0f} MB (process before: {c['base_rss_mb']:.0f} MB)")
    ti = colds["none"]["ours"].get("torch_import")
    if ti:
        print(f"of which torch's own import (ours only): {ti['cpu_seconds']:.2f} s CPU ({ti['seconds']:.2f} s wall), "
              f"+{ti['rss_mb']:.0f} MB RSS")
    for name, r in ratios.items():
        print(f"RESULT face_analysis_{name}_ours_over_insightface {r:.2f} target <= 1.0")
    for host, suffix in (("none", ""), ("torch", "_in_torch_host")):
        o, i = colds[host]["ours"], colds[host]["insightface"]
        print(f"RESULT face_analysis_cold_start{suffix}_ours_over_insightface {o['cpu_seconds'] / i['cpu_seconds']:.2f} "
              f"target <= 1.0 (CPU time; wall {o['seconds'] / i['seconds']:.2f})")
        print(f"RESULT face_analysis_peak_rss{suffix}_ours_over_insightface {o['peak_rss_mb'] / i['peak_rss_mb']:.2f} target <= 1.0")

if __name__ == "__main__":
    main()
