"""One batch from start to end, over backends that are already chosen: check, journal, dispatch, report.

Used by ``cli/batch.py`` and the benchmark; the CLI decides where the servers come from (embedded, ``--server``,
``--ray``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import outputs, report
from .checks import Problems, check_jobs
from .dispatcher import Dispatcher, Settings
from .jobs import Job
from .journal import Journal
from .progress import Progress
from .scoring import scores_from_history
from .servers import ComfyBackend, ServerLost

log = logging.getLogger(__name__)


@dataclass
class BatchSpec:
    workflow: dict
    workflow_name: str
    jobs: list[Job]
    base_values: dict[str, Any]
    out_dir: Path
    settings: Settings = field(default_factory=Settings)
    retry_failed: bool = False


@dataclass
class Outcome:
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    interrupted: bool = False
    no_server_left: bool = False


def workflow_digest(workflow: Mapping) -> str:
    return hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest()


async def usable_backends(backends: list[ComfyBackend], workflow: Mapping) -> tuple[list[ComfyBackend], dict]:
    """Open every backend and fetch its /object_info; servers that are down or lack a node type are left out
    (with a warning) as long as one remains. Returns the kept backends and the first one's object_info."""
    await asyncio.gather(*(b.open() for b in backends))
    infos = await asyncio.gather(*(b.object_info() for b in backends), return_exceptions=True)
    kept, first_info, reasons = [], None, []
    needed = {node.get("class_type") for node in workflow.values()}
    for backend, info in zip(backends, infos):
        if isinstance(info, BaseException):
            reasons.append(f"{backend.name}: {info}")
            continue
        missing = sorted(needed - set(info))
        if missing and len(backends) > 1:
            reasons.append(f"{backend.name} lacks node types {', '.join(missing)}")
            continue
        kept.append(backend)
        first_info = first_info or info
    for reason in reasons:
        log.warning("Server left out: %s", reason)
    if not kept:
        raise ServerLost("No usable server: " + "; ".join(reasons))
    return kept, first_info


def check(spec: BatchSpec, object_info: Mapping) -> Problems:
    return check_jobs(spec.workflow, spec.jobs, object_info, spec.base_values, name=spec.workflow_name)


async def execute(spec: BatchSpec, backends: list[ComfyBackend], *, dry_run: bool = False, progress_stream=None,
                  handle_signals: bool = True) -> Outcome:
    """Check every job, then (unless ``dry_run``) run the pending ones and write the report and manifest."""
    opened = list(backends)
    try:
        backends, object_info = await usable_backends(backends, spec.workflow)
        problems = check(spec, object_info)
        if problems or dry_run:
            return Outcome(problems=problems.lines(len(spec.jobs)))
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal(spec.out_dir)
        try:
            journal.bind_workflow(workflow_digest(spec.workflow), spec.workflow_name)
            added = journal.add_jobs(spec.jobs)
            if spec.retry_failed:
                journal.reset_failed()
            removed = outputs.remove_partial_files(spec.out_dir)
            counts = journal.counts()
            log.info("Journal %s: %d job(s) (%d new), %s%s", journal.path, sum(counts.values()), added,
                     ", ".join(f"{n} {s}" for s, n in counts.items()),
                     f"; removed {removed} partial file(s)" if removed else "")
            progress = Progress(sum(counts.values()), counts["done"], counts["failed"], stream=progress_stream)
            dispatcher = Dispatcher(
                journal, backends, spec.workflow, spec.workflow_name, spec.base_values, object_info, spec.out_dir,
                spec.settings, progress,
                scores_from_entry=lambda entry, n: scores_from_history(entry, spec.workflow, n),
            )
            outcome = Outcome()
            loop = asyncio.get_running_loop()

            def on_signal() -> None:
                if outcome.interrupted:
                    raise KeyboardInterrupt
                outcome.interrupted = True
                log.warning("Stopping: taking our prompts off the servers (Ctrl-C again to quit at once).")
                asyncio.ensure_future(dispatcher.stop())

            signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
            for sig in signals:
                loop.add_signal_handler(sig, on_signal)
            try:
                await dispatcher.run()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)
                progress.finish()
            outcome.no_server_left = dispatcher.pending_without_server
            write_reports(journal, spec.out_dir, spec.workflow_name)
            outcome.counts = journal.counts()
            return outcome
        finally:
            journal.close()
    finally:
        await asyncio.gather(*(b.close() for b in opened), return_exceptions=True)


def write_reports(journal: Journal, out_dir: Path, title: str) -> tuple[Path, Path, Path]:
    rows = journal.rows()
    csv_path, jsonl_path = report.write_manifest(out_dir, rows)
    html_path = report.write_report(out_dir, rows, f"FaceBooth batch: {title}")
    return html_path, csv_path, jsonl_path
