"""Face analysis per image: FaceBooth's PyTorch pipeline against insightface's FaceAnalysis, side by side.

    python benchmarks/bench_face_analysis.py [--reps 5] [--det-size 640]

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
cost and other jobs on a shared machine do not leak in), ABBA per repetition, ratio of medians. Cold start
(imports, loading, first image; wall clock) and peak memory (VmHWM) are measured in fresh processes.
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


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cold(which: str, det_size: int, paths: list[str], kps: list) -> None:
    """A fresh process: import the stack, load the models, analyse the 512 photo once (same face both sides)."""
    start = time.perf_counter()
    import numpy as np
    from PIL import Image
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()))
    t0 = time.perf_counter()
    root, pth, mtcnn = (Path(p) for p in paths)
    if which == "ours":
        import torch

        torch.set_num_threads(1)
        ours = build_ours(mtcnn, pth, det_size)
        n = len(ours.analyze(torch.from_numpy(rgb.copy()).float() / 255.0, select="all", no_face="skip").faces)
    else:
        app = build_insightface(root)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        n = len(run_insightface(app, bgr, [(np.zeros(4, np.float32), np.asarray(k, np.float32)) for k in kps]))
    elapsed = time.perf_counter() - t0
    print(json.dumps({"which": which, "seconds": elapsed, "peak_rss_mb": _peak_rss_mb(), "faces": n,
                      "setup_s": t0 - start}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="ABBA repetitions per image")
    p.add_argument("--det-size", type=int, default=640, help="our detection size cap (long side), like insightface's det_size")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only: onnxruntime runs on CPU here")
    p.add_argument("--cold", choices=["ours", "insightface"], help=argparse.SUPPRESS)
    p.add_argument("--cold-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cold:
        extra = json.loads(args.cold_args)
        cold(args.cold, args.det_size, extra["paths"], extra["kps"])
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

    colds = {}
    for which in ("ours", "insightface"):
        extra = json.dumps({"paths": [str(root), str(pth), str(mtcnn)], "kps": cold_kps})
        out = subprocess.run([sys.executable, __file__, "--cold", which, "--det-size", str(args.det_size), "--cold-args", extra],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        colds[which] = json.loads(out.stdout.strip().splitlines()[-1])
        c = colds[which]
        print(f"cold start {which:11s} {c['seconds']:.2f} s (imports + load + first 512 photo), peak RSS {c['peak_rss_mb']:.0f} MB")
    for name, r in ratios.items():
        print(f"RESULT face_analysis_{name}_ours_over_insightface {r:.2f} target <= 1.0")
    print(f"RESULT face_analysis_cold_start_ours_over_insightface {colds['ours']['seconds'] / colds['insightface']['seconds']:.2f} target <= 1.0")
    print(f"RESULT face_analysis_peak_rss_ours_over_insightface {colds['ours']['peak_rss_mb'] / colds['insightface']['peak_rss_mb']:.2f} target <= 1.0")


if __name__ == "__main__":
    main()
