"""``python -m facebooth eval RUN_DIR --protocol cross_init|f2d|portraitbooth|personamagic|instantbooth|custom``

Scores the images of a ``facebooth batch`` run (its manifest.jsonl/.csv) or of any folder of images with a
prompts sidecar, under one of the papers' evaluation protocols (pipelines/evaluation/protocols/*.json), and
writes into ``--out`` (default: RUN_DIR/eval-<protocol>):

* ``metrics.csv``: one row per image (identity, face found, CLIP score, CLIP-I, the CLIP sentence, category);
* ``table.md``: one row per method / setting, with the protocol's columns, beside the paper's reported table;
* ``tradeoff.png``: identity against text fidelity, ours and the paper's;
* ``report.html``: the table, the plot, and the best and worst images of each method.

Models are found through the weights manifest (``--models-dir`` / ``--comfyui-dir`` / ``$COMFYUI_DIR``,
extra_model_paths.yaml included) or given as files. ``--write-prompts FILE --trigger WORD`` writes the
protocol's generation prompts for ``facebooth batch --prompts`` instead of evaluating.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .weights import UsageError, resolve_model_dirs

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..pipelines.evaluation.protocols import available_protocols

    p = subparsers.add_parser(
        "eval",
        help="score a batch run with a paper's identity / text-fidelity protocol (table, plot, HTML)",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="batch output folder, manifest file, or folder of images with prompts; several runs compare "
                   "methods, each named by its folder or as NAME=PATH")
    p.add_argument("--protocol", default="custom", help=f"one of {', '.join(available_protocols())}, or a protocol .json file")
    p.add_argument("--out", type=Path, default=None, help="where to write the results (default RUN/eval-<protocol>)")
    p.add_argument("--reference", type=Path, default=None, help="reference face photo for rows that name none")
    p.add_argument("--method", default=None, help="method name for rows that name none (default: the folder name)")
    p.add_argument("--trigger", action="append", default=[], metavar="TEXT",
                   help="the subject's trigger in the prompts (e.g. embedding:alice, sks); replaced as the protocol says for the CLIP score (repeatable)")
    p.add_argument("--class-word", default=None, help="word that stands for the subject in the CLIP sentence (overrides the protocol)")
    p.add_argument("--categories", default=None, help="comma-separated prompt categories to keep (e.g. accessory,action,context)")
    p.add_argument("--models-dir", type=Path, default=None, help="ComfyUI's models folder (default: $COMFYUI_DIR/models, else $FACEBOOTH_MODELS_DIR)")
    p.add_argument("--comfyui-dir", type=Path, default=None, help="ComfyUI folder: uses its models/ and extra_model_paths.yaml")
    p.add_argument("--extra-model-paths", type=Path, action="append", default=[], metavar="YAML", help="extra_model_paths.yaml to search too")
    p.add_argument("--clip-model", default=None, help="open_clip architecture (default: the protocol's, e.g. ViT-B-32-quickgelu)")
    p.add_argument("--clip-weights", type=Path, default=None, help="CLIP weight file (default: the protocol's manifest entry)")
    p.add_argument("--clip-config", type=Path, default=None, help="open_clip model-config JSON for an architecture open_clip lacks")
    p.add_argument("--face-backend", choices=["torch", "insightface", "none"], default="torch",
                   help="face analysis for identity: torch (MTCNN + ArcFace), insightface (a pack), none (text scores only)")
    p.add_argument("--arcface", type=Path, default=None, help="ArcFace backbone file (torch backend; default: the manifest's)")
    p.add_argument("--insightface-pack", default="antelopev2", help="insightface pack name (insightface backend)")
    p.add_argument("--facenet", type=Path, default=None, help="FaceNet VGGFace2 file (default: the manifest's facenet-vggface2)")
    p.add_argument("--face-mode", choices=["detect", "aligned"], default="detect",
                   help="'aligned': images are already aligned face crops (no detection)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model pass")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    p.add_argument("--write-prompts", type=Path, default=None, metavar="FILE",
                   help="write the protocol's generation prompts (one per line, each --trigger substituted) and exit")
    p.set_defaults(func=run)
    return p


def _write_prompts(protocol, path: Path, triggers: Sequence[str]) -> int:
    from ..pipelines.evaluation.report import write_text

    if not protocol.prompts:
        raise UsageError(f"Protocol {protocol.name} lists no prompts (the paper does not); write your own prompts file.")
    trigger = triggers[0] if triggers else (protocol.placeholder or "")
    lines = [protocol.generation_prompt(p.text, trigger) for p in protocol.prompts]
    write_text(path, "\n".join(lines) + "\n")
    if not protocol.prompts_complete:
        log.warning("The paper lists only some of its prompts; %d written. See the protocol's notes.", len(lines))
    sys.stdout.write(f"{path}\n")
    return 0


def _named(arg: str) -> tuple[Optional[str], Path]:
    """``NAME=PATH`` names a run's method; a plain PATH is named by its folder."""
    name, sep, path = arg.partition("=")
    if sep and name and not Path(arg).exists():
        return name, Path(path)
    return None, Path(arg)


