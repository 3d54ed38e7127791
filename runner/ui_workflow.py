"""Convert between ComfyUI's API-format prompts and UI-format (litegraph) workflows, laid out for people.

Example workflows are authored once, in API format (``examples_workflows/api/<name>_api.json``: what /prompt
takes and headless users send), with a layout file beside it (``<name>.layout.json``: card title, Note text,
groups per stage). The UI twin that loads in the editor is generated from both with the live server's
/object_info. The editor's own rules decide which widgets a node has:

* an INT input gets a "control after generate" widget when its options say ``control_after_generate: true``,
  and, when they do not say it at all, when it is named ``seed`` or ``noise_seed`` (legacy convention of the
  frontend); a COMBO gets one only when the flag is true;
* an image-upload COMBO gets an "upload" widget that stores ``"image"``.

Those extra widgets occupy a slot in ``widgets_values``; getting them wrong shifts every later value.

Layout: each group is a column (groups that name the same ``column`` stack), nodes stack top to bottom in
the order the layout lists them, with the Note in its own column on the left. Sizes are the frontend's own
when ``sizes`` (measured in a real browser, see runner/browser.py) is given, else estimated generously.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a seed control to these unless told otherwise
VIRTUAL_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes: never queued

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: drawn above ``pos``
GAP_X, GAP_Y = 60, 40
GROUP_PAD, GROUP_TITLE = 20, 50
NOTE_WIDTH = 440
MIN_WIDTH = 300
MULTILINE_HEIGHT = 110  # room for a prompt box; the frontend's minimum is smaller


# ------------------------------------------------------------------------------------------- widgets


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


def has_seed_control(name: str, kind: str, opts: Mapping) -> bool:
    """Whether the editor adds a "control after generate" widget after this input's widget."""
    flag = opts.get("control_after_generate")
    if kind == "INT":
        return bool(flag) if flag is not None else name in SEED_NAMES
    return kind == "COMBO" and bool(flag)


def _frontend_default(info: dict, name: str, kind: str, opts: dict) -> Any:
    """The value the editor gives a widget whose input is linked (it keeps a value even then)."""
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        spec = info.get("input", {}).get("required", {}).get(name) or info.get("input", {}).get("optional", {}).get(name)
        choices = spec[0] if spec and isinstance(spec[0], list) else opts.get("options") or []
        return choices[0] if choices else None
    return {"STRING": "", "BOOLEAN": False}.get(kind, opts.get("min", 0))


def _extra_widget_values(name: str, kind: str, opts: dict) -> list[Any]:
    """Values the editor stores after a widget's own value (seed control, image upload)."""
    if has_seed_control(name, kind, opts):
        return ["fixed"]  # examples are reproducible; users switch to "randomize" themselves
    if opts.get("image_upload") or opts.get("upload") == "image":
        return ["image"]
    return []


def widget_names(info: dict) -> list[str]:
    """Names of the widgets the editor creates for a node, in ``widgets_values`` order."""
    names = []
    for name, kind, opts in _input_specs(info):
        if kind in WIDGET_TYPES and not opts.get("forceInput"):
            names.append(name)
            extra = _extra_widget_values(name, kind, opts)
            if extra == ["fixed"]:
                names.append("control_after_generate")
            elif extra:
                names.append("upload")
    return names


# ------------------------------------------------------------------------------------------- layout


def _depths(api: Mapping) -> dict[str, int]:
    """Column per node: longest path from a source, so an unlisted node still lands left to right."""
    memo: dict[str, int] = {}

    def depth(nid: str, stack: tuple = ()) -> int:
        if nid in memo:
            return memo[nid]
        if nid in stack:
            return 0
        d = 0
        for value in api[nid].get("inputs", {}).values():
            if _is_link(value, api):
                d = max(d, depth(str(value[0]), stack + (nid,)) + 1)
        memo[nid] = d
        return d

    for nid in api:
        depth(nid)
    return memo


def _is_link(value: Any, api: Mapping) -> bool:
    return isinstance(value, list) and len(value) == 2 and str(value[0]) in api


