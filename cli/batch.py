"""``python -m facebooth batch``: many identities x prompts x seeds through one API workflow, resumable.

Jobs come from a table (``--jobs`` CSV/JSONL: one row per job, a column per placeholder such as PROMPT,
FACE_IMAGE, SEED, or per node input such as ``3.steps``) or from a matrix (``--faces`` x ``--prompts`` x
``--seeds``). Every job is checked against the server's /object_info before anything is queued; ``--dry-run``
stops there and lists all problems.

Servers: by default one local ComfyUI is started from ``--comfyui-dir`` (or $COMFYUI_DIR) with this pack and,
unless ``--checkpoint`` is given, the random test models, as ``examples`` does. ``--server URL`` (repeatable)
uses running servers; ``--ray [ADDRESS]`` starts one ComfyUI per GPU on a Ray cluster.

The output folder holds ``journal.sqlite`` (every job's status), ``images/`` (one file name per job, written
atomically, with the workflow and job values in the PNG metadata), ``report.html`` and ``manifest.csv`` /
``manifest.jsonl``. Re-running the same command resumes: done jobs are skipped, nothing runs twice. Ctrl-C takes
our prompts off the servers and keeps them for the next run. Exit status: 0 every job done, 1 some failed or
left pending, 2 the batch could not start or --dry-run found problems, 130 interrupted.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from ..runner import examples as ex
from ..runner.local_setup import LocalSetupError, local_comfyui
from ..runner.substitutions import TEST_SIZE_VALUES
from .examples import (  # one --set / --device rule for both commands
    _parse_sets as parse_sets,
)
from .examples import _want_cpu

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INCOMPLETE, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "batch",
        help="run a workflow for many jobs over one or many ComfyUI servers (resumable; report + manifest)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workflow", help="API-format workflow file, or the name of an example (e.g. basic_txt2img)")
    jobs = parser.add_argument_group("jobs (a table, or a matrix)")
    jobs.add_argument("--jobs", type=Path, metavar="TABLE", help="CSV or JSONL job table")
    jobs.add_argument("--faces", metavar="DIR_OR_GLOB", help="face images: a folder or a glob (fills $FACE_IMAGE)")
    jobs.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt per line (fills $PROMPT)")
    jobs.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per face x prompt (fills $SEED; default 1)")
    jobs.add_argument("--seed-base", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (journal, images, report); re-use it to resume")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", action="append", metavar="URL", help="a running ComfyUI (repeatable)")
    where.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on a Ray cluster (address, or a local Ray when none is given)")
    where.add_argument("--comfyui-dir", type=Path, default=None, help="ComfyUI folder to start (default: $COMFYUI_DIR)")
    parser.add_argument("--dry-run", action="store_true", help="check every job, list all problems, queue nothing")
    parser.add_argument("--score", action="store_true", help="ID similarity of each image to its face (pack's face analysis)")
    parser.add_argument("--score-models", type=Path, metavar="DIR",
                        help="ComfyUI models folder with facebooth/face/mtcnn and an ArcFace file (default: the embedded one)")
    parser.add_argument("--score-arcface", metavar="FILE", help="ArcFace file for --score (default: the first in the folder)")
    parser.add_argument("--score-mode", choices=("detect", "aligned"), default="detect",
                        help="'aligned': images are face crops already (default: detect faces)")
    parser.add_argument("--checkpoint", metavar="NAME_OR_PATH", help="checkpoint (default: the random test checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="fill a placeholder for every job (VALUE is JSON if it parses)")
    parser.add_argument("--inflight", type=int, default=2, help="prompts kept queued per server (default 2)")
    parser.add_argument("--max-attempts", type=int, default=3, help="times a job may be lost with a server (default 3)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job (default 1800)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed jobs again")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="device of a ComfyUI started here")
    parser.add_argument("--ray-actors", type=int, default=None, help="Ray actors (default: one per GPU in the cluster)")
    parser.add_argument("--ray-gpus-per-actor", type=float, default=1.0, help="GPUs per Ray actor (0: CPU actors)")
    parser.set_defaults(func=run)
    return parser


def resolve_workflow(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    folders = [ex.API_DIR, ex.EXAMPLES_DIR]
    for folder in folders:
        candidate = Path(folder) / f"{spec}{ex.API_SUFFIX}"
        if candidate.is_file():
            return candidate
    names = sorted({ex.workflow_name(p) for f in folders if Path(f).is_dir() for p in ex.list_workflows(f)})
    raise FileNotFoundError(f"Workflow {spec!r} is neither a file nor an example ({', '.join(names)}).")


def build_jobs(args) -> list:
    from ..runner.batch import jobs as jobspec

    if args.jobs and (args.faces or args.prompts):
        raise ValueError("Give either --jobs TABLE or --faces/--prompts/--seeds, not both.")
    if args.jobs:
        found = jobspec.load_table(args.jobs)
    else:
        faces = jobspec.find_faces(args.faces) if args.faces else None
        prompts = jobspec.read_prompts(args.prompts) if args.prompts else None
        found = jobspec.matrix_jobs(faces, prompts, args.seeds, args.seed_base)
    if not found:
        raise ValueError("No jobs: the table is empty.")
    dups = jobspec.duplicate_keys(found)
    if dups:
        shown = ", ".join(f"{a + 1}={b + 1}" for a, b in dups[:10])
        raise ValueError(f"Identical jobs (rows {shown}); each job must differ, e.g. by SEED.")
    return found


def run(args) -> int:
    from ..runner.batch.dispatcher import Settings
    from ..runner.batch.run import BatchSpec

    try:
        workflow_path = resolve_workflow(args.workflow)
        workflow = ex.load_workflow(workflow_path)
        job_list = build_jobs(args)
        sets = parse_sets(args.set)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    spec = BatchSpec(workflow, ex.workflow_name(workflow_path), job_list, {}, args.out.resolve(),
                     Settings(args.inflight, args.max_attempts, args.timeout), args.retry_failed)
    log.info("%d job(s) of %s", len(job_list), workflow_path)
    if args.ray is not None:
        return _run_ray(args, spec, sets)
    if args.server:
        return _run_servers(args, spec, sets)
    return _run_embedded(args, spec, sets)


def _base_values(spec, setup_values: dict, sets: dict) -> None:
    spec.base_values = {**setup_values, "WORKFLOW": spec.workflow_name, **sets}


def _finish(args, spec, outcome, score_models: Path | None) -> int:

    if outcome.problems:
        stream = sys.stdout
        stream.write(f"{len(outcome.problems)} problem(s) found in {len(spec.jobs)} job(s):\n")
        for line in outcome.problems:
            stream.write(f"  - {line}\n")
        stream.flush()
        return EXIT_SETUP
    if args.dry_run:
        print(f"dry run: {len(spec.jobs)} job(s) checked, no problem found")
        return EXIT_OK
    if args.score and not outcome.interrupted:
        _score(args, spec, score_models)
    print(f"{outcome.counts.get('done', 0)} done, {outcome.counts.get('failed', 0)} failed, "
          f"{outcome.counts.get('pending', 0) + outcome.counts.get('running', 0)} left; report: {spec.out_dir / 'report.html'}; "
          f"manifest: {spec.out_dir / 'manifest.csv'}")
    if outcome.interrupted:
        print("Interrupted: run the same command again to resume.")
        return EXIT_INTERRUPTED
    if outcome.no_server_left:
        log.error("No server left for the pending jobs; run the same command again (with working servers) to resume.")
    return EXIT_OK if outcome.counts.get("done", 0) == sum(outcome.counts.values()) else EXIT_INCOMPLETE


def _score(args, spec, score_models: Path | None) -> None:
    from ..runner.batch.journal import Journal
    from ..runner.batch.run import write_reports
    from ..runner.batch.scoring import LocalScorer, score_journal

    models = args.score_models or score_models
    if models is None:
        log.error("--score with --server/--ray needs --score-models DIR (a models folder with facebooth/face).")
        return
    try:
        scorer = LocalScorer(models, args.score_arcface, args.score_mode)
    except (FileNotFoundError, ValueError) as exc:
        log.error("--score: %s", exc)
        return
    journal = Journal(spec.out_dir)
    try:
        log.info("Scored %d job(s) with %s", score_journal(journal, spec.out_dir, scorer), scorer.analyzer.recognizer_name)
        write_reports(journal, spec.out_dir, spec.workflow_name)
    finally:
        journal.close()


def _execute(args, spec, backends) -> object:
    from ..runner.batch.run import execute
    from ..runner.batch.servers import ServerLost

    try:
        return asyncio.run(execute(spec, backends, dry_run=args.dry_run))
    except ServerLost as exc:
        log.error("%s", exc)
        return None


def _run_servers(args, spec, sets: dict) -> int:
    from ..devmodels.sd15_checkpoint import DEFAULT_CHECKPOINT_NAME
    from ..runner.batch.servers import ComfyBackend, HttpTransport

    _base_values(spec, {"CHECKPOINT": args.checkpoint or DEFAULT_CHECKPOINT_NAME,
                        **(TEST_SIZE_VALUES if args.checkpoint is None else {})},
                 sets)
    backends = [ComfyBackend(HttpTransport(url), args.inflight) for url in args.server]
    outcome = _execute(args, spec, backends)
    return EXIT_SETUP if outcome is None else _finish(args, spec, outcome, None)


def _run_embedded(args, spec, sets: dict) -> int:
    from ..runner.batch.servers import ComfyBackend, HttpTransport
    from ..runner.server import ComfyUINotFoundError, check_comfyui_dir

    try:
        comfyui_dir = check_comfyui_dir(args.comfyui_dir or os.environ.get("COMFYUI_DIR"))
    except ComfyUINotFoundError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    try:
        with local_comfyui(comfyui_dir, checkpoint=args.checkpoint, prefix="facebooth-batch-",
                           cpu=_want_cpu(args.device), die_with_parent=True) as local:
            _base_values(spec, local.setup.substitutions, sets)
            outcome = _execute(args, spec, [ComfyBackend(HttpTransport(local.server.url), args.inflight)])
            local.server.stop()  # free its memory before scoring, which reads the base dir's models
            return EXIT_SETUP if outcome is None else _finish(args, spec, outcome, local.setup.base_dir / "models")
    except LocalSetupError as exc:
        log.error("%s", exc)
        return EXIT_SETUP


def _run_ray(args, spec, sets: dict) -> int:
    from ..runner.batch import ray_mode

    try:
        cluster = ray_mode.RayCluster.start(
            args.ray or None, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
            comfyui_dir=str(args.comfyui_dir) if args.comfyui_dir else None, checkpoint=args.checkpoint,
        )
    except (ImportError, RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    try:
        _base_values(spec, cluster.substitutions, sets)
        outcome = _execute(args, spec, cluster.backends(args.inflight))
    finally:
        cluster.shutdown()
    return EXIT_SETUP if outcome is None else _finish(args, spec, outcome, None)
