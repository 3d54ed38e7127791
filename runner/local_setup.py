"""Local setup: a temporary ComfyUI base dir with the pack linked and the embedded default models."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo_models import cached_demo_models, cached_random_checkpoint, cached_random_sdxl_checkpoint
from .examples import PACK_DIR
from .server import BASE_SUBDIRS, link_pack
from .substitutions import TEST_SIZE_VALUES


class MissingModelError(FileNotFoundError):
    """A model file the workflows need is not where ComfyUI looks."""



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