def estimate_size(node: dict, info: dict) -> list[float]:
    """A generous guess of the frontend's size for a node (used when no browser measured it)."""
    title = node.get("title") or info.get("display_name") or node["type"]
    n_widgets = len(node.get("widgets_values") or [])
    n_slots = max(len([i for i in node["inputs"] if "widget" not in i]), len(node["outputs"]))
    multiline = any(opts.get("multiline") for _, kind, opts in _input_specs(info) if kind == "STRING")
    width = max(MIN_WIDTH, 9 * len(title) + 60)  # wider than title_width: nothing measured this one
    height = 10 + 22 * n_slots + 26 * n_widgets + (MULTILINE_HEIGHT if multiline else 0)
    return [float(width), float(height)]


def title_width(node: dict, info: dict) -> float:
    """Room for the title (14 px sans-serif, about 7.5 px a character) beside the collapse dot and badge."""
    title = node.get("title") or info.get("display_name") or node["type"]
    return float(max(MIN_WIDTH, round(7.5 * len(title)) + 70))


def note_size(text: str) -> list[float]:
    lines = sum(max(1, -(-len(line) // 52)) for line in text.splitlines() or [""])
    return [float(NOTE_WIDTH), float(40 + 18 * lines)]


def _models_for(values: Iterable[Any], models: Mapping[str, Mapping]) -> list[dict]:
    """``properties.models`` entries for the widget values that name a downloadable file."""
    out = []
    for value in values:
        if isinstance(value, str) and value in models:
            out.append({"name": value, **models[value]})
    return out


def api_to_ui(
    api: Mapping,
    object_info: Mapping,
    layout: Mapping | None = None,
    *,
    sizes: Mapping[int, Iterable[float]] | None = None,
    models: Mapping[str, Mapping] | None = None,
) -> dict:
    """The UI workflow for ``api`` (placeholders already filled).

    ``layout``: {"title", "note", "groups": [{"title", "nodes": [ids], "column"?}]} (all optional).
    ``sizes``: node id -> [w, h] the frontend gave each node (a measured floor for the layout).
    ``models``: widget value -> {"url", "directory"} for files that can be downloaded.
    """
    layout = dict(layout or {})
    ids = {nid: int(nid) if str(nid).isdigit() else k + 1 for k, nid in enumerate(api)}
    links: list[list] = []
    nodes: dict[str, dict] = {}
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, opts in _input_specs(info):
            value = node.get("inputs", {}).get(name)
            is_link = _is_link(value, api)
            is_widget = kind in WIDGET_TYPES and not opts.get("forceInput")
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
            if is_widget or is_link or kind not in WIDGET_TYPES:
                inputs.append(entry)
            if is_widget:
                # A linked or omitted input still has a widget value: the one the editor would give it.
                given = name in node.get("inputs", {}) and not is_link
                widgets.append(value if given else _frontend_default(info, name, kind, opts))
                widgets.extend(_extra_widget_values(name, kind, opts))
        properties: dict[str, Any] = {"Node name for S&R": node["class_type"]}
        found = _models_for(widgets, models or {})
        if found:
            properties["models"] = found
        nodes[nid] = {
            "id": ids[nid],
            "type": node["class_type"],
            "pos": [0.0, 0.0],
            "size": [0.0, 0.0],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "properties": properties,
            "widgets_values": widgets,
            **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
        }
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        names = info.get("output_name") or info["output"]
        nodes[nid]["outputs"] = [
            {"name": names[k], "type": t if isinstance(t, str) else "COMBO", "links": out_links.get((nid, k), []), "slot_index": k}
            for k, t in enumerate(info["output"])
        ]
    sizes = {int(k): list(v) for k, v in (sizes or {}).items()}
    for n in nodes.values():
        guess = estimate_size(n, object_info[n["type"]])
        if n["id"] in sizes:
            # The frontend's minimum, widened so the title is not cut; prompt boxes keep room to type.
            info = object_info[n["type"]]
            multiline = any(o.get("multiline") for _, k, o in _input_specs(info) if k == "STRING")
            n["size"] = [max(sizes[n["id"]][0], title_width(n, info)), max(sizes[n["id"]][1], guess[1] if multiline else 0)]
        else:
            n["size"] = guess

    all_nodes = list(nodes.values())
    next_id = max(ids.values()) + 1
    note = None
    if layout.get("note"):
        note = {
            "id": next_id, "type": "Note", "pos": [0.0, 0.0], "size": note_size(layout["note"]),
            "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [layout["note"]], "title": layout.get("note_title", "Read me"),
            "color": "#432", "bgcolor": "#653",
        }
        if next_id in sizes:
            note["size"] = [max(a, b) for a, b in zip(sizes[next_id], note["size"])]
        all_nodes.append(note)
    groups = _place(api, nodes, layout, note)
    for order, n in enumerate(sorted(all_nodes, key=lambda n: (n["pos"][0], n["pos"][1]))):
        n["order"] = order
    ui = {
        "last_node_id": max(n["id"] for n in all_nodes),
        "last_link_id": len(links),
        "nodes": sorted(all_nodes, key=lambda n: n["id"]),
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"facebooth": "generated by runner/ui_workflow.py from api/; regenerate, do not edit by hand",
                  "ds": {"scale": 0.6, "offset": [20, 20]}},
        "version": 0.4,
    }
    return ui


def _place(api: Mapping, nodes: dict[str, dict], layout: Mapping, note: dict | None) -> list[dict]:
    """Set every node's ``pos``; return the groups' JSON."""
    specs = [dict(g) for g in layout.get("groups", [])]
    listed = {str(n) for g in specs for n in g.get("nodes", [])}
    unknown = listed - set(nodes)
    if unknown:
        raise ValueError(f"layout names node(s) {sorted(unknown)} that the workflow does not have")
    depths = _depths(api)
    for nid in sorted(set(nodes) - listed, key=lambda n: (depths[n], int(n) if n.isdigit() else 0)):
        # A node the layout forgot gets its own column after the groups, by graph depth.
        specs.append({"title": "", "nodes": [nid], "column": 1000 + depths[nid]})
    for k, g in enumerate(specs):
        g.setdefault("column", k)
    columns: dict[int, list[dict]] = {}
    for g in specs:
        columns.setdefault(int(g["column"]), []).append(g)

    x = 0.0
    if note is not None:
        note["pos"] = [x, TITLE_HEIGHT + GROUP_TITLE]
        x += note["size"][0] + GAP_X
    groups_json = []
    for col in sorted(columns):
        y = 0.0
        width = 0.0
        for g in columns[col]:
            members = [nodes[str(n)] for n in g["nodes"]]
            inner_w = max(n["size"][0] for n in members)
            top = y + (GROUP_TITLE if g.get("title") else 0)
            cy = top + GROUP_PAD
            for n in members:
                n["pos"] = [x + GROUP_PAD, cy + TITLE_HEIGHT]
                cy += TITLE_HEIGHT + n["size"][1] + GAP_Y
            bottom = cy - GAP_Y + GROUP_PAD
            if g.get("title"):
                groups_json.append({
                    "id": len(groups_json) + 1, "title": g["title"],
                    "bounding": [x, y, inner_w + 2 * GROUP_PAD, bottom - y],
                    "color": g.get("color", "#3f789e"), "font_size": 24, "flags": {},
                })
            width = max(width, inner_w + 2 * GROUP_PAD)
            y = bottom + GAP_Y
        x += width + GAP_X
    return groups_json


# ------------------------------------------------------------------------------------------- back to API


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The inverse, as the editor does it on 'Queue': widgets by declared order, links by id, Notes dropped."""
    link_src = {l[0]: (str(l[1]), l[2]) for l in ui["links"]}
    api: dict[str, dict] = {}
    for n in ui["nodes"]:
        if n["type"] in VIRTUAL_TYPES:
            continue
        info = object_info[n["type"]]
        values = list(n.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        for name, kind, opts in _input_specs(info):
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                value = values.pop(0) if values else opts.get("default")
                for _ in _extra_widget_values(name, kind, opts):
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


# ------------------------------------------------------------------------------------------- geometry


def node_rects(ui: Mapping) -> dict[int, tuple[float, float, float, float]]:
    """(x, y, w, h) of each node including its title bar, as the editor draws it."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT)
            for n in ui["nodes"]}


def overlaps(rects: Mapping[Any, tuple[float, float, float, float]]) -> list[tuple[Any, Any, float]]:
    """Pairs of rectangles that intersect, with the intersection area."""
    found = []
    items = list(rects.items())
    for i, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[i + 1:]:
            w = min(ax + aw, bx + bw) - max(ax, bx)
            h = min(ay + ah, by + bh) - max(ay, by)
            if w > 0 and h > 0:
                found.append((a, b, w * h))
    return found


def load_layout(path: str | Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
