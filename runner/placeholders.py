"""Placeholders in the example workflows, and filling them in.

Example workflows (``examples_workflows/api/*_api.json``, API format) may not name files that only exist on
the author's machine, and their settings are the real ones (SD1.5 at 512 px, 20-30 steps). An input value may
be a placeholder that the runner fills in before queueing:

* a string that is exactly ``"$NAME"`` is replaced by the value of ``NAME`` with its own JSON type
  (so ``"seed": "$SEED"`` becomes an int);
* ``"${NAME:-DEFAULT}"`` (the whole string) is the same, but falls back to ``DEFAULT`` when nothing provides
  ``NAME``; ``DEFAULT`` is read as JSON when it parses (``"${STEPS:-25}"`` -> 25), else as text
  (``"${PROMPT:-a photo of a person}"``). A default cannot contain ``}``;
* ``"${NAME}"`` or ``"${NAME:-DEFAULT}"`` inside a longer string is replaced textually
  (``"FaceBooth/${WORKFLOW}"``).

``NAME`` is upper case (``[A-Z][A-Z0-9_]*``). Every example takes ``${PROMPT:-...}``, ``${FACE_IMAGE:-...}``
(when it reads a face) and ``${SEED:-...}`` with its own values as defaults, so a batch tool can fill them.
The defaults are what the editor copy (the UI twin) shows. The names the runner itself provides are listed in
runner/substitutions.py.

A workflow that uses a placeholder without default that nobody provides fails before it is queued, naming
the placeholder.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any, Iterable, Mapping

_EXACT = re.compile(r"^\$([A-Z][A-Z0-9_]*)$")
_BRACED = r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}"
_EXACT_BRACED = re.compile(r"^" + _BRACED + r"$")
_INLINE = re.compile(_BRACED)


class PlaceholderError(KeyError):
    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return str(self.args[0])



def _walk_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _walk_strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_strings(v)


def find_placeholders(workflow: Mapping, *, required_only: bool = False) -> set[str]:
    """Names of the placeholders in ``workflow`` (``required_only``: those without a default)."""
    names: set[str] = set()
    for node in workflow.values():
        for s in _walk_strings(node.get("inputs", {})):
            m = _EXACT.match(s)
            if m:
                names.add(m.group(1))
            names.update(mm.group(1) for mm in _INLINE.finditer(s) if not (required_only and mm.group(2) is not None))
    return names


def placeholder_defaults(workflow: Mapping) -> dict[str, Any]:
    """The defaults the workflow gives its placeholders (``${NAME:-DEFAULT}``), typed as a whole-value fill."""
    found: dict[str, Any] = {}
    for node in workflow.values():
        for s in _walk_strings(node.get("inputs", {})):
            for mm in _INLINE.finditer(s):
                if mm.group(2) is not None:
                    found.setdefault(mm.group(1), _typed(mm.group(2)) if mm.group(0) == s else mm.group(2))
    return found


def _typed(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _lookup(name: str, default: str | None, values: Mapping[str, Any], typed: bool) -> Any:
    if name in values:
        return values[name]
    if default is None:
        raise KeyError(name)
    return _typed(default) if typed else default


def _fill(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        m = _EXACT.match(value)
        if m:
            return values[m.group(1)]
        m = _EXACT_BRACED.match(value)
        if m:
            return _lookup(m.group(1), m.group(2), values, typed=True)
        return _INLINE.sub(lambda mm: str(_lookup(mm.group(1), mm.group(2), values, typed=False)), value)
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    return value


def substitute(workflow: Mapping, values: Mapping[str, Any], *, name: str = "workflow") -> dict:
    """A copy of ``workflow`` with every placeholder filled; raises ``PlaceholderError`` naming missing ones."""
    missing = sorted(find_placeholders(workflow, required_only=True) - set(values))
    if missing:
        raise PlaceholderError(
            f"{name} uses placeholder(s) {', '.join('$' + m for m in missing)} that nothing provides. "
            f"Pass --set {missing[0]}=VALUE, or see runner/substitutions.py for the names the runner fills in."
        )
    out = copy.deepcopy(dict(workflow))
    for node in out.values():
        node["inputs"] = _fill(node.get("inputs", {}), values)
    return out
