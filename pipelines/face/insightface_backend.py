"""InsightFace (onnxruntime) detection and ArcFace recognition behind FaceBooth's detector/recognizer protocols.

insightface and onnxruntime are optional: they are imported when a backend is built, never when this module
is imported, so a missing or broken install disables this backend only, with a message saying what to install.

Conventions bridged here: FaceBooth images are (H, W, 3) float RGB in [0, 1]; insightface takes BGR uint8
(OpenCV order) and swaps to RGB itself before running its models.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .insightface_layout import InsightFacePackError, locate_pack
from .types import DetectedFace

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "Install it into ComfyUI's Python with `pip install insightface onnxruntime` (on NVIDIA GPUs use "
    "onnxruntime-gpu instead of onnxruntime, never both), then restart ComfyUI. Or choose the PyTorch "
    "face-analysis backend, which needs neither."
)
CPU = "CPUExecutionProvider"
# What users pick in a node -> onnxruntime's provider name
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = ("CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML")
_PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu (pip uninstall onnxruntime, then pip install onnxruntime-gpu that "
                             "matches your CUDA and cuDNN)",
    "TensorrtExecutionProvider": "onnxruntime-gpu with TensorRT installed",
    "ROCMExecutionProvider": "AMD's onnxruntime-rocm build for your ROCm version",
    "DmlExecutionProvider": "onnxruntime-directml (Windows)",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "CoreMLExecutionProvider": "the standard onnxruntime wheel on macOS",
}
_MODULES = ["detection", "recognition"]  # skip landmark/genderage models: faster load, less memory
_EMBED_CHUNK = 32


class InsightFaceUnavailableError(ImportError):
    """insightface or onnxruntime cannot be imported; the message says what to install."""


class InsightFaceLoadError(RuntimeError):
    """The pack's files are in place but insightface/onnxruntime could not load them."""


def import_insightface():
    """(onnxruntime module, insightface.app.FaceAnalysis) or InsightFaceUnavailableError."""
    try:
        import onnxruntime
    except Exception as exc:  # ImportError, or a DLL / ABI error raised while loading the wheel
        if isinstance(exc, ModuleNotFoundError) and exc.name == "onnxruntime":
            what = "onnxruntime is not installed."
        else:
            what = f"onnxruntime is installed but failed to load ({type(exc).__name__}: {exc})."
        raise InsightFaceUnavailableError(f"The InsightFace backend is unavailable: {what} {INSTALL_HINT}") from exc
    try:
        import insightface  # noqa: F401
        from insightface.app import FaceAnalysis
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "insightface":
            what = "insightface is not installed."
        else:
            what = f"insightface is installed but failed to import ({type(exc).__name__}: {exc})."
            if "numpy" in str(exc):
                what += " This usually means it was built for another numpy: `pip install --force-reinstall insightface`."
        raise InsightFaceUnavailableError(f"The InsightFace backend is unavailable: {what} {INSTALL_HINT}") from exc
    return onnxruntime, FaceAnalysis


