"""docs/nodes.md, generated from a live ComfyUI's /object_info so the reference matches what users see."""
from __future__ import annotations

from pathlib import Path

PREFIX = "FaceBooth"
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "nodes.md"


def _type_name(spec) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(kind, list):
        return "COMBO"
    return str(kind)


def _cell(text) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


# Which base-model families each method runs on (kept here so the generated reference states it).
FAMILY_TABLE = [
    '## Base-model families',
    '',
    '| method | SD1.x | SD2.x | SDXL family (SDXL, Pony, Illustrious, SSD-1B, Vega, KOALA) |',
    '|---|---|---|---|',
    '| Cross Initialization | yes | yes | yes: both text encoders, file holds `clip_l` + `clip_g` |',
    '| PersonaMagic | yes | yes | yes: mapper tokens in both text encoders, V path on the 2048-wide context, a pooled output per timestep bin; a mapper applied on another family is refused, naming both |',
    '| MultiDiffusion | yes | yes | yes: each region its own pooled output and size conditioning; window_size 0 = 1024 px views |',
    '| Face2Diffusion | yes | no | no: refused before sampling, naming both families and what to use |',
    '| PortraitBooth (FastComposer weights) | yes | no | no: refused before sampling, naming both families and what to use |',
    '| InstantBooth | yes | no | no: refused before sampling, naming both families and what to use |',
    '',
]


def render_node_docs(object_info: dict) -> str:
    nodes = {k: v for k, v in object_info.items() if k.startswith(PREFIX)}
    lines = [
        "# FaceBooth node reference",
        "",
        "Generated from a running ComfyUI's `/object_info` by `python -m facebooth examples --write-ui`;",
        "do not edit by hand. Every input and output carries the tooltip shown here.",
        "",
        *FAMILY_TABLE,
    ]
    by_category: dict[str, list[str]] = {}
    for node_id, info in nodes.items():
        by_category.setdefault(info.get("category", ""), []).append(node_id)
    for category in sorted(by_category):
        lines += [f"## {category}", ""]
        for node_id in sorted(by_category[category], key=lambda n: nodes[n].get("display_name", n)):
            info = nodes[node_id]
            lines += [f"### {info.get('display_name', node_id)} (`{node_id}`)", "", _cell(info.get("description")), ""]
            lines += ["| input | type | default | tooltip |", "|---|---|---|---|"]
            for section in ("required", "optional"):
                for name, spec in info.get("input", {}).get(section, {}).items():
                    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    optional = " (optional)" if section == "optional" else ""
                    lines.append(f"| `{name}`{optional} | {_type_name(spec)} | {_cell(opts.get('default', ''))} | {_cell(opts.get('tooltip'))} |")
            lines += ["", "| output | type | tooltip |", "|---|---|---|"]
            names = info.get("output_name") or info.get("output", [])
            tips = info.get("output_tooltips") or [""] * len(names)
            for name, kind, tip in zip(names, info.get("output", []), tips):
                lines.append(f"| `{name}` | {kind} | {_cell(tip)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def write_node_docs(object_info: dict, path: Path = DOCS_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_node_docs(object_info), encoding="utf-8")
    tmp.replace(path)
    return path
