"""An input an API workflow leaves out runs at the node's declared default; the editor sends that default."""
from __future__ import annotations

from typing import Any, Mapping


def drop_declared_defaults(queued: dict, expected: Mapping, object_info: Mapping[str, Any]) -> dict:
    """``queued`` without the inputs ``expected`` leaves out, after checking each equals its declared default.

    Raises AssertionError naming the node and input when a left-out input carries anything but the default.
    """
    out = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in queued.items()}
    for nid, node in expected.items():
        spec_inputs = object_info[node["class_type"]]["input"]
        declared = {**spec_inputs.get("required", {}), **spec_inputs.get("optional", {})}
        for name in set(out.get(nid, {}).get("inputs", {})) - set(node["inputs"]):
            spec = declared.get(name, [None, {}])
            default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
            if default is None and isinstance(spec[0], list) and spec[0]:
                default = spec[0][0]
            value = out[nid]["inputs"].pop(name)
            assert value == default, f"node {nid} input {name!r}: {value!r} is not its declared default {default!r}"
    return out
