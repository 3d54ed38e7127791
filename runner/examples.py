"""Run the example workflows headless in a real ComfyUI.

Placeholder convention
----------------------
Example workflows (``examples_workflows/api/*_api.json``, API format) may not name files that only exist on
the author's machine, and their settings are the real ones (SD1.5 at 512 px, 20-30 steps). An input value may
be a placeholder that the runner fills in before queueing:

* a string that is exactly ``"$NAME"`` is replaced by the value of ``NAME`` with its own JSON type
  (so ``"seed": "$SEED"`` becomes an int);
* ``"${NAME:-DEFAULT}"`` (the whole string) is the same, but falls back to ``DEFAULT`` when nothing provides
  ``NAME``; ``DEFAULT`` is read as JSON when it parses (``"${STEPS:-25}"`` -> 25), else as text
  (``"${PROMPT:-a photo of a person}"``). A default cannot contain ``}``;
* ``"${NAME}"`` or ``"${NAME:-DEFAULT}"`` inside a longer string is replaced textually
  (``"FaceBooth/${WORKFLOW}"``).

``NAME`` is upper case (``[A-Z][A-Z0-9_]*``). Every example takes ``${PROMPT:-...}``, ``${FACE_IMAGE:-...}``
(when it reads a face) and ``${SEED:-...}`` with its own values as defaults, so a batch tool can fill them.
The defaults are what the editor copy (the UI twin) shows.

The runner provides:

==================  =====================================================================================
``CHECKPOINT``      checkpoint file name as ComfyUI lists it (the random SD1.5 one, or ``--checkpoint``)
``FACE_IMAGE``      uploaded input face, a name for ``LoadImage`` (``--face``; a drawn face by default)
``FACE_IMAGE_2``    second face for multi-subject workflows (second ``--face``; a second drawn face)
``SEED``            integer seed (``--seed``, default 0)
``WORKFLOW``        the workflow's name (file stem without ``_api``), handy in ``filename_prefix``
``ARCFACE``         ArcFace backbone in ``models/facebooth/face`` (the random r18 written for the run)
``INSIGHTFACE_PACK`` insightface pack name (``antelopev2``, random weights written for the run)
``F2D_MSID``        Face2Diffusion MSID file in ``models/facebooth/face2diffusion`` (random, official layout)
``F2D_MAPPING``     Face2Diffusion mapping file (random, official layout)
``INSTANTBOOTH_MODEL`` InstantBooth heads + adapters in ``models/facebooth/instantbooth`` (random)
``CLIP_VISION``     CLIP ViT-L/14 image encoder in ``models/clip_vision`` (random, ComfyUI's layout)
``FASTCOMPOSER``    FastComposer-layout ``pytorch_model.bin`` in ``models/facebooth/portraitbooth`` (random)
``PORTRAITBOOTH_STEA`` PortraitBooth STEA safetensors in ``models/facebooth/portraitbooth`` (random)
``SDXL_CHECKPOINT`` an SDXL-family checkpoint (the random KOALA-like one, or ``--set SDXL_CHECKPOINT=NAME``)
==================  =====================================================================================

With the random test checkpoint the runner also fills the test-size knobs of ``TEST_SIZE_VALUES`` (64 px,
4 steps, Cross Initialization preset "custom", Detect Faces "aligned crop" for the drawn faces, ...); with a
real ``--checkpoint`` the workflows' own defaults apply.

``--set NAME=VALUE`` adds or overrides any of them (VALUE parsed as JSON when it parses, else a string).
A workflow that uses a placeholder without default that nobody provides fails before it is queued, naming
the placeholder.

The embedded default models (random SD1.5 checkpoint, random face models) are generated once into a cache
folder (``$FACEBOOTH_CACHE`` or ``~/.cache/facebooth``) and linked into the run's temporary ComfyUI base dir.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .client import ComfyClient, OutputImage, ProgressCallback

log = logging.getLogger(__name__)

PACK_DIR = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = PACK_DIR / "examples_workflows"  # UI workflows + thumbnails: what the template browser lists
API_DIR = EXAMPLES_DIR / "api"  # API-format twins and their layout files (a subfolder the browser skips)
API_SUFFIX = "_api.json"
LAYOUT_SUFFIX = ".layout.json"

_EXACT = re.compile(r"^\$([A-Z][A-Z0-9_]*)$")
_BRACED = r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}"
_EXACT_BRACED = re.compile(r"^" + _BRACED + r"$")
_INLINE = re.compile(_BRACED)

# Test-size values the runner fills in when it runs the random test checkpoint: the shipped workflows keep
# real settings as their defaults (see the module docstring).
TEST_SIZE_VALUES: dict[str, Any] = {
    "WIDTH": 64, "HEIGHT": 64, "STEPS": 4,
    "PANORAMA_WIDTH": 128, "MD_WINDOW": 64, "MD_STRIDE": 32,
    "DETECT_MODE": "aligned crop",  # the drawn faces are already crops; random detectors find nothing
    "CROSS_INIT_PRESET": "custom", "TRAIN_STEPS": 4, "TRAIN_RESOLUTION": 64, "TRAIN_BATCH": 2, "TRAIN_WARMUP": 2,
    "PERSONAMAGIC_RESOLUTION": 128, "PERSONAMAGIC_BINS": 25,
    "SDXL_TRAIN_STEPS": 2, "SDXL_TRAIN_BATCH": 1,  # a CLIP-G fwd+bwd costs seconds per sample on CPU
}

# Values used when a UI twin is generated for the editor: the model files users download (names as the
# weights manifest has them). Everything else in the editor copy comes from the placeholders' defaults.
EDITOR_DEFAULTS: dict[str, Any] = {
    "CHECKPOINT": "v1-5-pruned-emaonly.safetensors",
    "ARCFACE": "arcface_ms1mv3_r100.pth",
    "INSIGHTFACE_PACK": "antelopev2",
    "F2D_MSID": "msid.pt",
    "F2D_MAPPING": "mapping.pt",
    "INSTANTBOOTH_MODEL": "instantbooth_sd15.safetensors",
    "CLIP_VISION": "clip-vit-large-patch14.safetensors",
    "FASTCOMPOSER": "fastcomposer/pytorch_model.bin",
    "PORTRAITBOOTH_STEA": "portraitbooth_stea.safetensors",
    "SDXL_CHECKPOINT": "sd_xl_base_1.0.safetensors",
}


class PlaceholderError(KeyError):
    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return str(self.args[0])


class MissingModelError(FileNotFoundError):
    """A model file the workflows need is not where ComfyUI looks."""


# ------------------------------------------------------------------------------------------------
# Workflows and placeholders
# ------------------------------------------------------------------------------------------------


def workflow_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    return name[: -len(API_SUFFIX)] if name.endswith(API_SUFFIX) else Path(name).stem


def list_workflows(folder: str | os.PathLike = API_DIR, only: Iterable[str] | None = None) -> list[Path]:
    """The API-format workflows in ``folder``, sorted; ``only`` keeps those whose name matches a glob."""
    paths = sorted(Path(folder).glob("*" + API_SUFFIX))
    patterns = list(only or [])
    if patterns:
        paths = [p for p in paths if any(fnmatch.fnmatch(workflow_name(p), pat) or fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    return paths


def load_workflow(path: str | os.PathLike) -> dict:
    """Read an API-format workflow; a UI-format file gets a message that says which file to use."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"{path} is a UI-format workflow; the runner needs the API-format twin (*{API_SUFFIX}).")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path} is not an API-format workflow (a map of node id -> {{class_type, inputs}}).")
    return data


