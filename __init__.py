"""FaceBooth: face-identity personalization nodes for ComfyUI.

Loaded by ComfyUI from ``custom_nodes/<any folder name>`` through the V3 entrypoint below. Importing the
package outside ComfyUI (tests, CLI, training scripts) touches nothing of ComfyUI.
"""
from __future__ import annotations

__version__ = "0.1.0"


def _running_inside_comfyui() -> bool:
    try:
        import folder_paths  # noqa: F401  (ComfyUI's module; absent outside ComfyUI)
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


if _running_inside_comfyui():
    from .nodes.model_folders import register_model_folders

    register_model_folders()

    async def comfy_entrypoint():
        """V3 entrypoint: ComfyUI calls this to get the extension that lists our nodes."""
        from .nodes import FaceBoothExtension

        return FaceBoothExtension()
