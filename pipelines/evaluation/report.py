"""Write what ``facebooth eval`` reports: metrics.csv (per image), table.md (per method / setting, laid out
like the paper's table, with the paper's rows beneath), tradeoff.png (identity vs text, ours beside the
paper's) and report.html (best and worst images per method). matplotlib is imported lazily."""
from __future__ import annotations

import csv
import html
import io
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

from ...utils.files import atomic_write
from .evaluate import ScoredImage
from .protocols import NO_FACE_RULES, Protocol


@dataclass
class GroupSummary:
    method: str
    setting: str
    images: int
    identity: float  # mean over the images that count (NaN when none)
    identity_images: int
    detection_rate: float  # share of images with a face among those scored for identity (NaN when none)
    text: float
    clip_i: float

    def value(self, metric: str) -> float:
        return getattr(self, metric)


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summarize(rows: Sequence[ScoredImage]) -> list[GroupSummary]:
    groups: dict[tuple[str, str], list[ScoredImage]] = {}
    for r in rows:
        groups.setdefault((r.method, r.setting), []).append(r)
    out = []
    for (method, setting), rs in groups.items():
        scored = [r for r in rs if r.face_found is not None]
        out.append(GroupSummary(
            method=method, setting=setting, images=len(rs),
            identity=_mean([r.identity for r in rs]),
            identity_images=sum(not math.isnan(r.identity) for r in rs),
            detection_rate=(sum(bool(r.face_found) for r in scored) / len(scored)) if scored else math.nan,
            text=_mean([r.text for r in rs]),
            clip_i=_mean([r.clip_i for r in rs]),
        ))
    return sorted(out, key=lambda g: (g.method, g.setting))


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


# ------------------------------------------------------------------------------------------------ files


def write_text(path: Path, text: str) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write)


def write_metrics_csv(rows: Sequence[ScoredImage], path: Path) -> Path:
    buf = io.StringIO()
    names = [f.name for f in fields(ScoredImage)]
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = r.as_dict()
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()})
    return write_text(path, buf.getvalue())


def markdown_table(protocol: Protocol, groups: Sequence[GroupSummary], *, identity_label: str = "") -> str:
    cols = protocol.columns
    lines = [f"# {protocol.title or protocol.name}", ""]
    lines.append(f"Protocol `{protocol.name}`: {protocol.dataset}. Identity: {identity_label or protocol.identity_model} "
                 f"({protocol.identity_score.replace('_', ' ')}); images without a face are {NO_FACE_RULES[protocol.no_face]}. "
                 f"Text: CLIP {protocol.clip_model}" + (f", x{protocol.clip_scale:g}" if protocol.clip_scale != 1 else "")
                 + (f", clamped at {protocol.clip_clamp_min:g}" if protocol.clip_clamp_min is not None else "") + ".")
    if protocol.exclude_categories:
        lines.append(f"Prompts of the categories {', '.join(sorted(protocol.exclude_categories))} are left out of the identity score.")
    lines += ["", "## This run", ""]
    header = ["Method", "Setting"] + [f"{c.label} {_arrow(c.higher_is_better)}" for c in cols] + ["Face found", "Images"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for g in groups:
        cells = [g.method, g.setting or "–"] + [_fmt(g.value(c.metric)) for c in cols]
        cells += ["–" if math.isnan(g.detection_rate) else f"{100 * g.detection_rate:.1f}%", str(g.images)]
        lines.append("| " + " | ".join(cells) + " |")
    if protocol.reported:
        lines += ["", f"## Reported in the paper ({protocol.reported_table})", ""]
        header = ["Method", "Setting"] + [f"{c.label} {_arrow(c.higher_is_better)}" for c in cols]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in protocol.reported:
            lines.append("| " + " | ".join([r.method, r.setting or "–"] + [_fmt(r.values.get(c.metric)) for c in cols]) + " |")
    if protocol.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in protocol.notes]
    return "\n".join(lines) + "\n"


def _label(method: str, setting: str) -> str:
    return f"{method} ({setting})" if setting else method


