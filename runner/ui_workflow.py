"""Convert between ComfyUI's API-format prompts and UI-format (litegraph) workflows.

Example workflows are authored once, in API format (what /prompt takes and headless users send). The UI
twin that loads in the editor is generated from it with the live server's /object_info, and checked back
by converting UI → API, so the two never drift apart.
"""
from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH = 360
ROW_HEIGHT = 260


def _input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) for every input, required first, in the node's declared order."""
    specs = []
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    for section in ("required", "optional"):
        declared = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            spec = declared.get(name)
            if spec is None:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, "COMBO" if isinstance(kind, list) else str(kind), opts))
    return specs


def _extra_widget_values(kind: str, opts: dict) -> list[Any]:
    """Values the editor stores after a widget's own value (seed control, image upload)."""
    if opts.get("control_after_generate"):
        return ["fixed"]
    if opts.get("image_upload") or opts.get("upload") == "image":
        return ["image"]
    return []


def _depths(api: dict) -> dict[str, int]:
    """Column per node: longest path from a source, so the layout reads left to right."""
    memo: dict[str, int] = {}

    def depth(nid: str, stack: tuple = ()) -> int:
        if nid in memo:
            return memo[nid]
        if nid in stack:
            return 0
        d = 0
        for value in api[nid].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in api:
                d = max(d, depth(str(value[0]), stack + (nid,)) + 1)
        memo[nid] = d
        return d

    for nid in api:
        depth(nid)
    return memo


def api_to_ui(api: dict, object_info: dict) -> dict:
    ids = {nid: int(nid) if str(nid).isdigit() else k + 1 for k, nid in enumerate(api)}
    depths = _depths(api)
    rows: dict[int, int] = {}
    links: list[list] = []
    nodes: list[dict] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, opts in _input_specs(info):
            value = node.get("inputs", {}).get(name)
            is_link = isinstance(value, list) and len(value) == 2 and str(value[0]) in api
            is_widget = kind in WIDGET_TYPES
            entry: dict[str, Any] = {"name": name, "type": kind, "link": None}
            if is_widget:
                entry["widget"] = {"name": name}
            if is_link:
                link_id = len(links) + 1
                src, slot = str(value[0]), int(value[1])
                out_type = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, ids[src], slot, ids[nid], len(inputs), out_type if isinstance(out_type, str) else "COMBO"])
                out_links.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
            if is_widget or is_link:
                inputs.append(entry)
            if is_widget:
                widgets.append(value if not is_link else opts.get("default"))
                widgets.extend(_extra_widget_values(kind, opts))
        col = depths[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append(
            {
                "id": ids[nid],
                "type": node["class_type"],
                "pos": [40 + col * COLUMN_WIDTH, 40 + row * ROW_HEIGHT],
                "size": [320, 200],
                "flags": {},
                "order": 0,
                "mode": 0,
                "inputs": inputs,
                "outputs": [],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
                **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
            }
        )
    for n, (nid, node) in zip(nodes, api.items()):
        info = object_info[node["class_type"]]
        names = info.get("output_name") or info["output"]
        n["outputs"] = [
            {"name": names[k], "type": t if isinstance(t, str) else "COMBO", "links": out_links.get((nid, k), []), "slot_index": k}
            for k, t in enumerate(info["output"])
        ]
    for order, n in enumerate(sorted(nodes, key=lambda n: (n["pos"][0], n["pos"][1]))):
        n["order"] = order
    return {
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": sorted(nodes, key=lambda n: n["id"]),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"facebooth": "generated from the API-format twin by runner/ui_workflow.py"},
        "version": 0.4,
    }


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The inverse, as the editor does it on 'Queue': widgets by declared order, links by id."""
    link_src = {l[0]: (str(l[1]), l[2]) for l in ui["links"]}
    api: dict[str, dict] = {}
    for n in ui["nodes"]:
        info = object_info[n["type"]]
        values = list(n.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        for name, kind, opts in _input_specs(info):
            if kind in WIDGET_TYPES:
                value = values.pop(0) if values else opts.get("default")
                for _ in _extra_widget_values(kind, opts):
                    if values:
                        values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                src, slot = link_src[linked[name]]
                inputs[name] = [src, slot]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
        if n.get("title"):
            api[str(n["id"])]["_meta"] = {"title": n["title"]}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
