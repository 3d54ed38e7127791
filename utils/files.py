"""Safe file handling: atomic safetensors writes, refusing pickles, sanitising user-given names."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
_MAX_NAME_LEN = 120


class BadNameError(ValueError):
    """A user-given name cannot be used as a file name."""


def sanitize_name(name: str, *, what: str = "name") -> str:
    """Return a file-name-safe version of ``name`` or raise with a message that says what to change.

    Path separators and parent references are refused outright rather than silently stripped: a user
    who typed ``../x`` or ``faces/anna`` should learn that the name is not a path.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadNameError(f"The {what} is empty. Type a short name such as 'anna'.")
    name = name.strip()
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".."):
        raise BadNameError(
            f"The {what} {name!r} contains a path separator or '..'. Use a plain name such as 'anna'; "
            "the file is always written into the model folder."
        )
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    cleaned = _SAFE_NAME.sub("_", name).strip(" .")
    if not cleaned:
        raise BadNameError(f"The {what} {name!r} has no usable characters. Use letters, digits, '-', '_' or '.'.")
    return cleaned[:_MAX_NAME_LEN]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file in the target folder, then rename it onto ``path``.

    An interrupted or failed write leaves no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; model folders are often shared, so use the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` as safetensors, atomically (see ``atomic_write``)."""
    from safetensors.torch import save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))


def require_weight_file(path: str | os.PathLike, what: str, advice: str = "") -> Path:
    """``path`` as a Path, or a FileNotFoundError that names the file, its folder and (``advice``) what to put there."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weight file {path.name} is missing in folder {path.parent}." + (f" {advice}" if advice else ""))
    return path


class UnsafeFileError(ValueError):
    """A weight file could not be loaded safely."""


def load_state_dict_file(path: str | os.PathLike, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file or a weights-only torch pickle; never unpickle arbitrary objects.

    ``mmap=True`` memory-maps a zip-format torch file instead of reading it (tensors are then views of the file;
    old non-zip files are read as usual).

    Returns (state_dict, metadata). Pickles that need arbitrary code are refused with a message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weight file not found: {path}")
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        except Exception as exc:  # safetensors raises several types for truncated / bad headers
            raise UnsafeFileError(
                f"{path.name} is not a valid safetensors file ({exc}). It is probably truncated or corrupt: "
                "download it again (python -m facebooth weights fetch) or re-run the step that produced it."
            ) from exc
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise UnsafeFileError(
            f"{path.name} could not be loaded as a weights-only checkpoint ({type(exc).__name__}: {exc}). "
            "FaceBooth never unpickles arbitrary Python objects. If this is an official file it may be corrupt: "
            "download it again. Otherwise convert it to .safetensors."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsafeFileError(f"{path.name} does not contain a flat dictionary of tensors.")
    return dict(obj), {}
