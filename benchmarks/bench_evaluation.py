"""Images scored per second by ``facebooth eval`` against the bare forward passes of the same models on the
same images.

    python benchmarks/bench_evaluation.py [--device cpu|cuda] [--size small|full] [--images N] [--repeats R]

Ours: ``evaluate_items`` over a folder of N PNG photos (512 px variants of skimage's astronaut, so MTCNN finds
the face; a quarter are noise images without one), 4 distinct prompts, one reference: decode, detect, align,
ArcFace, CLIP image + text, CLIP-I and the bookkeeping, batched by 16. Baseline: the same networks on the same
images already decoded and preprocessed in memory: MTCNN on each image, ArcFace on the aligned crops and
CLIP's image tower on the preprocessed pixels (batches of 16), CLIP's text tower once per distinct prompt.
Models: facenet-pytorch's real MTCNN, random ArcFace (iresnet-50 at --size full, iresnet-18 small) and random
OpenAI-layout CLIP (ViT-B-32-quickgelu full size; a 4-layer ViT at small). Interleaved A/B, medians of R
repeats, process CPU time on CPU. The rest of our time is split by timing each non-network step alone on the
same images: PNG decode, CLIP preprocessing (PIL resize + crop + normalise), ArcFace alignment.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timing import paired
from timing import timed as measure  # benchmarks/timing.py (on sys.path as a script)


def make_run(folder: Path, n: int) -> tuple[list, Path]:
    from skimage import data

    from facebooth.pipelines.evaluation.runs import read_run

    photo = Image.fromarray(data.astronaut())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if i % 4 == 3:
            im = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
        else:
            box = (int(rng.integers(0, 60)), int(rng.integers(0, 60)), 0, 0)
            im = photo.crop((box[0], box[1], box[0] + 452, box[1] + 452)).resize((512, 512), Image.BICUBIC)
            if i % 2:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im.save(folder / f"{i:03d}.png")
        rows.append({"file": f"{i:03d}.png", "prompt": ["S* on the beach", "S* with a sad expression",
                                                          "S* latte art", "S* in the snow"][i % 4], "face": "ref.png"})
    photo.save(folder / "ref.png")
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_run(folder), folder / "ref.png"


def build_models(size: str, device: str, tmp: Path):
    import open_clip
    from safetensors.torch import save_file

    from facebooth.devmodels.face_models import copy_or_write_mtcnn, write_random_arcface
    from facebooth.pipelines.evaluation.clip_score import load_clip_scorer
    from facebooth.pipelines.face.analyzer import FaceAnalyzer
    from facebooth.pipelines.face.arcface import load_arcface
    from facebooth.pipelines.face.mtcnn import load_mtcnn

    copy_or_write_mtcnn(tmp / "mtcnn")
    arc = write_random_arcface(tmp / "arcface.pth", depth=50 if size == "full" else 18)
    if size == "full":
        name, cfg = "ViT-B-32-quickgelu", None
    else:
        cfg = tmp / "BenchTinyCLIP.json"
        cfg.write_text(json.dumps({"embed_dim": 256, "quick_gelu": True,
                                   "vision_cfg": {"image_size": 224, "layers": 4, "width": 384, "patch_size": 32},
                                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}))
        open_clip.add_model_config(cfg)
        name = "BenchTinyCLIP"
    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "clip.safetensors"))
    del model
    clip = load_clip_scorer(name, tmp / "clip.safetensors", config=cfg, device=device)
    clip.batch_size = 16
    analyzer = FaceAnalyzer(detector=load_mtcnn(tmp / "mtcnn", device=device), recognizer=load_arcface(arc, device=device))
    return clip, analyzer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from facebooth.pipelines.evaluation.evaluate import evaluate_items
    from facebooth.pipelines.evaluation.identity import IdentityScorer, pil_to_tensor
    from facebooth.pipelines.evaluation.protocols import load_protocol
    from facebooth.pipelines.face.align import CROP_SIZES, crop_matrix, warp_affine
    from facebooth.pipelines.face.analyzer import select_faces

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    items, _ = make_run(tmp, args.images)
    clip, analyzer = build_models(args.size, args.device, tmp)
    protocol = load_protocol("custom")
    identity = IdentityScorer(analyzer)

    # --- what the baseline gets for free: decoded, preprocessed, aligned, in memory
    pils = [Image.open(it.file).convert("RGB") for it in items]
    tensors = [pil_to_tensor(p).to(args.device) for p in pils]
    pixels = clip.pixels(pils)
    faces = [select_faces(analyzer.detect(t), "largest", 0) for t in tensors]
    crops = torch.stack([warp_affine(t.cpu(), crop_matrix("arcface_112", f[0].landmarks), CROP_SIZES["arcface_112"])
                         for t, f in zip(tensors, faces) if f])
    sentences = sorted({protocol.text_prompt(it.prompt) for it in items})
    print(f"{len(items)} images, {len(crops)} with a face, {len(sentences)} prompts; CLIP {clip.name}, "
          f"ArcFace {analyzer.recognizer_name}, device {args.device}, size {args.size}")

    def bare() -> None:
        with torch.no_grad():
            for t in tensors:
                analyzer.detector.detect(t)
            for s in range(0, len(crops), 16):
                analyzer.recognizer.embed(crops[s:s + 16])
            for s in range(0, len(pixels), 16):
                clip.model.encode_image(pixels[s:s + 16].to(args.device))
            clip.model.encode_text(clip.tokenizer(sentences).to(args.device))
            clip.model.encode_image(pixels[:1].to(args.device))  # the reference's CLIP-I features

    def ours() -> None:
        rows = evaluate_items(items, protocol, clip, identity, batch_size=16)
        assert len(rows) == len(items)

    t_ours, t_bare = paired(ours, bare, args.repeats, args.device, cpu_clock=time.process_time, abba=False)
    o, b = statistics.median(t_ours), statistics.median(t_bare)

    # --- where the rest goes: each non-network step alone on the same images
    def timed(fn) -> float:
        return measure(fn, args.device, time.process_time)

    decode = timed(lambda: [Image.open(it.file).convert("RGB") for it in items])
    prep = timed(lambda: clip.pixels(pils))
    to_t = timed(lambda: [pil_to_tensor(p) for p in pils])
    align = timed(lambda: [warp_affine(t.cpu(), crop_matrix("arcface_112", f[0].landmarks), CROP_SIZES["arcface_112"])
                           for t, f in zip(tensors, faces) if f])
    n = len(items)
    print(f"ours: {n / o:.2f} images/s ({1000 * o / n:.1f} ms/image); bare forwards: {n / b:.2f} images/s ({1000 * b / n:.1f} ms/image)")
    rest = o - b
    print(f"difference {1000 * rest / n:.1f} ms/image; measured alone per image: PNG decode {1000 * decode / n:.1f} ms, "
          f"CLIP preprocessing {1000 * prep / n:.1f} ms, image to tensor {1000 * to_t / n:.1f} ms, ArcFace alignment "
          f"{1000 * align / n:.1f} ms (the reference is decoded, detected and embedded once, also ours only)")
    print(f"RESULT eval_images_per_s_over_bare_forward {b / o:.3f} target >= 0.8")


if __name__ == "__main__":
    main()