def tradeoff_plot(protocol: Protocol, groups: Sequence[GroupSummary], path: Path) -> Path:
    """Identity (y) against text fidelity (x): one filled point per method/setting of this run, the paper's
    reported rows as hollow grey squares beside them."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    col = {c.metric: c for c in protocol.columns}
    ylabel = col["identity"].label if "identity" in col else "Identity"
    xlabel = col["text"].label if "text" in col else "Text fidelity"
    higher = col["identity"].higher_is_better if "identity" in col else True
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    paper = [r for r in protocol.reported if "identity" in r.values and "text" in r.values]
    if paper:
        ax.scatter([r.values["text"] for r in paper], [r.values["identity"] for r in paper], marker="s",
                   facecolors="none", edgecolors="0.45", s=60, label=f"paper ({protocol.reported_table.split(' (')[0] or 'reported'})")
        for i, r in enumerate(sorted(paper, key=lambda r: (r.values["text"], r.values["identity"]))):
            dy = (-10, 5, -18, 13)[i % 4]  # staggered so neighbouring labels do not print over each other
            ax.annotate(_label(r.method, r.setting), (r.values["text"], r.values["identity"]), fontsize=7, color="0.35",
                        xytext=(5, dy), textcoords="offset points")
    ours = [g for g in groups if not (math.isnan(g.text) or math.isnan(g.identity))]
    cmap = plt.get_cmap("tab10")
    for i, g in enumerate(ours):
        ax.scatter([g.text], [g.identity], color=cmap(i % 10), s=70, zorder=3, label=f"ours: {_label(g.method, g.setting)}")
        ax.annotate(_label(g.method, g.setting), (g.text, g.identity), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{xlabel} ↑ (CLIP {protocol.clip_model})")
    ax.set_ylabel(f"{ylabel} {_arrow(higher)} ({protocol.identity_model}, {protocol.identity_score.replace('_', ' ')})")
    ax.set_title(f"{protocol.title or protocol.name}: identity vs text fidelity", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ours or paper:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no method has both scores", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def _rank_key(rows: Sequence[ScoredImage], higher_identity: bool):
    """Combined rank: mean of the image's percentile in text and (where scored) identity within its group."""
    def pct(values: list[float], v: float) -> float:
        return sum(x <= v for x in values) / len(values)

    texts = [r.text for r in rows]
    idents = [(r.identity if higher_identity else -r.identity) for r in rows if not math.isnan(r.identity)]

    def key(r: ScoredImage) -> float:
        parts = [pct(texts, r.text)]
        if not math.isnan(r.identity) and idents:
            parts.append(pct(idents, r.identity if higher_identity else -r.identity))
        return sum(parts) / len(parts)

    return key


def html_report(protocol: Protocol, rows: Sequence[ScoredImage], groups: Sequence[GroupSummary], out_dir: Path,
                plot: Optional[Path], per_side: int = 4) -> Path:
    col = {c.metric: c for c in protocol.columns}
    higher = col["identity"].higher_is_better if "identity" in col else True
    e = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{e(protocol.title or protocol.name)}: evaluation</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;width:200px;margin:4px;vertical-align:top;"
        "font-size:11px}img{width:200px;height:auto;border:1px solid #ccc}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}</style>",
        f"<h1>{e(protocol.title or protocol.name)}</h1>",
    ]
    if plot is not None:
        parts.append(f"<img style='width:600px' src='{e(plot.name)}' alt='trade-off plot'>")
    parts.append("<table><tr><th>method</th><th>setting</th>" + "".join(f"<th>{e(c.label)}</th>" for c in protocol.columns)
                 + "<th>face found</th><th>images</th></tr>")
    for g in groups:
        det = "–" if math.isnan(g.detection_rate) else f"{100 * g.detection_rate:.1f}%"
        parts.append(f"<tr><td>{e(g.method)}</td><td>{e(g.setting)}</td>" + "".join(f"<td>{_fmt(g.value(c.metric))}</td>" for c in protocol.columns)
                     + f"<td>{det}</td><td>{g.images}</td></tr>")
    parts.append("</table>")

    def figure(r: ScoredImage) -> str:
        src = os.path.relpath(r.file, out_dir).replace(os.sep, "/")
        ident = "no face" if r.face_found is False else _fmt(r.identity)
        return (f"<figure><a href='{e(src)}'><img loading='lazy' src='{e(src)}'></a><figcaption>id {ident} · text {_fmt(r.text)}"
                f"<br>{e(r.text_prompt)}</figcaption></figure>")

    for g in groups:
        rs = [r for r in rows if (r.method, r.setting) == (g.method, g.setting)]
        key = _rank_key(rs, higher)
        ranked = sorted(rs, key=key, reverse=True)
        parts.append(f"<h2>{e(_label(g.method, g.setting))}</h2><h3>best</h3>")
        parts += [figure(r) for r in ranked[:per_side]]
        parts.append("<h3>worst</h3>")
        parts += [figure(r) for r in ranked[::-1][:per_side]]
    return write_text(out_dir / "report.html", "\n".join(parts) + "\n")
