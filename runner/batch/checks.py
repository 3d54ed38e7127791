"""Checks of every job against a server's ``/object_info`` before anything is queued (``--dry-run``).

All problems are collected, grouped by message with the jobs they concern, and reported at once: node types the
server lacks, placeholders nothing fills, files neither on this machine nor in the server's input folder, model
names the server does not list, and numbers outside an input's range. The same input specs convert table cells
(CSV gives strings) to the type each input takes.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..placeholders import find_placeholders
from .jobs import Job, fill, split_key

# A whole-value placeholder: "$NAME" or "${NAME}" / "${NAME:-default}" (see runner/placeholders.py).
_WHOLE = re.compile(r"^\$(?:([A-Z][A-Z0-9_]*)|\{([A-Z][A-Z0-9_]*)(?::-[^}]*)?\})$")


UNFILLED = "<unfilled placeholder>"


def input_spec(object_info: Mapping, class_type: str, name: str) -> tuple[Any, dict] | None:
    """(type, options) of one input as /object_info declares it, or None when the node does not declare it."""
    info = object_info.get(class_type) or {}
    for section in ("required", "optional"):
        spec = (info.get("input") or {}).get(section, {}).get(name)
        if spec is not None:
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            return kind, opts
    return None


def combo_options(kind: Any, opts: Mapping) -> list | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(opts.get("options") or [])
    return None


def is_upload_input(kind: Any, opts: Mapping) -> bool:
    """An input that takes a file from ComfyUI's input folder (LoadImage's ``image``)."""
    return combo_options(kind, opts) is not None and bool(opts.get("image_upload") or opts.get("upload"))


def placeholder_targets(workflow: Mapping) -> dict[str, list[tuple[str, str]]]:
    """Placeholder name -> the (node id, input) pairs whose whole value is that placeholder."""
    targets: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for node_id, node in workflow.items():
        for inp, value in (node.get("inputs") or {}).items():
            if isinstance(value, str):
                m = _WHOLE.match(value)
                if m:
                    targets[m.group(1) or m.group(2)].append((node_id, inp))
    return dict(targets)


def key_targets(workflow: Mapping, key: str) -> list[tuple[str, str]]:
    node, inp = split_key(key)
    if inp is not None:
        return [(node, inp)]
    return placeholder_targets(workflow).get(node, [])


def coerce(value: Any, kind: Any) -> Any:
    """A table cell converted to the input's type; values that do not convert are left for the checks."""
    try:
        if kind == "INT" and not isinstance(value, bool):
            return int(value) if not isinstance(value, float) or value.is_integer() else value
        if kind == "FLOAT" and not isinstance(value, bool):
            return float(value)
        if kind == "BOOLEAN" and isinstance(value, str):
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(value.lower(), value)
        if kind == "STRING" and not isinstance(value, str):
            return str(value)
    except (TypeError, ValueError):
        return value
    return value


def typed_values(workflow: Mapping, object_info: Mapping, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each converted to the type of the first input it fills (cells that fill nothing stay)."""
    out = {}
    for key, value in values.items():
        out[key] = value
        for node_id, inp in key_targets(workflow, key):
            spec = input_spec(object_info, workflow.get(node_id, {}).get("class_type", ""), inp)
            if spec is not None:
                out[key] = coerce(value, spec[0])
                break
    return out


def is_local_file(value: Any) -> bool:
    return isinstance(value, str) and os.path.isabs(value) and os.path.isfile(value)


@dataclass
class Problems:
    """Problem message -> job positions (1-based when shown); ``None`` for problems of the workflow itself."""

    by_message: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, message: str, position: int | None = None) -> None:
        jobs = self.by_message[message]
        if position is not None and (not jobs or jobs[-1] != position):
            jobs.append(position)

    def __bool__(self) -> bool:
        return bool(self.by_message)

    def __len__(self) -> int:
        return len(self.by_message)

    def lines(self, total: int) -> list[str]:
        out = []
        for message, positions in self.by_message.items():
            where = "" if not positions else " (all jobs)" if len(positions) == total else f" (job {_ranges(positions)})"
            out.append(message + where)
        return out


def _ranges(positions: Iterable[int]) -> str:
    nums = sorted({p + 1 for p in positions})
    parts, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts[:12]) + (" ..." if len(parts) > 12 else "")


def _check_value(problems: Problems, position: int, node_id: str, class_type: str, inp: str, value: Any,
                 object_info: Mapping) -> None:
    if value == UNFILLED or (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
        return  # reported as an unfilled placeholder, or a link to another node's output
    spec = input_spec(object_info, class_type, inp)
    if spec is None:
        return
    kind, opts = spec
    where = f"node {node_id} ({class_type}) input {inp!r}"
    options = combo_options(kind, opts)
    if options is not None:
        if is_upload_input(kind, opts):
            if not is_local_file(value) and value not in options:
                problems.add(f"missing file: {where} = {value!r} is neither a file here nor in the server's input folder",
                             position)
        elif value not in options:
            shown = ", ".join(map(str, options[:8])) + (" ..." if len(options) > 8 else "")
            problems.add(f"missing file or choice: {where} = {value!r} is not one the server lists ({shown or 'none'})",
                         position)
        return
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(f"not a number: {where} = {value!r} (expects {kind})", position)
            return
        low, high = opts.get("min"), opts.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            problems.add(f"out of range: {where} = {value!r} (allowed {low} .. {high})", position)


def check_jobs(workflow: Mapping, jobs: list[Job], object_info: Mapping, base_values: Mapping[str, Any], *,
               name: str = "workflow") -> Problems:
    """Every problem of every job, found without queueing anything."""
    problems = Problems()
    for node_id, node in workflow.items():
        if node.get("class_type") not in object_info:
            problems.add(f"missing node type: node {node_id} is {node.get('class_type')!r}, which the server does not "
                         "have (install the custom node pack that provides it, or check the pack's import errors)")
    placeholders = find_placeholders(workflow)
    for job in jobs:
        for key in job.values:
            node, inp = split_key(key)
            if inp is None and node not in placeholders:
                problems.add(f"unused column: {key!r} matches no placeholder of {name}", job.position)
            elif inp is not None and node not in workflow:
                problems.add(f"unknown node: column {key!r} names node {node!r}, which {name} does not have", job.position)
        missing = sorted(find_placeholders(workflow, required_only=True) - set(base_values) - {k for k in job.values if split_key(k)[1] is None})
        for m in missing:
            problems.add(f"unfilled placeholder: ${m} (give it a column, --set {m}=VALUE, or a matrix option)",
                         job.position)
        # The rest of the job is still checked: unfilled inputs hold a marker that the value checks skip.
        stand_in = {**dict.fromkeys(missing, UNFILLED), **base_values}
        try:
            api = fill(workflow, stand_in, typed_values(workflow, object_info, job.values), name=name)
        except (KeyError, ValueError) as exc:
            problems.add(str(exc), job.position)
            continue
        for node_id, node in api.items():
            ctype = node.get("class_type", "")
            if ctype not in object_info:
                continue
            for inp, value in (node.get("inputs") or {}).items():
                _check_value(problems, job.position, node_id, ctype, inp, value, object_info)
    return problems
