"""Dispatcher logic with in-memory servers: pull balancing, lost servers, bounded retries, stop, resume.

The fake servers stand in for ComfyUI's queue only (the real thing is in tests/integration/test_batch_servers.py):
each runs one prompt at a time for ``seconds`` and remembers what it ran.
"""
from __future__ import annotations

import asyncio
import io

from facebooth.runner.batch.dispatcher import Dispatcher, Settings
from facebooth.runner.batch.jobs import Job
from facebooth.runner.batch.journal import Journal
from facebooth.runner.batch.servers import PromptLost, ServerLost
from facebooth.runner.client import OutputImage, WorkflowFailedError
from PIL import Image

WORKFLOW = {"3": {"class_type": "KSampler", "inputs": {"seed": "$SEED"}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}}
OBJECT_INFO = {"KSampler": {"input": {"required": {"seed": ["INT", {"min": 0, "max": 2**32}]}}},
               "SaveImage": {"input": {"required": {}}}}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


class FakeServer:
    def __init__(self, name, seconds, fail_seeds=(), die_after=None, inflight=2):
        self.name, self.seconds, self.fail_seeds, self.die_after = name, seconds, set(fail_seeds), die_after
        self.inflight = inflight
        self.ran: list[int] = []
        self.dead = False
        self.known: dict[str, dict] = {}
        self.cancelled: list[str] = []
        self.lock = asyncio.Lock()

    async def ensure_input(self, path):
        return path

    async def submit(self, api, prompt_id, extra):
        if self.dead:
            raise ServerLost(self.name)
        self.known[prompt_id] = api

    async def state(self, prompt_id):
        return ("queued", None) if prompt_id in self.known else ("unknown", None)

    async def result(self, prompt_id, timeout):
        async with self.lock:  # one prompt at a time, like ComfyUI
            if prompt_id in self.cancelled:
                raise PromptLost(prompt_id)
            if self.dead:
                raise ServerLost(self.name)
            await asyncio.sleep(self.seconds)
            if self.dead:
                raise ServerLost(self.name)
            seed = self.known[prompt_id]["3"]["inputs"]["seed"]
            self.ran.append(seed)
            if self.die_after is not None and len(self.ran) >= self.die_after:
                self.dead = True
            if seed in self.fail_seeds:
                raise WorkflowFailedError("ComfyUI failed in node 3 (X): NoFaceError: No face found")
            return {}, [OutputImage("9", "x.png", "", "output", _png())]

    async def cancel(self, ids):
        self.cancelled += ids

    async def alive(self):
        return not self.dead


def _setup(tmp_path, n):
    journal = Journal(tmp_path)
    jobs = [Job(i, {"SEED": i}) for i in range(n)]
    journal.add_jobs(jobs)
    return journal, jobs


def _run(journal, servers, tmp_path, settings=None, after=None):
    d = Dispatcher(journal, servers, WORKFLOW, "t", {}, OBJECT_INFO, tmp_path, settings)

    async def main():
        task = asyncio.create_task(d.run())
        if after is not None:
            await after(d)
        await task

    asyncio.run(main())
    return d


def test_pulling_gives_the_fast_server_more_jobs_and_runs_each_once(tmp_path):
    journal, _ = _setup(tmp_path, 12)
    fast, slow = FakeServer("fast", 0.01), FakeServer("slow", 0.05)
    _run(journal, [fast, slow], tmp_path)
    assert journal.counts()["done"] == 12
    assert sorted(fast.ran + slow.ran) == list(range(12))
    assert len(fast.ran) > len(slow.ran)
    assert {r.server for r in journal.rows() if r.values["SEED"] in fast.ran} == {"fast"}


def test_a_dead_servers_jobs_finish_on_the_other(tmp_path):
    journal, _ = _setup(tmp_path, 8)
    a, b = FakeServer("a", 0.02), FakeServer("b", 0.02, die_after=2)
    _run(journal, [a, b], tmp_path)
    assert journal.counts()["done"] == 8
    # b finished two prompts, then died with its queued one: that job was moved and ran on a, once.
    assert len(b.ran) == 2 and sorted(a.ran + b.ran) == list(range(8))
    moved = [r for r in journal.rows() if r.attempts == 2]
    assert moved and all(r.server == "a" for r in moved)
    assert {r.server for r in journal.rows() if r.attempts == 1} <= {"a", "b"}


def test_retries_are_bounded_and_policy_failures_do_not_stop_the_batch(tmp_path):
    journal, _ = _setup(tmp_path, 4)
    a = FakeServer("a", 0.01, fail_seeds={1})
    _run(journal, [a], tmp_path)
    counts = journal.counts()
    assert counts["done"] == 3 and counts["failed"] == 1
    failed = journal.rows("failed")[0]
    assert failed.values == {"SEED": 1} and "No face found" in failed.error and failed.attempts == 1



class ForgetfulServer(FakeServer):
    """Answers, but forgets every prompt (a server that restarts under each job)."""

    async def state(self, prompt_id):
        return "unknown", None

    async def result(self, prompt_id, timeout):
        raise PromptLost(prompt_id)


def test_a_job_lost_too_often_fails_with_the_reason(tmp_path):
    journal, _ = _setup(tmp_path, 2)
    server = ForgetfulServer("flaky", 0.01)
    _run(journal, [server], tmp_path, Settings(max_attempts=3))
    rows = journal.rows()
    assert [r.status for r in rows] == ["failed", "failed"]
    assert all(r.attempts == 3 and r.error.startswith("gave up after 3 attempts") for r in rows)


def test_no_server_left_keeps_jobs_pending(tmp_path):
    journal, _ = _setup(tmp_path, 3)
    dead = FakeServer("dead", 0.01)
    dead.dead = True
    d = _run(journal, [dead], tmp_path)
    assert journal.counts()["pending"] == 3 and d.pending_without_server
    # Only the jobs whose post failed count an attempt (whether a failed post arrived cannot be known).
    assert sum(r.attempts for r in journal.rows()) <= 2 and journal.rows()[-1].attempts == 0


def test_stop_gives_in_flight_jobs_back_as_pending(tmp_path):
    journal, _ = _setup(tmp_path, 6)
    a = FakeServer("a", 0.2)

    async def stop_soon(d):
        await asyncio.sleep(0.3)
        await d.stop()

    _run(journal, [a], tmp_path, after=stop_soon)
    counts = journal.counts()
    assert counts["running"] == 0 and counts["done"] >= 1 and counts["pending"] >= 1
    assert a.cancelled  # our prompts were taken off the server
    assert all(r.attempts == 0 for r in journal.rows("pending"))


def test_resume_follows_what_the_server_still_has_and_requeues_the_rest(tmp_path):
    journal, jobs = _setup(tmp_path, 3)
    a = FakeServer("a", 0.01)
    a.known["p-still-queued"] = {"3": {"inputs": {"seed": 0}}, "9": {}}
    journal.mark_running(jobs[0].key, "a", "p-still-queued")
    journal.mark_running(jobs[1].key, "a", "p-never-arrived")
    journal.mark_running(jobs[2].key, "gone", "p-x")
    _run(journal, [a], tmp_path)
    assert journal.counts()["done"] == 3
    assert sorted(a.ran) == [0, 1, 2]  # each once: job 0 was followed, not queued again
    assert journal.row(jobs[0].key).prompt_id == "p-still-queued"