def resolve_providers(requested: str | Iterable[str] | None, available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Map friendly names (CPU, CUDA, ROCM, DirectML, OpenVINO, CoreML) or onnxruntime names to the providers
    this onnxruntime has, in the requested order, always ending with CPU as the fallback.

    Returns (providers, warnings); each warning is also logged.
    """
    items = [requested] if isinstance(requested, str) else list(requested or [])
    by_lower = {p.lower(): p for p in list(PROVIDER_ALIASES.values()) + list(available)}
    chosen: list[str] = []
    warnings: list[str] = []
    for item in items:
        key = str(item).strip()
        full = PROVIDER_ALIASES.get(key.lower()) or by_lower.get(key.lower())
        if full is None:
            warnings.append(
                f"Unknown onnxruntime provider {key!r}; use one of {', '.join(PROVIDER_CHOICES)}. Running on CPU instead."
            )
        elif full not in available:
            package = _PROVIDER_PACKAGES.get(full, "an onnxruntime build that includes it")
            warnings.append(
                f"onnxruntime provider {full} ({key}) is not available in this onnxruntime (it has: "
                f"{', '.join(available) or 'none'}); InsightFace runs on CPU instead, which is slower. "
                f"For {key} install {package}."
            )
        elif full not in chosen:
            chosen.append(full)
    if CPU in available and CPU not in chosen:
        chosen.append(CPU)
    if not chosen:
        raise InsightFaceUnavailableError(f"onnxruntime reports no usable provider (it has {list(available)}). {INSTALL_HINT}")
    for w in warnings:
        log.warning("FaceBooth: %s", w)
    return chosen, warnings


def retry_sizes(det_size: int) -> list[int]:
    """Smaller detector sizes to try when nothing is found (very large, close-up faces): 640 -> 480, 320."""
    sizes = []
    for s in (det_size * 3 // 4, det_size // 2):
        s = s // 32 * 32
        if 160 <= s < det_size and s not in sizes:
            sizes.append(s)
    return sizes


def _to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(arr[..., ::-1])


class InsightFaceBackend:
    """An insightface pack (antelopev2, buffalo_l, ...) as a FaceDetector and a FaceRecognizer."""

    def __init__(
        self,
        roots: Sequence[str],
        pack: str = "antelopev2",
        providers: str | Sequence[str] = ("CPU",),
        det_size: int = 640,
        det_thresh: float = 0.5,
        retry_smaller: bool = True,
    ) -> None:
        """``roots``: the ``insightface`` model-folder paths. ``det_size``: detector input side (multiple of 32).
        ``retry_smaller``: when nothing is found, try again at smaller detector sizes (see ``retry_sizes``)."""
        if not isinstance(det_size, int) or det_size % 32 or not 64 <= det_size <= 2048:
            raise ValueError(f"det_size must be a multiple of 32 between 64 and 2048; got {det_size!r}. 640 is standard.")
        if not 0.0 < float(det_thresh) < 1.0:
            raise ValueError(f"det_thresh must be between 0 and 1; got {det_thresh!r}. 0.5 is standard.")
        ort, FaceAnalysis = import_insightface()
        self.providers, self.warnings = resolve_providers(providers, list(ort.get_available_providers()))
        self.location = locate_pack(roots, pack)
        self.pack = pack
        self.det_size = det_size
        self.det_thresh = float(det_thresh)
        self.retry_smaller = retry_smaller
        try:
            # The absolute pack dir as name: insightface then cannot pick up a same-named folder in the working
            # directory (2.x) and still resolves it under root (0.7.x joins root/models/<absolute> -> absolute).
            app = FaceAnalysis(
                name=self.location.pack_dir, root=self.location.root, allowed_modules=_MODULES, providers=self.providers
            )
            app.prepare(ctx_id=0, det_thresh=self.det_thresh, det_size=(det_size, det_size))
        except AssertionError as exc:
            raise InsightFacePackError(
                f"insightface found no face detection model it can use in {self.location.pack_dir} "
                f"(its SCRFD detector with 5 landmarks, e.g. det_10g.onnx / scrfd_10g_bnkps.onnx). Replace the pack "
                f"with an original download."
            ) from exc
        except Exception as exc:
            raise InsightFaceLoadError(
                f"insightface could not load the '{pack}' pack from {self.location.pack_dir} with providers "
                f"{self.providers}: {type(exc).__name__}: {exc}. If a file is damaged, download the pack again; if the "
                f"error names a provider, choose CPU."
            ) from exc
        if "recognition" not in app.models:
            raise InsightFacePackError(
                f"insightface found no face recognition model in {self.location.pack_dir} (expected glintr100.onnx "
                f"or w600k_*.onnx with a 112x112 input). Download the pack again."
            )
        self._app = app
        self._det = app.models["detection"]
        self._rec = app.models["recognition"]
        if not getattr(self._det, "use_kps", True):
            raise InsightFacePackError(
                f"The detector {self._det.model_file} gives no facial landmarks, which alignment needs. "
                "Use a pack whose detector has keypoints (antelopev2's scrfd_10g_bnkps.onnx or buffalo_l's det_10g.onnx)."
            )
        self.input_size = int(self._rec.input_size[0])
        self.embedding_dim = int(self._rec.output_shape[-1])
        self.name = f"insightface/{pack}/{Path(self._rec.model_file).stem}"
        batch = self._rec.input_shape[0]
        self._batched = not (isinstance(batch, int) and batch == 1)
        log.info("FaceBooth: InsightFace '%s' loaded from %s on %s", pack, self.location.pack_dir, self.providers)

    # FaceDetector
    def detect(self, image: torch.Tensor) -> list[DetectedFace]:
        """All faces in one (H, W, 3) RGB image in [0, 1]; boxes and landmarks in that image's pixels."""
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[-1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"InsightFace detect expects one (H, W, 3) RGB image; got {shape}.")
        bgr = _to_bgr_uint8(image)
        sizes = [self.det_size] + (retry_sizes(self.det_size) if self.retry_smaller else [])
        boxes, kpss = np.zeros((0, 5), np.float32), None
        for size in sizes:
            # insightface scales the image into size x size and maps results back to the original pixels
            boxes, kpss = self._det.detect(bgr, input_size=(size, size), max_num=0)
            if len(boxes):
                if size != self.det_size:
                    log.info("FaceBooth: InsightFace found a face only at detection size %d", size)
                break
        return [
            DetectedFace(
                box=tuple(float(v) for v in boxes[i, :4]),
                score=float(boxes[i, 4]),
                landmarks=torch.from_numpy(np.array(kpss[i], dtype=np.float32).reshape(5, 2)),
            )
            for i in range(len(boxes))
        ]

    # FaceRecognizer
    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        """(N, 112, 112, 3) ArcFace-aligned RGB crops in [0, 1] -> (N, 512) L2-normalised embeddings."""
        if aligned.dim() == 3:
            aligned = aligned[None]
        s = self.input_size
        if aligned.dim() != 4 or tuple(aligned.shape[1:]) != (s, s, 3):
            raise ValueError(
                f"InsightFace embed expects aligned crops of shape (N, {s}, {s}, 3); got {tuple(aligned.shape)}. "
                f"Use the 'arcface_112' crops."
            )
        if aligned.shape[0] == 0:
            return torch.zeros(0, self.embedding_dim)
        crops = [_to_bgr_uint8(c) for c in aligned]
        feats = []
        step = _EMBED_CHUNK if self._batched else 1
        for i in range(0, len(crops), step):
            feats.append(np.asarray(self._rec.get_feat(crops[i : i + step]), dtype=np.float32).reshape(-1, self.embedding_dim))
        return F.normalize(torch.from_numpy(np.concatenate(feats)), dim=-1)
