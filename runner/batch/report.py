"""``report.html`` (a thumbnail grid per identity x prompt, failed jobs with their errors) and the manifest
(``manifest.csv`` and ``manifest.jsonl``, one record per image and one per failed job), from the journal.

When images carry an ID similarity (from the workflow's ID Similarity node or ``--score``), the manifest has it
and the report sorts by it: identities by their mean, images in a cell best first.
"""
from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import mean

from .journal import Row

MANIFEST_FIELDS = ["job", "name", "identity", "prompt", "seed", "status", "server", "file", "id_similarity",
                   "seconds", "attempts", "error", "values"]


def manifest_records(rows: Iterable[Row]) -> list[dict]:
    records = []
    for row in rows:
        base = {"job": row.key, "name": row.name, "identity": row.identity, "prompt": row.prompt, "seed": row.seed,
                "status": row.status, "server": row.server or "", "seconds": row.seconds, "attempts": row.attempts,
                "error": row.error or "", "values": row.values}
        if row.status == "done":
            scores = row.scores or []
            for k, path in enumerate(row.files):
                score = scores[k] if k < len(scores) else None
                records.append({**base, "file": path, "id_similarity": score})
        elif row.status == "failed":
            records.append({**base, "file": "", "id_similarity": None})
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_manifest(out_dir: Path, rows: list[Row]) -> tuple[Path, Path]:
    records = manifest_records(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "values": json.dumps(r["values"], sort_keys=True),
                         "id_similarity": "" if r["id_similarity"] is None else f"{r['id_similarity']:.4f}"})
    csv_path, jsonl_path = out_dir / "manifest.csv", out_dir / "manifest.jsonl"
    _write_atomic(csv_path, buf.getvalue())
    _write_atomic(jsonl_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return csv_path, jsonl_path


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 6px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; max-width: 18em; }
figure { display: inline-block; margin: 2px; text-align: center; font-size: 11px; }
figure img { width: 128px; height: 128px; object-fit: contain; background: #eee; display: block; }
.failed { color: #a00; white-space: pre-wrap; font-family: monospace; font-size: 12px; }
"""


def render_html(rows: list[Row], title: str) -> str:
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status == "failed"]
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "failed", "pending", "running")}
    cells: dict[tuple[str, str], list[tuple[float | None, str, Row]]] = defaultdict(list)
    for r in done:
        for k, path in enumerate(r.files):
            score = r.scores[k] if r.scores and k < len(r.scores) else None
            cells[(r.identity, r.prompt)].append((score, path, r))
    identities = list(dict.fromkeys(r.identity for r in rows))
    prompts = list(dict.fromkeys(r.prompt for r in rows))
    scored = any(s is not None for items in cells.values() for s, _, _ in items)
    if scored:
        def identity_mean(ident: str) -> float:
            values = [s for (i, _), items in cells.items() if i == ident for s, _, _ in items if s is not None]
            return mean(values) if values else float("-inf")

        identities.sort(key=identity_mean, reverse=True)
        for items in cells.values():
            items.sort(key=lambda t: float("-inf") if t[0] is None else t[0], reverse=True)
    esc = html.escape
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{esc(title)}</h1>")
    out = [head,
           "<p>" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) +
           (" &mdash; sorted by ID similarity" if scored else "") + "</p>",
           "<table><tr><th>identity \\ prompt</th>" + "".join(f"<th>{esc(p) or '(workflow prompt)'}</th>" for p in prompts) + "</tr>"]
    for ident in identities:
        out.append(f"<tr><th>{esc(ident) or '(no face)'}</th>")
        for prompt in prompts:
            figs = []
            for score, path, r in cells.get((ident, prompt), []):
                caption = f"seed {esc(str(r.seed))}" if r.seed is not None else esc(r.name)
                if score is not None:
                    caption += f" &middot; ID {score:.3f}"
                figs.append(f"<figure><a href='{esc(path)}'><img loading='lazy' src='{esc(path)}' "
                            f"alt='{esc(r.name)}'></a><figcaption>{caption}</figcaption></figure>")
            failures = [r for r in failed if r.identity == ident and r.prompt == prompt]
            figs += [f"<div class='failed'>seed {esc(str(r.seed))}: failed</div>" for r in failures]
            out.append("<td>" + "".join(figs) + "</td>")
        out.append("</tr>")
    out.append("</table>")
    if failed:
        out.append(f"<h2>Failed jobs ({len(failed)})</h2><table><tr><th>job</th><th>attempts</th><th>error</th></tr>")
        for r in failed:
            out.append(f"<tr><td>{esc(r.name)}</td><td>{r.attempts}</td><td class='failed'>{esc(r.error or '')}</td></tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(out_dir: Path, rows: list[Row], title: str = "FaceBooth batch") -> Path:
    path = out_dir / "report.html"
    _write_atomic(path, render_html(rows, title))
    return path
