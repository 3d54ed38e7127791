"""ComfyUI adapters. Each module lists its nodes in ``NODES``; a module that fails to import disables
only its own nodes, with a logged reason, never the whole pack."""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger(__name__)

NODE_MODULES = ["face", "evaluation", "cross_init", "face2diffusion", "portraitbooth", "multidiffusion", "instantbooth", "personamagic"]


def collect_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except Exception:  # keep the rest of the pack usable
            log.exception("FaceBooth: the %s nodes could not be loaded and are disabled", name)
            continue
        nodes.extend(module.NODES)
    return nodes


class FaceBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()