class _Progress:
    """A tqdm bar on stderr (a log line per chunk when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int, preview=None) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            log.info("scored %d/%d images", done, total)
            return
        if self.bar is None:
            self.bar = tqdm(total=total, unit="img", desc="eval", file=sys.stderr, disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from ..pipelines.evaluation import report
    from ..pipelines.evaluation.evaluate import evaluate_items
    from ..pipelines.evaluation.models import MissingModelError, build_analyzer, build_clip, build_identity
    from ..pipelines.evaluation.protocols import ProtocolError, load_protocol
    from ..pipelines.evaluation.runs import RunError, read_run
    from ..pipelines.runtime import RunHooks

    try:
        protocol = load_protocol(args.protocol).with_overrides(class_word=args.class_word)
        if args.write_prompts is not None:
            return _write_prompts(protocol, args.write_prompts, args.trigger)
        if not args.runs:
            raise UsageError("Give the run folder (or manifest file) to evaluate.")
        runs = [_named(r) for r in args.runs]
        items = [it for name, path in runs for it in read_run(path, reference=args.reference, method=name or args.method)]
        dirs = resolve_model_dirs(args, required=False)
        clip = build_clip(protocol, dirs, weights=args.clip_weights, model_name=args.clip_model, config=args.clip_config, device=args.device)
        identity = None
        if args.face_backend != "none" and any(it.face is not None for it in items):
            analyzer = build_analyzer(dirs, backend=args.face_backend, arcface=args.arcface, pack=args.insightface_pack,
                                      need_recognizer=protocol.identity_model == "arcface", device=args.device)
            identity = build_identity(protocol, analyzer, dirs, facenet=args.facenet, mode=args.face_mode, device=args.device)
        elif args.face_backend != "none":
            log.warning("No row names a reference face (use --reference PHOTO): identity and CLIP-I are not scored.")
    except (UsageError, ProtocolError, RunError, MissingModelError, FileNotFoundError, ValueError, ImportError) as exc:
        log.error("%s", exc)
        return 2
    categories = set(args.categories.split(",")) if args.categories else None
    first = runs[0][1]
    out = args.out or (first if first.is_dir() else first.parent) / f"eval-{protocol.name}"
    bar = _Progress()
    log.info("Evaluating %d images with protocol %s (CLIP %s, identity %s)", len(items), protocol.name, clip.name,
             identity.recognizer_name if identity else "off")
    try:
        rows = evaluate_items(items, protocol, clip, identity, triggers=args.trigger, categories=categories,
                              batch_size=args.batch_size, hooks=RunHooks(progress=bar))
    finally:
        bar.close()
    groups = report.summarize(rows)
    report.write_metrics_csv(rows, out / "metrics.csv")
    report.write_text(out / "table.md", report.markdown_table(protocol, groups, identity_label=identity.recognizer_name if identity else "off"))
    plot = None if args.no_plot else report.tradeoff_plot(protocol, groups, out / "tradeoff.png")
    report.html_report(protocol, rows, groups, out, plot)
    sys.stdout.write((out / "table.md").read_text(encoding="utf-8"))
    log.info("Wrote %s (metrics.csv, table.md, %sreport.html)", out, "" if plot is None else "tradeoff.png, ")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .main import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])
