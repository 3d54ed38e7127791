"""``python -m facebooth examples``: run the example workflows headless in a real ComfyUI.

Without ``--server`` it starts a ComfyUI from ``--comfyui-dir`` (default ``$COMFYUI_DIR``, else the ComfyUI
whose ``custom_nodes`` this pack was cloned into) on a temporary base
directory with this pack linked into ``custom_nodes`` and, unless ``--checkpoint`` is given, the embedded
default models: a random SD1.5 checkpoint and random face models (cached in ``$FACEBOOTH_CACHE`` or
``~/.cache/facebooth``). Random weights produce noise, not portraits: the run shows that every workflow
executes. Pass ``--checkpoint`` and ``--face`` to see real results.

Every output image lands in ``--out`` with a ``contact_sheet.png``; a summary goes to stdout, progress to
stderr. Exit status: 0 all workflows ran, 1 a workflow failed, 2 the run could not start (ComfyUI missing or
unreachable, a model missing, no workflow matched).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runner import examples as ex
from ..runner.local_setup import LocalSetupError, MissingModelError, local_comfyui
from ..runner.placeholders import PlaceholderError
from ..runner.run import check_checkpoint_available, run_workflow, to_pil, upload_faces
from ..runner.substitutions import TEST_SIZE_VALUES
from ..runner.client import (
    ComfyClient,
    ComfyUnreachableError,
    ProgressEvent,
    WorkflowFailedError,
    WorkflowRejectedError,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "examples",
        help="run the example workflows in a real ComfyUI and write their images + a contact sheet",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="URL", help="use a ComfyUI that is already running (e.g. http://127.0.0.1:8188)")
    where.add_argument("--comfyui-dir", type=Path, default=None,
                       help="ComfyUI folder to start (default: $COMFYUI_DIR, else the ComfyUI this pack is in)")
    parser.add_argument("--checkpoint", metavar="NAME_OR_PATH",
                        help="SD1.5 checkpoint: a file path, or a name from models/checkpoints "
                             "(default: the random test checkpoint)")
    parser.add_argument("--face", action="append", type=Path, metavar="IMAGE",
                        help="input face image (repeat for a second subject; default: drawn faces)")
    parser.add_argument("--only", action="append", metavar="GLOB",
                        help="run only workflows whose name matches (repeatable), e.g. 'basic_*'")
    parser.add_argument("--out", type=Path, default=Path("facebooth-output") / "examples",
                        help="folder for the output images and contact_sheet.png (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="value of $SEED (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="fill or override a workflow placeholder (VALUE is JSON if it parses)")
    parser.add_argument("--workflows-dir", type=Path, default=ex.API_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per workflow (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="device for a ComfyUI started here (default: GPU when torch sees one)")
    parser.add_argument("--python", default=None,
                        help="Python that has ComfyUI's requirements (default: this one, or $COMFYUI_PYTHON)")
    parser.add_argument("--keep-base-dir", action="store_true",
                        help="keep the temporary ComfyUI base dir (with comfyui.log) after the run")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing workflow")
    parser.add_argument("--write-ui", action="store_true",
                        help="also regenerate each workflow's UI twin + thumbnail (examples_workflows/<title>.json/.jpg, "
                             "laid out in headless Chromium) and docs/nodes.md from the live /object_info")
    parser.add_argument("--no-browser", action="store_true",
                        help="with --write-ui: estimate node sizes instead of measuring them, and write no thumbnails")
    parser.add_argument("--no-run", action="store_true", help="with --write-ui: only regenerate, do not run the workflows")
    parser.set_defaults(func=run)
    return parser


@dataclass
class Result:
    name: str
    ok: bool = False
    seconds: float = 0.0
    images: list[Path] = field(default_factory=list)
    error: str = ""


class ProgressLog:
    """Turns ComfyUI events into short stderr lines; step counters are throttled so long loops stay readable."""

    def __init__(self, name: str, index: int, total: int):
        self.prefix = f"[{index}/{total}] {name}"
        self.last_step_log = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "cached" and event.nodes:
            log.info("%s: cached nodes %s", self.prefix, ", ".join(event.nodes))
        elif event.kind == "executing":
            log.info("%s: node %s %s", self.prefix, event.node_id, event.node_type or "")
        elif event.kind == "progress" and event.max:
            now = time.monotonic()
            if event.value == event.max or now - self.last_step_log > 2.0:
                self.last_step_log = now
                log.info("%s: node %s %s %d/%d", self.prefix, event.node_id, event.node_type or "", event.value, event.max)


def _parse_sets(items: list[str]) -> dict:
    values = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        name, raw = item.split("=", 1)
        try:
            values[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[name.strip()] = raw
    return values


def _want_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def _save_outputs(result: Result, outputs, out_dir: Path) -> list[tuple[str, "object"]]:
    tiles = []
    images = to_pil(outputs)
    for k, (out, image) in enumerate(zip(outputs, images), start=1):
        suffix = Path(out.filename).suffix or ".png"
        path = out_dir / f"{result.name}_{k:02d}{suffix}"
        path.write_bytes(out.data)
        result.images.append(path)
        tiles.append((f"{result.name} #{k} ({image.width}x{image.height})", image))
    return tiles


def _run_all(client: ComfyClient, workflows: list[Path], subs: dict, args) -> list[Result]:
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    tiles = []
    for index, path in enumerate(workflows, start=1):
        result = Result(ex.workflow_name(path))
        results.append(result)
        log.info("[%d/%d] %s: queued", index, len(workflows), result.name)
        start = time.monotonic()
        try:
            values = dict(subs, WORKFLOW=result.name, **_parse_sets(args.set))
            outputs = run_workflow(client, path, values, timeout=args.timeout,
                                      on_progress=ProgressLog(result.name, index, len(workflows)))
            tiles += _save_outputs(result, outputs, args.out)
            result.ok = True
            if not outputs:
                result.ok, result.error = False, "finished but produced no images (no SaveImage/PreviewImage output?)"
        except (WorkflowRejectedError, WorkflowFailedError, PlaceholderError, ValueError, TimeoutError) as exc:
            result.error = str(exc)
        except ComfyUnreachableError as exc:
            result.error = f"{exc} (did ComfyUI crash? see its log)"
        result.seconds = time.monotonic() - start
        if result.ok:
            log.info("[%d/%d] %s: done in %.1f s, %d image(s)", index, len(workflows), result.name, result.seconds, len(result.images))
        else:
            log.error("[%d/%d] %s: FAILED after %.1f s\n%s", index, len(workflows), result.name, result.seconds, result.error)
            if args.fail_fast:
                break
    if tiles:
        from ..runner.contact_sheet import save_contact_sheet

        sheet = save_contact_sheet(tiles, args.out / "contact_sheet.png", tile=192, title="FaceBooth examples")
        log.info("Contact sheet: %s", sheet)
    return results


def _summary(results: list[Result], out_dir: Path, stream=None) -> None:
    stream = stream or sys.stdout
    width = max([len(r.name) for r in results] + [8])
    stream.write(f"\n{'workflow':<{width}}  status  seconds  images\n")
    for r in results:
        stream.write(f"{r.name:<{width}}  {'ok' if r.ok else 'FAILED':<6}  {r.seconds:7.1f}  {len(r.images):6d}\n")
    failed = [r for r in results if not r.ok]
    for r in failed:
        first = r.error.strip().splitlines()[0] if r.error.strip() else "unknown error"
        stream.write(f"  {r.name}: {first}\n")
    ok = len(results) - len(failed)
    stream.write(f"{ok}/{len(results)} workflows ran; images in {out_dir}"
                 + (f" (contact sheet: {out_dir / 'contact_sheet.png'})" if ok else "") + "\n")
    stream.flush()


def _write_ui_twins(client: ComfyClient, workflows: list[Path], browser: bool = True) -> None:
    from ..runner.node_docs import write_node_docs
    from ..runner.ui_twins import regenerate

    info = client.object_info()
    log.info("Node reference written: %s", write_node_docs(info))
    regenerate(client.url, info, workflows, browser=browser)


def run(args) -> int:
    workflows = ex.list_workflows(args.workflows_dir, args.only)
    if not workflows:
        log.error("No workflow in %s matches %s.", args.workflows_dir, " ".join(args.only or ["*"]))
        return EXIT_SETUP
    try:
        _parse_sets(args.set)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    for face in args.face or []:
        if not face.expanduser().is_file():
            log.error("Face image not found: %s", face)
            return EXIT_SETUP
    if args.server:
        return _run_on_server(args, workflows)
    return _run_local(args, workflows)


def _run_on_server(args, workflows: list[Path]) -> int:
    from ..devmodels.sd15_checkpoint import DEFAULT_CHECKPOINT_NAME

    client = ComfyClient(args.server)
    try:
        client.system_stats()
        checkpoint = args.checkpoint or DEFAULT_CHECKPOINT_NAME
        try:
            check_checkpoint_available(client, checkpoint)
        except MissingModelError as exc:
            if Path(checkpoint).expanduser().is_file():
                raise MissingModelError(
                    f"{exc} With --server, --checkpoint is a name that server lists, not a local path; "
                    "copy the file into its models/checkpoints or use --comfyui-dir instead."
                ) from exc
            raise
        subs = {"CHECKPOINT": checkpoint, "SEED": args.seed, **upload_faces(client, args.face, args.seed)}
        if not args.checkpoint:  # the random test checkpoint: test sizes, not the workflows' real settings
            subs.update(TEST_SIZE_VALUES)
    except (ComfyUnreachableError, MissingModelError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    results = _write_ui_and_run(client, workflows, subs, args)
    if results is None:
        return EXIT_OK
    _summary(results, args.out)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _write_ui_and_run(client: ComfyClient, workflows: list[Path], subs: dict, args) -> list[Result] | None:
    """The UI twins when asked (``--write-ui``), then every workflow unless ``--no-run`` (then None)."""
    try:
        if args.write_ui:
            _write_ui_twins(client, workflows, browser=not args.no_browser)
            if args.no_run:
                return None
        return _run_all(client, workflows, subs, args)
    finally:
        client.close()


def _run_local(args, workflows: list[Path]) -> int:
    from ..runner.server import ComfyUINotFoundError, check_comfyui_dir, default_comfyui_dir, pack_import_problems

    try:
        comfyui_dir = check_comfyui_dir(default_comfyui_dir(args.comfyui_dir))
        if not (args.comfyui_dir or os.environ.get("COMFYUI_DIR")):
            log.info("Using the ComfyUI this pack is in: %s", comfyui_dir)
    except ComfyUINotFoundError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    if args.checkpoint is None:
        log.info("Preparing the random SD1.5 checkpoint and face models (generated once, then cached)")
    try:
        with local_comfyui(comfyui_dir, checkpoint=args.checkpoint, prefix="facebooth-examples-",
                           keep_base_dir=args.keep_base_dir, cpu=_want_cpu(args.device), python=args.python) as local:
            server = local.server
            for problem in pack_import_problems(server.startup_log()):
                log.warning("ComfyUI reported a FaceBooth import problem: %s", problem)
            try:
                subs = {**local.setup.substitutions, "SEED": args.seed, **upload_faces(server.client, args.face, args.seed)}
            except FileNotFoundError as exc:
                log.error("%s", exc)
                return EXIT_SETUP
            results = _write_ui_and_run(server.client, workflows, subs, args)
            if results is None:
                return EXIT_OK
            if not all(r.ok for r in results):
                log.error("ComfyUI log: %s (last lines below)\n%s", server.log_file, server.log_tail(25))
                local.keep_base_dir = True
    except LocalSetupError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    _summary(results, args.out)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED
