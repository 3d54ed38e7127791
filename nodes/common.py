"""Helpers every FaceBooth node uses: progress + interrupt hooks, devices, small caches."""
from __future__ import annotations

import logging
from typing import Any, Callable, Hashable, Optional

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


def placeholder_image(size: int = 64) -> torch.Tensor:
    """A black (1, size, size, 3) image for outputs that would otherwise be empty (ComfyUI needs a batch)."""
    return torch.zeros(1, size, size, 3)


# ---------------------------------------------------------------------------------------------- base-model families
_FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# FaceBooth methods that run on SDXL-family checkpoints (named in the errors of those that do not).
SDXL_METHODS = "Cross Initialization"  # (PersonaMagic and MultiDiffusion on SDXL: not yet)


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


def require_family(method: str, supported: tuple[str, ...] = ("sd1",), *, model=None, clip=None) -> None:
    """Fail before sampling when ``model`` / ``clip`` is an SDXL (or other unsupported) family, naming both."""
    wanted = " or ".join(FAMILY_NAMES[f] for f in supported)
    for what, family in (("MODEL", model_family(model) if model is not None else None),
                         ("CLIP", clip_family(clip) if clip is not None else None)):
        if family is None or family in supported:
            continue
        instead = f" On {FAMILY_NAMES[family]} checkpoints use FaceBooth's {SDXL_METHODS} instead." if family == "sdxl" else ""
        raise WrongFamilyError(
            f"{method} works with {wanted} checkpoints only; this {what} is {FAMILY_NAMES[family]}. "
            f"Load an {wanted} checkpoint for {method}.{instead}"
        )
