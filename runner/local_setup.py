"""Local setup: a temporary ComfyUI base dir with the pack linked and the embedded default models, and a
ComfyUI started on it."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .demo_models import cached_demo_models, cached_random_checkpoint, cached_random_sdxl_checkpoint
from .examples import PACK_DIR
from .server import BASE_SUBDIRS, ComfyServer, ComfyServerError, link_pack
from .substitutions import TEST_SIZE_VALUES

log = logging.getLogger(__name__)


class MissingModelError(FileNotFoundError):
    """A model file the workflows need is not where ComfyUI looks."""


class LocalSetupError(RuntimeError):
    """The local ComfyUI could not be set up or started; the message says why, for the user."""


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_dir() and not link.is_symlink():
            raise FileExistsError(f"{link} exists; remove it or use a fresh base directory")
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


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


@dataclass
class LocalComfyUI:
    """A ComfyUI running on a temporary base dir; set ``keep_base_dir`` to leave the folder for inspection."""

    server: ComfyServer
    setup: LocalSetup
    keep_base_dir: bool = False


@contextlib.contextmanager
def local_comfyui(comfyui_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, prefix: str,
                  keep_base_dir: bool = False, **server_options: Any) -> Iterator[LocalComfyUI]:
    """Prepare a base dir (``prepare_base_dir``), start ComfyUI on it, stop it and remove the folder at the end.

    Raises ``LocalSetupError`` when a model is missing or the server does not start; ``server_options`` go to
    ``ComfyServer`` (``cpu``, ``python``, ``die_with_parent``).
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    local = None
    try:
        try:
            setup = prepare_base_dir(base, checkpoint=checkpoint, comfyui_dir=comfyui_dir)
        except (MissingModelError, FileNotFoundError) as exc:
            raise LocalSetupError(str(exc)) from exc
        server = ComfyServer(comfyui_dir, base, **server_options)
        log.info("Starting ComfyUI from %s on %s (log: %s)", comfyui_dir, server.url, server.log_file)
        try:
            server.start()
        except ComfyServerError as exc:
            raise LocalSetupError(str(exc)) from exc
        local = LocalComfyUI(server, setup, keep_base_dir)
        try:
            yield local
        finally:
            server.stop()
    finally:
        if local.keep_base_dir if local is not None else keep_base_dir:
            log.info("ComfyUI base dir kept: %s", base)
        else:
            shutil.rmtree(base, ignore_errors=True)
