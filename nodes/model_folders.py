"""Registers FaceBooth's model folders with ComfyUI's ``folder_paths`` (so extra_model_paths.yaml works)."""
from __future__ import annotations

import logging
import os

import folder_paths

from ..utils.manifest import PACK_FOLDERS

log = logging.getLogger(__name__)

# folder key -> default location under ComfyUI's models dir (native separators), and accepted extensions;
# the table itself is utils/manifest.PACK_FOLDERS (shared with the manifest and the CLI).
FOLDERS: dict[str, tuple[str, set[str]]] = {
    key: (os.path.join(*rel.split("/")), set(exts)) for key, (rel, exts) in PACK_FOLDERS.items()
}


def register_model_folders() -> None:
    """Add our folders, keeping any paths that extra_model_paths.yaml registered before us.

    ``add_model_folder_path`` would create new entries with an empty extension set (meaning "any file"),
    so the tuple is set directly for new keys and only extended for existing ones.
    """
    for key, (rel, exts) in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, rel)
        existing = folder_paths.folder_names_and_paths.get(key)
        if existing is None:
            folder_paths.folder_names_and_paths[key] = ([default], set(exts))
        else:
            paths, old_exts = existing
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[key] = (paths, set(old_exts) | set(exts))


def folder_paths_for(key: str) -> list[str]:
    return folder_paths.get_folder_paths(key)


def writable_folder(key: str) -> str:
    """The first registered path for ``key``; created if missing. Results are written there."""
    path = folder_paths.get_folder_paths(key)[0]
    os.makedirs(path, exist_ok=True)
    return path


def list_files(key: str) -> list[str]:
    try:
        return folder_paths.get_filename_list(key)
    except Exception as exc:  # a broken yaml entry must not take down the whole pack
        log.warning("FaceBooth: could not list model folder %s: %s", key, exc)
        return []


def resolve_file(key: str, name: str) -> str:
    """Full path of ``name`` in folder ``key`` or a FileNotFoundError that names the folders searched."""
    path = folder_paths.get_full_path(key, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(key)) or "(none registered)"
        raise FileNotFoundError(
            f"FaceBooth: '{name}' was not found in model folder '{key}'. Searched: {searched}. "
            "Put the file there (python -m facebooth weights check lists what is expected) and refresh the page."
        )
    return path
