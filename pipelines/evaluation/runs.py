"""What to evaluate: the rows of a ``facebooth batch`` manifest, or a folder of images with a prompts sidecar.

Accepted inputs, first match wins:
1. ``manifest.jsonl`` / ``manifest.csv`` in the run folder (written by ``facebooth batch``), or a manifest
   file given directly: one row per image;
2. a sidecar ``prompts.jsonl`` / ``prompts.csv`` (columns ``file``, ``prompt`` and optional ``face``,
   ``method``, ``setting``, ``seed``, ``category``), or ``prompts.txt`` with one prompt per image in
   sorted file-name order, or one ``<image>.txt`` caption beside each image.

Column names are matched loosely (``file``/``image``/``path``/``files``, ``prompt``/``$PROMPT``,
``face``/``face_image``/``$FACE_IMAGE``/``reference``, ``seed``/``$SEED``, ``method``/``workflow``); a
``status`` column other than ``done`` skips the row. Relative paths are relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
SIDECAR_NAMES = ("prompts.jsonl", "prompts.csv", "prompts.txt")

_ALIASES = {
    "file": ("file", "image", "path", "output", "files", "filename", "image_path"),
    "prompt": ("prompt", "$PROMPT", "PROMPT", "text", "caption"),
    "face": ("face", "face_image", "$FACE_IMAGE", "FACE_IMAGE", "reference", "ref", "identity_image"),
    "seed": ("seed", "$SEED", "SEED"),
    "method": ("method", "workflow"),
    "setting": ("setting", "settings", "variant"),
    "subject": ("subject", "identity", "person"),
    "category": ("category",),
}


class RunError(ValueError):
    """The run folder cannot be read as an evaluation input."""


@dataclass(frozen=True)
class EvalItem:
    file: Path
    prompt: str
    face: Optional[Path] = None
    method: str = ""
    setting: str = ""
    seed: str = ""
    subject: str = ""
    category: str = ""


def _pick(row: dict, key: str):
    for alias in _ALIASES[key]:
        if alias in row and row[alias] not in (None, ""):
            return row[alias]
    return None


def _files(value) -> list[str]:
    """A manifest cell may hold one path, a JSON list, or ';'-separated paths."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    return [p for p in (s.strip() for s in text.split(";")) if p]


def _resolve(base: Path, p: str) -> Path:
    """Relative paths are relative to the manifest's folder; a face path the batch got relative to its
    working directory is accepted when only that one exists."""
    path = Path(p)
    if path.is_absolute():
        return path
    return path if not (base / path).exists() and path.exists() else base / path


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise RunError(f"{path}, line {n}: not valid JSON ({exc.msg}).") from exc
            return rows
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise RunError(f"Cannot read {path}: {exc}") from exc


def items_from_rows(rows: Iterable[dict], base: Path, default_method: str) -> list[EvalItem]:
    items = []
    for row in rows:
        # nested job values (e.g. {"values": {"$PROMPT": ...}}) are flattened one level
        flat = dict(row)
        for v in row.values():
            if isinstance(v, str) and v.startswith("{"):  # a CSV cell holding the job's values as JSON
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    continue
            if isinstance(v, dict):
                flat = {**v, **flat}
        status = str(flat.get("status", "done")).lower()
        if status not in ("done", "ok", ""):
            continue
        prompt = _pick(flat, "prompt")
        files = _files(_pick(flat, "file"))
        if prompt is None or not files:
            continue
        face = _pick(flat, "face")
        faces = _files(face)
        for f in files:
            items.append(EvalItem(
                file=_resolve(base, f),
                prompt=str(prompt),
                face=_resolve(base, faces[0]) if faces else None,
                method=str(_pick(flat, "method") or default_method),
                setting=str(_pick(flat, "setting") or ""),
                seed=str(_pick(flat, "seed") or ""),
                subject=str(_pick(flat, "subject") or (Path(faces[0]).stem if faces else "")),
                category=str(_pick(flat, "category") or ""),
            ))
    return items


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def read_run(run: Path, reference: Optional[Path] = None, method: Optional[str] = None) -> list[EvalItem]:
    """Every image to evaluate in ``run`` (a folder or a manifest file). ``reference`` fills a missing face."""
    run = Path(run)
    if not run.exists():
        raise RunError(f"{run} does not exist. Give the output folder of a `facebooth batch` run or a folder of images.")
    default_method = method or (run.parent.name if run.is_file() else run.name)
    items: list[EvalItem] = []
    if run.is_file():
        items = items_from_rows(_read_rows(run), run.parent, default_method)
    else:
        source = next((run / n for n in MANIFEST_NAMES + SIDECAR_NAMES if (run / n).is_file()), None)
        if source is not None and source.suffix != ".txt":
            items = items_from_rows(_read_rows(source), run, default_method)
        elif source is not None:
            images = _images_in(run)
            prompts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(prompts) not in (1, len(images)):
                raise RunError(f"{source} has {len(prompts)} prompts for {len(images)} images: give one per image (sorted by name) or one for all.")
            items = [EvalItem(file=im, prompt=prompts[i if len(prompts) > 1 else 0], method=default_method) for i, im in enumerate(images)]
        else:
            for im in _images_in(run):
                caption = im.with_suffix(".txt")
                if caption.is_file():
                    items.append(EvalItem(file=im, prompt=caption.read_text(encoding="utf-8").strip(), method=default_method))
    if not items:
        raise RunError(
            f"Found nothing to evaluate in {run}: expected manifest.jsonl/.csv (facebooth batch), a prompts.jsonl/.csv/.txt "
            "sidecar, or <image>.txt captions beside the images."
        )
    missing = [it.file for it in items if not it.file.is_file()]
    if missing:
        raise RunError(f"{len(missing)} image file(s) listed in {run} do not exist, e.g. {missing[0]}.")
    if reference is not None:
        items = [it if it.face is not None else EvalItem(**{**it.__dict__, "face": Path(reference), "subject": it.subject or Path(reference).stem}) for it in items]
    return items
