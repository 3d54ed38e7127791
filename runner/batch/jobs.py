"""The job spec: one API workflow, and jobs whose values fill it.

A job is a mapping of *keys* to values. A key is either a placeholder name (``PROMPT`` or ``$PROMPT`` in a table
header; see ``runner/placeholders.py`` for the placeholder syntax) or ``<node id>.<input name>`` (``3.steps``), which
sets that input of that node after the placeholders are filled. Jobs come from a table (CSV or JSONL, one job
per row) or from a matrix of faces x prompts x seeds.

Every job has a stable key (a hash of its values) and a file name derived from it, so re-running the same
command finds the same jobs in the journal and writes the same file names.
"""
from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..placeholders import substitute

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Table columns that label a job instead of filling the workflow.
LABEL_COLUMNS = ("identity",)
_NODE_INPUT = re.compile(r"^([^.\s]+)\.([A-Za-z_][A-Za-z0-9_]*)$")
_PLACEHOLDER = re.compile(r"^\$?([A-Z][A-Z0-9_]*)$")


@dataclass(frozen=True)
class Job:
    position: int
    values: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        canon = json.dumps(self.values, sort_keys=True, default=str)
        return hashlib.sha1(canon.encode()).hexdigest()[:16]

    @property
    def identity(self) -> str:
        if self.labels.get("identity"):
            return self.labels["identity"]
        face = self.values.get("FACE_IMAGE")
        return Path(str(face)).stem if face not in (None, "") else ""

    @property
    def prompt(self) -> str:
        return str(self.values.get("PROMPT", ""))

    @property
    def seed(self) -> Any:
        return self.values.get("SEED")

    @property
    def name(self) -> str:
        """File stem of this job's outputs: readable labels plus the key, so it is unique and stable."""
        parts = [slug(self.identity, 24), slug(self.prompt, 32)]
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        return "_".join(p for p in parts if p) + ("_" if any(parts) else "") + self.key[:8]


def slug(text: str, limit: int = 32) -> str:
    out = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return out[:limit].strip("-")


def split_key(key: str) -> tuple[str, str | None]:
    """('PLACEHOLDER', None) or ('node id', 'input') for a table key; raises ValueError for neither."""
    m = _PLACEHOLDER.match(key.strip())
    if m:
        return m.group(1), None
    m = _NODE_INPUT.match(key.strip())
    if m:
        return m.group(1), m.group(2)
    raise ValueError(
        f"Column {key!r} is neither a placeholder (PROMPT, $SEED, ...) nor a node input (<node id>.<input>, e.g. 3.steps)."
    )


def normalise_key(key: str) -> str:
    node, inp = split_key(key)
    return node if inp is None else f"{node}.{inp}"


def _resolve_file(value: Any, base: Path) -> Any:
    """A relative path to an existing file next to the table (or the working folder) becomes absolute."""
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 1024:
        return value
    for root in (base, Path.cwd()):
        candidate = (root / value).expanduser()
        try:
            if candidate.is_file():
                return str(candidate.resolve())
        except OSError:
            pass
    return value


def _make_job(position: int, row: Mapping[str, Any], base: Path) -> Job:
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for raw_key, value in row.items():
        if raw_key is None:
            raise ValueError(f"row {position + 1} has more cells than the header has columns")
        key = raw_key.strip()
        if not key:
            continue
        if key.lower() in LABEL_COLUMNS:
            labels[key.lower()] = str(value)
            continue
        if value is None or value == "":
            continue  # an empty cell leaves the workflow's own value
        values[normalise_key(key)] = _resolve_file(value, base)
    return Job(position, values, labels)


def load_table(path: str | os.PathLike) -> list[Job]:
    """Jobs from a CSV (header row of keys) or JSONL (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Job table not found: {path}")
    base = path.parent.resolve()
    rows: list[Mapping[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n} must be a JSON object (key -> value)")  # noqa: TRY004 (bad user data)
            rows.append(row)
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: job tables are .csv or .jsonl files")
    return [_make_job(i, row, base) for i, row in enumerate(rows)]


def find_faces(spec: str) -> list[Path]:
    """Face images from a folder (its image files, sorted) or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in sorted(globlib.glob(os.path.expanduser(spec)))]
        found = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not found:
        raise FileNotFoundError(f"--faces {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) found there.")
    return [p.resolve() for p in found]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one per line).")
    return prompts


def matrix_jobs(faces: Iterable[Path] | None, prompts: Iterable[str] | None, seeds: int, seed_base: int = 0) -> list[Job]:
    """faces x prompts x seeds, identity-major. A missing axis is left to the workflow's own value."""
    face_axis: list[Path | None] = list(faces) if faces else [None]
    prompt_axis: list[str | None] = list(prompts) if prompts else [None]
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    jobs = []
    for face in face_axis:
        for prompt in prompt_axis:
            for seed in range(seed_base, seed_base + seeds):
                values: dict[str, Any] = {"SEED": seed}
                if face is not None:
                    values["FACE_IMAGE"] = str(face)
                if prompt is not None:
                    values["PROMPT"] = prompt
                jobs.append(Job(len(jobs), values))
    return jobs


def duplicate_keys(jobs: Iterable[Job]) -> list[tuple[int, int]]:
    """Pairs of positions whose values are identical (they would be one job)."""
    seen: dict[str, int] = {}
    dups = []
    for job in jobs:
        if job.key in seen:
            dups.append((seen[job.key], job.position))
        else:
            seen[job.key] = job.position
    return dups


def fill(workflow: Mapping, base_values: Mapping[str, Any], job_values: Mapping[str, Any], *, name: str) -> dict:
    """The workflow with placeholders filled (base values, then the job's) and the job's node inputs set."""
    values = dict(base_values)
    node_inputs: dict[tuple[str, str], Any] = {}
    for key, value in job_values.items():
        node, inp = split_key(key)
        if inp is None:
            values[node] = value
        else:
            node_inputs[(node, inp)] = value
    api = substitute(workflow, values, name=name)
    for (node, inp), value in node_inputs.items():
        if node not in api:
            raise KeyError(f"{name}: the job sets {node}.{inp} but the workflow has no node {node!r}")
        api[node].setdefault("inputs", {})[inp] = value
    return api
