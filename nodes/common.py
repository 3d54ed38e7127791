"""Helpers every FaceBooth node uses: progress + interrupt hooks, devices, small caches."""
from __future__ import annotations

import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..pipelines.runtime import RunHooks
from ..pipelines.textual_inversion.backend import FAMILY_NAMES

log = logging.getLogger(__name__)

DEVICE_CHOICES = ["auto", "cpu", "gpu"]


def comfy_hooks(total: int, node_id: Optional[str] = None) -> RunHooks:
    """RunHooks that drive ComfyUI's progress bar (with optional preview) and honour its interrupt."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def progress(done: int, total_: int, preview: Optional[torch.Tensor] = None) -> None:
        pil_preview = None
        if preview is not None:
            from PIL import Image

            arr = (preview.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            pil_preview = ("PNG", Image.fromarray(arr), 512)
        bar.update_absolute(done, total_, pil_preview)

    return RunHooks(progress=progress, check_interrupt=mm.throw_exception_if_processing_interrupted)


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    return mm.get_torch_device()


def managed(module: torch.nn.Module, device: str = "auto") -> "comfy.model_patcher.ModelPatcher":
    """Wrap a torch module FaceBooth owns in ComfyUI's ModelPatcher, parked on its offload device.

    Then ``load_managed`` (or a sampler, through a patch's ``models()``) places it with ``load_models_gpu``, and
    ComfyUI's unload / "free memory" / --lowvram moves it back, like any core model.
    """
    load = pick_device(device)
    offload = load if load.type == "cpu" else mm.unet_offload_device()
    module.to(offload)
    return comfy.model_patcher.ModelPatcher(module, load_device=load, offload_device=offload)


def load_managed(*patchers: "comfy.model_patcher.ModelPatcher") -> None:
    """Put these patchers' modules on their load device through ComfyUI (which may evict other models).

    Whole: our modules are plain torch layers, which ComfyUI cannot stream in parts (only comfy.ops layers can).
    """
    mm.load_models_gpu(list(patchers), force_full_load=True)


class ModelCache:
    """Keeps recently loaded helper models (detectors, recognizers) between runs, keyed by their inputs.

    V3 node classes hold no state, so the cache lives at module level; small and bounded.
    """

    def __init__(self, max_items: int = 4) -> None:
        self._items: dict[Hashable, Any] = {}
        self._max = max_items

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        if key in self._items:
            value = self._items.pop(key)
        else:
            value = load()
        self._items[key] = value  # most recent last
        while len(self._items) > self._max:
            self._items.pop(next(iter(self._items)))
        return value

    def get_files(self, folder: str, names: Sequence[str], load: Callable[..., Any], *extra: Hashable) -> Any:
        """``load(*paths)`` of the files ``names`` in model folder ``folder``, read again only when one of them
        changes on disk (:func:`file_key`) or ``extra`` (e.g. the device) differs."""
        from . import model_folders

        paths = [model_folders.resolve_file(folder, name) for name in names]
        return self.get((*(file_key(p) for p in paths), *extra), lambda: load(*paths))


def placeholder_image(size: int = 64) -> torch.Tensor:
    """A black (1, size, size, 3) image for outputs that would otherwise be empty (ComfyUI needs a batch)."""
    return torch.zeros(1, size, size, 3)


# ---------------------------------------------------------------------------------------------- base-model families
_FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# FaceBooth methods that run on SDXL-family checkpoints (named in the errors of those that do not).
SDXL_METHODS = "Cross Initialization or PersonaMagic"


class WrongFamilyError(ValueError):
    """A MODEL or CLIP of a base-model family the method was not made for; the message names both and what to use."""


def model_family(model) -> Optional[str]:
    """"sd1" / "sd2" / "sdxl" from a ComfyUI MODEL's text width (SSD-1B, Vega, KOALA count as sdxl), else None."""
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", {}) or {}
    return _FAMILY_BY_CONTEXT.get(config.get("context_dim"))


def clip_family(clip) -> Optional[str]:
    """"sd1" / "sd2" / "sdxl" from the text towers a ComfyUI CLIP holds, else None."""
    towers = {k for k in ("clip_l", "clip_h", "clip_g") if hasattr(getattr(clip, "cond_stage_model", None), k)}
    return {frozenset({"clip_l"}): "sd1", frozenset({"clip_h"}): "sd2", frozenset({"clip_l", "clip_g"}): "sdxl"}.get(frozenset(towers))


def require_family(method: str, supported: tuple[str, ...] = ("sd1",), *, model=None, clip=None,
                   advice: Optional[str] = None) -> None:
    """Fail before sampling when ``model`` / ``clip`` is an SDXL (or other unsupported) family, naming both.
    ``advice`` replaces the default "load a ... checkpoint" sentence (what to do instead)."""
    wanted = " or ".join(FAMILY_NAMES[f] for f in supported)
    for what, family in (("MODEL", model_family(model) if model is not None else None),
                         ("CLIP", clip_family(clip) if clip is not None else None)):
        if family is None or family in supported:
            continue
        instead = f" On {FAMILY_NAMES[family]} checkpoints use FaceBooth's {SDXL_METHODS} instead." if family == "sdxl" else ""
        raise WrongFamilyError(
            f"{method} works with {wanted} checkpoints only; this {what} is {FAMILY_NAMES[family]}. "
            + (advice if advice is not None else f"Load an {wanted} checkpoint for {method}.{instead}")
        )


def checkpoint_inputs(model: str, clip: str, vae: Optional[str] = None) -> list:
    """The MODEL, CLIP (and VAE) inputs of a node that works on one loaded checkpoint, with its tooltips."""
    from comfy_api.latest import io

    inputs = [io.Model.Input("model", tooltip=model), io.Clip.Input("clip", tooltip=clip)]
    return inputs + ([io.Vae.Input("vae", tooltip=vae)] if vae is not None else [])


# ---------------------------------------------------------------------------------------------- embeddings in prompts
_EMBEDDING_WORD = re.compile(r"embedding:([^\s,()\[\]{}:]+)")
_FAMILY_BY_WIDTH = {768: "SD1.x (768-wide, CLIP-L)", 1024: "SD2.x (1024-wide, OpenCLIP-H)", 1280: "SDXL (1280-wide, CLIP-G)"}


class EmbeddingWidthError(ValueError):
    """A prompt names an embedding made for another base-model family than the checkpoint's CLIP."""


def _tokenizers(clip) -> list:
    """The per-tower SDTokenizers of a ComfyUI CLIP (clip_l / clip_h / clip_g), each with its embedding width."""
    tok = getattr(clip, "tokenizer", None)
    found = [getattr(tok, k) for k in ("clip_l", "clip_h", "clip_g") if hasattr(tok, k)]
    inner = getattr(tok, getattr(tok, "clip", "") or "", None)
    if inner is not None and inner not in found:
        found.append(inner)
    return [t for t in found if hasattr(t, "embedding_size") and hasattr(t, "_try_get_embedding")]


def check_prompt_embeddings(clip, text: str, node: str) -> None:
    """Fail when ``text`` names (``embedding:NAME``) an embedding whose width does not fit one of the CLIP's text
    towers. ComfyUI would log one warning and drop it, and the image would lack what the embedding holds."""
    names = list(dict.fromkeys(_EMBEDDING_WORD.findall(text or "")))
    if not names:
        return
    checkpoint = FAMILY_NAMES.get(clip_family(clip) or "", "this")
    for name in names:
        for tok in _tokenizers(clip):
            embed, _ = tok._try_get_embedding(name)
            if embed is None or embed.shape[-1] == tok.embedding_size:
                continue  # not found (ComfyUI reads the word as text) or the right width
            width = int(embed.shape[-1])
            family = _FAMILY_BY_WIDTH.get(width, f"{width}-wide")
            raise EmbeddingWidthError(
                f"{node}: the prompt names embedding '{name}', a {family} embedding, but the checkpoint's CLIP is "
                f"{checkpoint} (its {getattr(tok, 'embedding_key', 'text')} encoder takes {tok.embedding_size}-wide "
                f"vectors). ComfyUI would ignore it. Use an embedding made for {checkpoint} checkpoints, or load a "
                f"checkpoint of the embedding's family."
            )


def embedding_family(vectors: dict[str, torch.Tensor]) -> str:
    """The base-model family an embedding file is for, in words (from its clip_l / clip_h / clip_g keys)."""
    keys = set(vectors)
    if {"clip_l", "clip_g"} <= keys:
        return "SDXL"
    for key, fam in (("clip_h", "SD2.x"), ("clip_g", "SDXL (CLIP-G only)"), ("clip_l", "SD1.x")):
        if key in keys:
            return fam
    widths = {int(v.shape[-1]) for v in vectors.values()}
    return ", ".join(_FAMILY_BY_WIDTH.get(w, f"{w}-wide") for w in sorted(widths))


# ---------------------------------------------------------------------------------------------- files read by name
def file_state(path: str) -> Optional[tuple[int, int]]:
    """(mtime_ns, size) of a file, None when it does not exist: what changes when a file is rewritten."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_mtime_ns, st.st_size)


def file_key(path: str) -> tuple:
    """The key of every model cache and every fingerprint: the real path with its state, so a rewritten or
    replaced file is read again."""
    real = os.path.realpath(path)
    return (real, file_state(real))


def named_file_fingerprint(folder: str, name: str) -> tuple:
    """``fingerprint_inputs`` value of a node that reads ``name`` from model folder ``folder``: ComfyUI runs the
    node again when the file changes, not only when the name does."""
    import folder_paths

    if not isinstance(name, str) or not name:
        return (folder, name)
    try:
        path = folder_paths.get_full_path(folder, name)
    except Exception:  # an unknown folder is reported when the node runs
        path = None
    return (folder, name, file_key(path) if path else None)


@dataclass
class Written:
    """What a node wrote to a file in this process, and for which request (inputs + the ComfyUI objects)."""

    key: tuple
    objects: tuple  # weak references (or None) to the MODEL, CLIP, ... objects it was made with
    state: Optional[tuple[int, int]]  # the file's state right after writing
    result: Any
    curve: torch.Tensor
    summary: str

    def same_request(self, key: tuple, objects: tuple) -> bool:
        return self.key == key and len(objects) == len(self.objects) and all(
            (ref() if ref is not None else None) is obj for ref, obj in zip(self.objects, objects))


def image_digest(images: torch.Tensor) -> str:
    """A content hash of an image batch (part of a training request's key)."""
    import hashlib

    data = images.detach().float().cpu().contiguous()
    return hashlib.sha1(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


class RerunCache:
    """The re-run cache of the training nodes: a re-queued identical graph (same inputs, same model objects)
    returns what this process already wrote instead of training again. Keyed by the output path."""

    def __init__(self) -> None:
        self._by_path: dict[str, Written] = {}

    def get(self, path: str, key: tuple, objects: tuple) -> Optional[Written]:
        done = self._by_path.get(path)
        return done if done is not None and done.same_request(key, objects) else None

    def put(self, path: str, key: tuple, objects: tuple, result: Any, curve: torch.Tensor, summary: str) -> Written:
        written = Written(key, tuple(None if o is None else weakref.ref(o) for o in objects), file_state(path), result,
                          curve, summary)
        self._by_path[path] = written
        return written
