"""Run the journal's jobs over one or many ComfyUI servers.

Balancing by pulling: each server has ``inflight`` slots (2 by default: one prompt running, the next already
queued, so the server never waits for the client), and a slot takes the next pending job when its job ends.
Fast and slow servers are both kept busy without knowing their speed.

Failures:

* a node error (e.g. "no face" under the error policy) or a rejected prompt fails that job, with ComfyUI's
  message in the journal; the batch goes on;
* a server that stops answering is retired; its jobs go back to the queue for the others, and a job lost
  ``max_attempts`` times fails;
* ``stop()`` (Ctrl-C) takes our prompts off every server (queued ones deleted, the running one interrupted) and
  gives them back to the journal as pending, so the next run does them.

Resume: jobs the journal says were running are first looked up on their server (finished: collected; still
queued: followed; unknown or server gone: pending again), so a crash loses nothing and runs nothing twice.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..placeholders import PlaceholderError
from ..client import WorkflowFailedError, WorkflowRejectedError
from . import outputs
from .checks import (
    input_spec,
    is_local_file,
    is_upload_input,
    key_targets,
    typed_values,
)
from .jobs import fill
from .journal import Journal, Row
from .servers import ComfyBackend, PromptLost, ServerLost

log = logging.getLogger(__name__)


@dataclass
class Settings:
    inflight: int = 2
    max_attempts: int = 3
    timeout: float = 900.0


class Events:
    """What the dispatcher reports (the progress display overrides these)."""

    def started(self, server: str, key: str) -> None: ...

    def done(self, server: str, key: str, images: int) -> None: ...

    def failed(self, server: str, key: str, error: str) -> None: ...

    def requeued(self, server: str, key: str, reason: str) -> None: ...

    def server_lost(self, server: str, reason: str) -> None: ...


class Dispatcher:
    def __init__(self, journal: Journal, backends: list[ComfyBackend], workflow: Mapping, workflow_name: str,
                 base_values: Mapping[str, Any], object_info: Mapping, out_dir: Path, settings: Settings | None = None,
                 events: Events | None = None,
                 scores_from_entry: Callable[[dict, int], list | None] | None = None):
        self.journal = journal
        self.backends = list(backends)
        self.workflow = dict(workflow)
        self.workflow_name = workflow_name
        self.base_values = dict(base_values)
        self.object_info = object_info
        self.out_dir = Path(out_dir)
        self.settings = settings or Settings()
        self.events = events or Events()
        self.scores_from_entry = scores_from_entry
        self._queue: deque[str] = deque()
        self._inflight: dict[str, tuple[ComfyBackend, str]] = {}
        self._retired: set[str] = set()
        self._stopping = False
        self._changed = asyncio.Condition()

    # -- public -------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._resume()
        self._queue.extend(r.key for r in self.journal.rows("pending"))
        slots = [asyncio.create_task(self._slot(b), name=f"slot-{b.name}-{i}")
                 for b in self.backends for i in range(self.settings.inflight)]
        await asyncio.gather(*slots, *self._adopted)

    async def stop(self) -> None:
        """Ctrl-C: no new jobs; our prompts are taken off the servers and come back as pending."""
        if self._stopping:
            return
        self._stopping = True
        by_backend: dict[str, list[str]] = {}
        for backend, pid in self._inflight.values():
            by_backend.setdefault(backend.name, []).append(pid)
        await asyncio.gather(*(b.cancel(by_backend[b.name]) for b in self.backends if b.name in by_backend))
        await self._notify()

    @property
    def pending_without_server(self) -> bool:
        return bool(self._queue) and all(b.name in self._retired for b in self.backends)

    # -- queue --------------------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _take(self, backend: ComfyBackend) -> str | None:
        async with self._changed:
            while True:
                if self._stopping or backend.name in self._retired:
                    return None
                if self._queue:
                    return self._queue.popleft()
                if not self._inflight:
                    return None  # nothing left, and nothing in flight that could come back
                await self._changed.wait()

    async def _slot(self, backend: ComfyBackend) -> None:
        while True:
            key = await self._take(backend)
            if key is None:
                return
            await self._run_job(backend, self.journal.row(key))

    # -- one job ------------------------------------------------------------------------------------

    async def _prompt_for(self, backend: ComfyBackend, row: Row) -> dict:
        values = typed_values(self.workflow, self.object_info, row.values)
        for key, value in list(values.items()):
            if is_local_file(value) and any(
                (spec := input_spec(self.object_info, self.workflow.get(n, {}).get("class_type", ""), i)) is not None
                and is_upload_input(*spec)
                for n, i in key_targets(self.workflow, key)
            ):
                values[key] = await backend.ensure_input(value)
        return fill(self.workflow, self.base_values, values, name=self.workflow_name)

    async def _run_job(self, backend: ComfyBackend, row: Row) -> None:
        try:
            api = await self._prompt_for(backend, row)
        except ServerLost as exc:
            await self._server_lost(backend, exc)
            self._queue.appendleft(row.key)
            await self._notify()
            return
        except (PlaceholderError, KeyError, ValueError, OSError, RuntimeError) as exc:
            self._fail(backend, row.key, f"could not prepare the prompt: {exc}")
            return
        if self._stopping:
            return  # still pending in the journal
        prompt_id = uuid.uuid4().hex
        # Journal first: if this process dies after the post, a resume finds the prompt on that server.
        self.journal.mark_running(row.key, backend.name, prompt_id)
        self._inflight[row.key] = (backend, prompt_id)
        self.events.started(backend.name, row.key)
        try:
            await backend.submit(api, prompt_id, {outputs.JOB_CHUNK: outputs.job_metadata(row.values, row.key, row.name)})
        except WorkflowRejectedError as exc:
            self._inflight.pop(row.key, None)
            self._fail(backend, row.key, str(exc))
            await self._notify()
            return
        except ServerLost as exc:
            await self._lost(backend, row.key, exc)
            return
        await self._follow(backend, row, prompt_id, api)

    async def _follow(self, backend: ComfyBackend, row: Row, prompt_id: str, api: Mapping) -> None:
        self._inflight[row.key] = (backend, prompt_id)
        start = time.monotonic()
        try:
            entry, images = await backend.result(prompt_id, self.settings.timeout)
            await self._collect(row, entry, images, api, time.monotonic() - start, backend.name)
        except WorkflowFailedError as exc:
            if self._stopping:
                self.journal.mark_pending(row.key, refund_attempt=True, note="interrupted by the user")
            else:
                self._fail(backend, row.key, str(exc))
        except PromptLost as exc:
            if self._stopping:
                self.journal.mark_pending(row.key, refund_attempt=True, note="taken off the server by the user")
            else:
                await self._lost(backend, row.key, exc, retire=False)
                return
        except ServerLost as exc:
            await self._lost(backend, row.key, exc)
            return
        except TimeoutError as exc:
            self._fail(backend, row.key, str(exc))
        except (RuntimeError, OSError) as exc:  # download or write failed: the job runs again next time
            self.journal.mark_pending(row.key, note=f"could not collect the result: {exc}")
            self.events.requeued(backend.name, row.key, str(exc))
        finally:
            self._inflight.pop(row.key, None)
        await self._notify()

    async def _collect(self, row: Row, entry: dict, images, api: Mapping, seconds: float, server: str) -> None:
        meta = outputs.job_metadata(row.values, row.key, row.name)
        files = outputs.write_job_outputs(self.out_dir, row.name, images, api, meta)
        scores = self.scores_from_entry(entry, len(files)) if self.scores_from_entry else None
        self.journal.mark_done(row.key, files, seconds, scores)
        self.events.done(server, row.key, len(files))

    def _fail(self, backend: ComfyBackend, key: str, error: str) -> None:
        self.journal.mark_failed(key, error)
        self.events.failed(backend.name, key, error)

    async def _lost(self, backend: ComfyBackend, key: str, exc: Exception, retire: bool = True) -> None:
        """The job's server lost it: back to the queue for any server, unless it was lost too often."""
        self._inflight.pop(key, None)
        if retire:
            await self._server_lost(backend, exc)
        attempts = self.journal.row(key).attempts
        if attempts >= self.settings.max_attempts:
            self._fail(backend, key, f"gave up after {attempts} attempts; last: {exc}")
        else:
            self.journal.mark_pending(key, note=str(exc))
            self._queue.appendleft(key)
            self.events.requeued(backend.name, key, str(exc))
        await self._notify()

    async def _server_lost(self, backend: ComfyBackend, exc: Exception) -> None:
        if backend.name in self._retired:
            return
        if await backend.alive():
            return  # a passing error; the server still answers
        self._retired.add(backend.name)
        log.warning("Server %s is gone (%s); its jobs go to the other servers.", backend.name, exc)
        self.events.server_lost(backend.name, str(exc))
        await self._notify()

    # -- resume -------------------------------------------------------------------------------------

    _adopted: list[asyncio.Task]

    async def _resume(self) -> None:
        """Settle the jobs a previous run left 'running' before anything new is queued."""
        self._adopted = []
        by_name = {b.name: b for b in self.backends}
        for row in self.journal.rows("running"):
            backend = by_name.get(row.server or "")
            if backend is None:
                self.journal.mark_pending(row.key, refund_attempt=True, note=f"server {row.server} is not in this run")
                continue
            try:
                kind, _ = await backend.state(row.prompt_id)
                if kind == "unknown":
                    self.journal.mark_pending(row.key, refund_attempt=True, note="the server never ran it")
                    continue
                api = await self._prompt_for(backend, row)
            except ServerLost:
                self.journal.mark_pending(row.key, refund_attempt=True, note=f"server {row.server} does not answer")
                continue
            except (PlaceholderError, KeyError, ValueError, OSError) as exc:
                self._fail(backend, row.key, f"could not prepare the prompt: {exc}")
                continue
            log.info("Resuming %s: %s on %s", row.name, "collecting" if kind == "finished" else "following", backend.name)
            self._inflight[row.key] = (backend, row.prompt_id)
            self._adopted.append(asyncio.create_task(self._follow(backend, row, row.prompt_id, api)))
