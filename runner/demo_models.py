"""The embedded default models: the random SD1.5 / SDXL checkpoints and random face models.

They are generated once into a cache folder (``$FACEBOOTH_CACHE`` or ``~/.cache/facebooth``), keyed by the
code that writes them, and linked into a run's ComfyUI base dir by runner/local_setup.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FACEBOOTH_CACHE") or Path.home() / ".cache" / "facebooth").expanduser()



def cached_random_checkpoint(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Path of the random SD1.5 checkpoint in the cache, generated on first use (about a minute on CPU)."""
    from ..devmodels.sd15_checkpoint import TinySD15Config, checkpoint_name, write_random_sd15_checkpoint

    path = Path(cache_dir or default_cache_dir()) / "checkpoints" / checkpoint_name(seed)
    return write_random_sd15_checkpoint(path, TinySD15Config(seed=seed))


def cached_random_sdxl_checkpoint(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Path of the random SDXL-family checkpoint (~1.8 GB) in the cache, generated on first use (minutes on CPU)."""
    from ..devmodels.sdxl_checkpoint import TinySDXLConfig, checkpoint_name, write_random_sdxl_checkpoint

    path = Path(cache_dir or default_cache_dir()) / "checkpoints" / checkpoint_name(seed)
    return write_random_sdxl_checkpoint(path, TinySDXLConfig(seed=seed))


@dataclass
class DemoModel:
    """One random face model the runner writes: where (relative to models/), which placeholder names it."""

    relpath: str
    placeholder: str | None
    value: str | None
    write: Callable[[Path], object]
    sources: tuple[str, ...]  # module files whose content decides the weights (cache key)


def _face_models(seed: int) -> list[DemoModel]:
    from ..devmodels import face_models
    from ..pipelines.face import arcface, mtcnn

    name = "arcface_random_r18.safetensors"
    return [
        DemoModel(f"facebooth/face/{name}", "ARCFACE", name, lambda p: face_models.write_random_arcface(p, seed=seed),
                  (face_models.__file__, arcface.__file__)),
        DemoModel("facebooth/face/mtcnn", None, None, lambda p: face_models.copy_or_write_mtcnn(p, seed=seed),
                  (face_models.__file__, mtcnn.__file__)),
    ]


def _insightface_pack(seed: int) -> list[DemoModel]:
    from ..devmodels import insightface_packs
    import onnx  # noqa: F401  (the writer needs it)

    return [DemoModel("insightface/models/antelopev2", "INSIGHTFACE_PACK", "antelopev2",
                      lambda p: insightface_packs.write_pack_files(p, "antelopev2", seed=seed),
                      (insightface_packs.__file__,))]


def _face2diffusion_models(seed: int) -> list[DemoModel]:
    from ..devmodels import face2diffusion_models as f2d_models
    from ..pipelines.face2diffusion import mapping as f2d_mapping, msid as f2d_msid

    return [
        DemoModel("facebooth/face2diffusion/msid.pt", "F2D_MSID", "msid.pt",
                  lambda p: f2d_models.write_random_msid(p, seed=seed), (f2d_models.__file__, f2d_msid.__file__)),
        DemoModel("facebooth/face2diffusion/mapping.pt", "F2D_MAPPING", "mapping.pt",
                  lambda p: f2d_models.write_random_mapping(p, seed=seed), (f2d_models.__file__, f2d_mapping.__file__)),
    ]


def _instantbooth_models(seed: int) -> list[DemoModel]:
    from ..devmodels import instantbooth_models

    return [DemoModel(**spec) for spec in instantbooth_models.demo_models(seed)]


def _portraitbooth_models(seed: int) -> list[DemoModel]:
    from ..devmodels import portraitbooth_models as pb_models
    from ..devmodels import sd15_checkpoint as sd15
    from ..pipelines.portraitbooth import fastcomposer_loading as pb_loading, stea as pb_stea

    return [
        DemoModel(f"facebooth/portraitbooth/{pb_models.FASTCOMPOSER_FILE}", "FASTCOMPOSER", pb_models.FASTCOMPOSER_FILE,
                  lambda p: pb_models.write_random_fastcomposer(p, seed=seed),
                  (pb_models.__file__, pb_stea.__file__, pb_loading.__file__, sd15.__file__)),
        DemoModel(f"facebooth/portraitbooth/{pb_models.STEA_FILE}", "PORTRAITBOOTH_STEA", pb_models.STEA_FILE,
                  lambda p: pb_models.write_random_stea(p, seed=seed), (pb_models.__file__, pb_stea.__file__)),
    ]


# Each method's random models; a method whose modules (or optional packages) do not import is left out.
_DEMO_MODEL_SETS: list[tuple[str, Callable[[int], list[DemoModel]]]] = [
    ("ArcFace/MTCNN", _face_models),
    ("insightface pack", _insightface_pack),
    ("Face2Diffusion", _face2diffusion_models),
    ("InstantBooth", _instantbooth_models),
    ("PortraitBooth", _portraitbooth_models),
]


def _demo_models(seed: int) -> list[DemoModel]:
    models: list[DemoModel] = []
    for what, build in _DEMO_MODEL_SETS:
        try:
            models.extend(build(seed))
        except ImportError as exc:
            log.info("Random %s models unavailable (%s); workflows that use them need real ones.", what, exc)
    return models


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_key(files: Iterable[str], seed: int) -> str:
    h = hashlib.sha1(str(seed).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:12]


def cached_demo_models(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> list[tuple[DemoModel, Path]]:
    """The random face models in the cache (written when missing or when their writer's code changed)."""
    root = Path(cache_dir or default_cache_dir()) / "demo-models"
    found = []
    for model in _demo_models(seed):
        folder = root / _source_key(model.sources, seed)
        target = folder / model.relpath
        marker = folder / (model.relpath.replace("/", "__") + ".complete")
        if not marker.is_file():
            log.info("Writing random %s", model.relpath)
            # Write into a private staging folder, then rename: a parallel session or an interrupted
            # run never sees (or leaves) a half-written model under the final name.
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_mkdir(folder)))
            try:
                model.write(staging / model.relpath)
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                _mkdir(target.parent)
                os.replace(staging / model.relpath, target)
            except Exception as exc:  # a broken writer disables one model, not the run
                log.warning("Could not write random %s: %s: %s", model.relpath, type(exc).__name__, exc)
                continue
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            marker.write_text("ok\n")
        found.append((model, target))
    return found
