"""facexlib as an optional dependency: imported on first use, with a message that says what to install.

facexlib's model constructors never download; only its ``init_*_model`` helpers do, and FaceBooth never calls
them: weights are read from ComfyUI's model folders.
"""
from __future__ import annotations

import importlib
import importlib.util

INSTALL_HINT = (
    "Install it into ComfyUI's Python with `pip install facexlib` (PuLID and PhotoMaker V2 users usually have it), "
    "then restart ComfyUI."
)


class FacexlibUnavailableError(ImportError):
    """facexlib cannot be imported; only the choices that need it (RetinaFace, face parsing) are affected."""


def import_facexlib(feature: str):
    """Import facexlib or raise ``FacexlibUnavailableError`` naming the feature that needs it."""
    try:
        return importlib.import_module("facexlib")
    except Exception as exc:  # ImportError, or a broken dependency (cv2, numpy ABI) raised while importing
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "facexlib":
            what = "facexlib is not installed."
        else:
            what = f"facexlib is installed but failed to import ({type(exc).__name__}: {exc})."
        raise FacexlibUnavailableError(f"FaceBooth's {feature} needs facexlib: {what} {INSTALL_HINT}") from exc


def facexlib_available() -> bool:
    return importlib.util.find_spec("facexlib") is not None