def _walk_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _walk_strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_strings(v)


def find_placeholders(workflow: Mapping, *, required_only: bool = False) -> set[str]:
    """Names of the placeholders in ``workflow`` (``required_only``: those without a default)."""
    names: set[str] = set()
    for node in workflow.values():
        for s in _walk_strings(node.get("inputs", {})):
            m = _EXACT.match(s)
            if m:
                names.add(m.group(1))
            names.update(mm.group(1) for mm in _INLINE.finditer(s) if not (required_only and mm.group(2) is not None))
    return names


def placeholder_defaults(workflow: Mapping) -> dict[str, Any]:
    """The defaults the workflow gives its placeholders (``${NAME:-DEFAULT}``), typed as a whole-value fill."""
    found: dict[str, Any] = {}
    for node in workflow.values():
        for s in _walk_strings(node.get("inputs", {})):
            for mm in _INLINE.finditer(s):
                if mm.group(2) is not None:
                    found.setdefault(mm.group(1), _typed(mm.group(2)) if mm.group(0) == s else mm.group(2))
    return found


def _typed(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _lookup(name: str, default: str | None, values: Mapping[str, Any], typed: bool) -> Any:
    if name in values:
        return values[name]
    if default is None:
        raise KeyError(name)
    return _typed(default) if typed else default


def _fill(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        m = _EXACT.match(value)
        if m:
            return values[m.group(1)]
        m = _EXACT_BRACED.match(value)
        if m:
            return _lookup(m.group(1), m.group(2), values, typed=True)
        return _INLINE.sub(lambda mm: str(_lookup(mm.group(1), mm.group(2), values, typed=False)), value)
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    return value


def substitute(workflow: Mapping, values: Mapping[str, Any], *, name: str = "workflow") -> dict:
    """A copy of ``workflow`` with every placeholder filled; raises ``PlaceholderError`` naming missing ones."""
    missing = sorted(find_placeholders(workflow, required_only=True) - set(values))
    if missing:
        raise PlaceholderError(
            f"{name} uses placeholder(s) {', '.join('$' + m for m in missing)} that nothing provides. "
            f"Pass --set {missing[0]}=VALUE, or see runner/examples.py for the names the runner fills in."
        )
    out = copy.deepcopy(dict(workflow))
    for node in out.values():
        node["inputs"] = _fill(node.get("inputs", {}), values)
    return out


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def run_workflow(
    client: ComfyClient,
    workflow: Mapping | str | os.PathLike,
    substitutions: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    on_progress: ProgressCallback | None = None,
) -> list[OutputImage]:
    """Queue one API workflow (path or dict), wait for it, and return its output images with their bytes."""
    name = "workflow"
    if not isinstance(workflow, Mapping):
        name = workflow_name(workflow)
        workflow = load_workflow(workflow)
    api = substitute(workflow, dict(substitutions or {}), name=name)
    prompt_id = client.queue_prompt(api)
    entry = client.wait(prompt_id, timeout=timeout, on_progress=on_progress)
    return client.output_images(prompt_id, entry)


def to_pil(outputs: Iterable[OutputImage]):
    from PIL import Image

    images = []
    for out in outputs:
        img = Image.open(io.BytesIO(out.data))
        img.load()
        images.append(img)
    return images


def check_checkpoint_available(client: ComfyClient, name: str) -> None:
    listed = client.models("checkpoints")
    if name not in listed:
        shown = ", ".join(listed[:10]) + (" ..." if len(listed) > 10 else "") if listed else "none"
        raise MissingModelError(
            f"ComfyUI at {client.url} has no checkpoint named {name!r} in models/checkpoints (it lists: {shown}). "
            "Pass --checkpoint with one of those names, or put the file into that ComfyUI's models/checkpoints."
        )


# ------------------------------------------------------------------------------------------------
# Inputs: a drawn face when the user gives none
# ------------------------------------------------------------------------------------------------


def synthetic_face(seed: int = 0, size: int = 256):
    """A drawn frontal face (PIL RGB): skin-toned oval, eyes, brows, nose, mouth, on a cool background.

    It gives face workflows an input without shipping a photo. With random-weight face models nothing is
    recognised anyway; the warm skin tone is what the random insightface test detector fires on.
    """
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    bg = (rnd.randint(40, 90), rnd.randint(70, 120), rnd.randint(130, 190))
    skin = (rnd.randint(200, 240), rnd.randint(130, 170), rnd.randint(100, 140))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 256
    cx, cy = size / 2 + rnd.uniform(-8, 8) * s, size / 2 + rnd.uniform(-6, 6) * s
    hair = tuple(rnd.randint(20, 90) for _ in range(3))
    d.ellipse([cx - 78 * s, cy - 105 * s, cx + 78 * s, cy + 60 * s], fill=hair)
    d.ellipse([cx - 70 * s, cy - 90 * s, cx + 70 * s, cy + 95 * s], fill=skin)
    for side in (-1, 1):
        ex, ey = cx + side * 28 * s, cy - 15 * s
        d.ellipse([ex - 14 * s, ey - 7 * s, ex + 14 * s, ey + 7 * s], fill=(245, 245, 245))
        d.ellipse([ex - 6 * s, ey - 6 * s, ex + 6 * s, ey + 6 * s], fill=(60, 40, 30))
        d.line([ex - 16 * s, ey - 18 * s, ex + 16 * s, ey - 20 * s], fill=hair, width=max(1, int(5 * s)))
    d.polygon([(cx, cy - 5 * s), (cx - 10 * s, cy + 25 * s), (cx + 10 * s, cy + 25 * s)], fill=tuple(max(0, c - 30) for c in skin))
    d.arc([cx - 28 * s, cy + 30 * s, cx + 28 * s, cy + 60 * s], 20, 160, fill=(150, 50, 50), width=max(1, int(5 * s)))
    return img


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Local setup: a temp ComfyUI base dir with the pack linked and the embedded default models
# ------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("FACEBOOTH_CACHE") or Path.home() / ".cache" / "facebooth").expanduser()


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_dir() and not link.is_symlink():
            raise FileExistsError(f"{link} exists; remove it or use a fresh base directory")
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


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


def _demo_models(seed: int) -> list[DemoModel]:
    models = []
    try:
        from ..devmodels import face_models
        from ..pipelines.face import arcface, mtcnn
    except ImportError as exc:
        log.info("Random ArcFace/MTCNN models unavailable (%s); face workflows need real ones.", exc)
    else:
        name = "arcface_random_r18.safetensors"
        models.append(DemoModel(f"facebooth/face/{name}", "ARCFACE", name,
                                lambda p: face_models.write_random_arcface(p, seed=seed),
                                (face_models.__file__, arcface.__file__)))
        models.append(DemoModel("facebooth/face/mtcnn", None, None,
                                lambda p: face_models.copy_or_write_mtcnn(p, seed=seed),
                                (face_models.__file__, mtcnn.__file__)))
    try:
        from ..devmodels import insightface_packs
        import onnx  # noqa: F401  (the writer needs it)
    except ImportError as exc:
        log.info("Random insightface pack unavailable (%s).", exc)
    else:
        models.append(DemoModel("insightface/models/antelopev2", "INSIGHTFACE_PACK", "antelopev2",
                                lambda p: insightface_packs.write_pack_files(p, "antelopev2", seed=seed),
                                (insightface_packs.__file__,)))
    try:
        from ..devmodels import face2diffusion_models as f2d_models
        from ..pipelines.face2diffusion import mapping as f2d_mapping, msid as f2d_msid
    except ImportError as exc:
        log.info("Random Face2Diffusion models unavailable (%s).", exc)
    else:
        models.append(DemoModel("facebooth/face2diffusion/msid.pt", "F2D_MSID", "msid.pt",
                                lambda p: f2d_models.write_random_msid(p, seed=seed),
                                (f2d_models.__file__, f2d_msid.__file__)))
        models.append(DemoModel("facebooth/face2diffusion/mapping.pt", "F2D_MAPPING", "mapping.pt",
                                lambda p: f2d_models.write_random_mapping(p, seed=seed),
                                (f2d_models.__file__, f2d_mapping.__file__)))
    try:
        from ..devmodels import instantbooth_models
    except ImportError as exc:
        log.info("Random InstantBooth models unavailable (%s).", exc)
    else:
        models.extend(DemoModel(**spec) for spec in instantbooth_models.demo_models(seed))
    try:
        from ..devmodels import portraitbooth_models as pb_models
        from ..devmodels import sd15_checkpoint as sd15
        from ..pipelines.portraitbooth import fastcomposer_loading as pb_loading, stea as pb_stea
    except ImportError as exc:
        log.info("Random PortraitBooth models unavailable (%s).", exc)
    else:
        models.append(DemoModel(f"facebooth/portraitbooth/{pb_models.FASTCOMPOSER_FILE}", "FASTCOMPOSER",
                                pb_models.FASTCOMPOSER_FILE,
                                lambda p: pb_models.write_random_fastcomposer(p, seed=seed),
                                (pb_models.__file__, pb_stea.__file__, pb_loading.__file__, sd15.__file__)))
        models.append(DemoModel(f"facebooth/portraitbooth/{pb_models.STEA_FILE}", "PORTRAITBOOTH_STEA",
                                pb_models.STEA_FILE,
                                lambda p: pb_models.write_random_stea(p, seed=seed),
                                (pb_models.__file__, pb_stea.__file__)))
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


@dataclass
class LocalSetup:
    base_dir: Path
    checkpoint_name: str
    substitutions: dict[str, Any] = field(default_factory=dict)


def prepare_base_dir(
    base_dir: str | os.PathLike,
    *,
    pack_dir: str | os.PathLike = PACK_DIR,
    cache_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    comfyui_dir: str | os.PathLike | None = None,
    face_models: bool = True,
    seed: int = 0,
    sdxl_checkpoint: bool = True,
) -> LocalSetup:
    """Lay out a ComfyUI ``--base-directory``: the pack linked into custom_nodes, the checkpoint and the
    random face models linked into models/.

    ``checkpoint``: None -> the random SD1.5 checkpoint; an existing file path -> linked in; a bare name ->
    looked up in ``<comfyui_dir>/models/checkpoints``.
    """
    from .server import BASE_SUBDIRS, link_pack

    base = Path(base_dir)
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_pack(base, pack_dir)
    models = base / "models"
    subs: dict[str, Any] = {}

    if checkpoint is None:
        ckpt_path = cached_random_checkpoint(cache_dir, seed)
    else:
        ckpt_path = Path(checkpoint).expanduser()
        if not ckpt_path.is_file():
            candidates = [Path(comfyui_dir) / "models" / "checkpoints" / str(checkpoint)] if comfyui_dir else []
            ckpt_path = next((c for c in candidates if c.is_file()), None)
            if ckpt_path is None:
                where = f" or in {candidates[0].parent}" if candidates else ""
                raise MissingModelError(
                    f"Checkpoint {str(checkpoint)!r} not found as a file{where}. Pass a path to a .safetensors "
                    "checkpoint or a name from your ComfyUI's models/checkpoints."
                )
    _link(ckpt_path.resolve(), models / "checkpoints" / ckpt_path.name)
    checkpoint_name = ckpt_path.name

    if sdxl_checkpoint:  # the random SDXL-family checkpoint for the *_sdxl workflows ($SDXL_CHECKPOINT)
        sdxl_path = cached_random_sdxl_checkpoint(cache_dir, seed)
        _link(sdxl_path.resolve(), models / "checkpoints" / sdxl_path.name)
        subs["SDXL_CHECKPOINT"] = sdxl_path.name

    if face_models:
        for model, target in cached_demo_models(cache_dir, seed):
            _link(target.resolve(), models / model.relpath)
            if model.placeholder:
                subs[model.placeholder] = model.value
    subs["CHECKPOINT"] = checkpoint_name
    if checkpoint is None:  # the random test checkpoint: test sizes instead of the workflows' real settings
        subs.update(TEST_SIZE_VALUES)
    return LocalSetup(base, checkpoint_name, subs)


def upload_faces(client: ComfyClient, faces: list[str | os.PathLike] | None, seed: int = 0) -> dict[str, str]:
    """Upload the user's faces (or two drawn ones) and return FACE_IMAGE / FACE_IMAGE_2."""
    names: dict[str, str] = {}
    keys = ["FACE_IMAGE", "FACE_IMAGE_2"]
    faces = list(faces or [])
    for k, key in enumerate(keys):
        if k < len(faces):
            path = Path(faces[k]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Face image not found: {path}")
            names[key] = client.upload_image(path, f"facebooth_face_{k + 1}{path.suffix.lower() or '.png'}")
        else:
            names[key] = client.upload_image(png_bytes(synthetic_face(seed + k)), f"facebooth_drawn_face_{k + 1}.png")
    return names


# ------------------------------------------------------------------------------------------------
# UI-format twins (generated from the API file with the live /object_info, see runner/ui_workflow.py)
# ------------------------------------------------------------------------------------------------


def layout_path(api_path: str | os.PathLike) -> Path:
    api_path = Path(api_path)
    return api_path.with_name(workflow_name(api_path) + LAYOUT_SUFFIX)


def workflow_title(api_path: str | os.PathLike) -> str:
    """The card title in the template browser: the layout's ``title``, else the name."""
    from .ui_workflow import load_layout

    title = load_layout(layout_path(api_path)).get("title") or workflow_name(api_path)
    if any(c in title for c in '/\\?#%*:"<>|'):
        raise ValueError(f"title {title!r} of {Path(api_path).name} cannot be a file name (no /\\?#%*:\"<>|)")
    return title


def ui_twin_path(api_path: str | os.PathLike, examples_dir: str | os.PathLike | None = None) -> Path:
    """``examples_workflows/<title>.json``: the UI twin of ``api/<name>_api.json`` (its thumbnail: ``.jpg``)."""
    api_path = Path(api_path)
    folder = Path(examples_dir) if examples_dir else api_path.parent.parent
    return folder / (workflow_title(api_path) + ".json")


def editor_values(workflow: Mapping, name: str) -> dict[str, Any]:
    """Placeholder values for the editor copy: the defaults, model file names; unknown ones stay visible."""
    values: dict[str, Any] = {n: "$" + n for n in find_placeholders(workflow)}
    values.update(placeholder_defaults(workflow))
    values.update(EDITOR_DEFAULTS)
    values["WORKFLOW"] = name
    return values


def expected_ui_api(api_path: str | os.PathLike) -> dict:
    """What the editor should queue from the UI twin: the API workflow with editor values, no ``_meta``."""
    from .ui_workflow import strip_meta

    api = load_workflow(api_path)
    name = workflow_name(api_path)
    return strip_meta(substitute(api, editor_values(api, name), name=name))


def downloadable_models(manifest: str | os.PathLike = PACK_DIR / "weights_manifest.json") -> dict[str, dict]:
    """File name (as a loader's list shows it) -> {"url", "directory"} for manifest entries with a direct URL.

    The editor's missing-models dialog offers these (node ``properties.models``). Archives are left out:
    the dialog downloads one file, it does not unpack.
    """
    data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    found: dict[str, dict] = {}
    for method in data.get("methods", {}).values():
        for entry in method.get("entries", []):
            url, folder, name = entry.get("url"), entry.get("folder"), entry.get("filename")
            if not url or not folder or not name or entry.get("archive"):
                continue
            # An entry in a subfolder keeps it in the name: the loader lists "sub/file.bin".
            if entry.get("subfolder"):
                name = f"{entry['subfolder']}/{name}"
            found.setdefault(name, {"url": url, "directory": folder})
    return found


def _atomic_write_text(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


def build_ui_twin(api_path: str | os.PathLike, object_info: dict, sizes: Mapping | None = None) -> dict:
    """The UI workflow for one API example: placeholders filled with editor values, laid out (see ui_workflow)."""
    from .ui_workflow import api_to_ui, load_layout

    api_path = Path(api_path)
    name = workflow_name(api_path)
    api = load_workflow(api_path)
    return api_to_ui(substitute(api, editor_values(api, name), name=name), object_info,
                     load_layout(layout_path(api_path)), sizes=sizes, models=downloadable_models())


def write_ui_twin(api_path: str | os.PathLike, object_info: dict, sizes: Mapping | None = None,
                  examples_dir: str | os.PathLike | None = None) -> Path:
    """(Re)generate ``<title>.json`` for the ComfyUI editor next to ``api/`` (atomic write).

    ``sizes`` (node id -> [w, h]) are the frontend's sizes from a browser pass (runner/browser.py); without them
    the sizes are estimated. ``python -m facebooth examples --write-ui`` does both passes and the thumbnails.
    """
    target = ui_twin_path(api_path, examples_dir)
    _atomic_write_text(target, json.dumps(build_ui_twin(api_path, object_info, sizes), indent=1) + "\n")
    return target
