"""Helpers every FaceBooth node uses: progress + interrupt hooks, devices, small caches."""
from __future__ import annotations

import logging
from typing import Any, Callable, Hashable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..pipelines.runtime import RunHooks

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
