"""The batch journal: statuses, attempts, durability across connections, workflow pinning."""
from __future__ import annotations

import sqlite3

import pytest
from facebooth.runner.batch.jobs import Job
from facebooth.runner.batch.journal import Journal, JournalMismatchError


def _jobs(n):
    return [Job(i, {"PROMPT": "p", "SEED": i}) for i in range(n)]


def test_transitions_are_committed_at_once(tmp_path):
    journal = Journal(tmp_path)
    journal.bind_workflow("abc", "demo")
    jobs = _jobs(4)
    assert journal.add_jobs(jobs) == 4
    assert journal.add_jobs(jobs) == 0  # a resume adds nothing twice
    k0, k1, k2, _ = (j.key for j in jobs)
    journal.mark_running(k0, "http://a", "pid0")
    journal.mark_done(k0, ["images/x_01.png"], 1.5, [0.25])
    journal.mark_running(k1, "http://b", "pid1")
    journal.mark_failed(k1, "No face found")
    journal.mark_running(k2, "http://a", "pid2")
    # Another connection (a crash right now) sees every change: each one was committed.
    other = sqlite3.connect(tmp_path / "journal.sqlite")
    rows = dict(other.execute("SELECT key, status FROM jobs"))
    assert rows == {jobs[0].key: "done", k1: "failed", k2: "running", jobs[3].key: "pending"}
    assert other.execute("SELECT server, prompt_id, attempts FROM jobs WHERE key=?", (k2,)).fetchone() == ("http://a", "pid2", 1)
    other.close()
    assert journal.counts() == {"pending": 1, "running": 1, "done": 1, "failed": 1}
    done = journal.row(k0)
    assert done.files == ["images/x_01.png"] and done.seconds == 1.5 and done.scores == [0.25]
    assert journal.row(k1).error == "No face found" and journal.row(k1).attempts == 1
    journal.close()


def test_pending_again_counts_or_refunds_the_attempt(tmp_path):
    journal = Journal(tmp_path)
    job = _jobs(1)[0]
    journal.add_jobs([job])
    journal.mark_running(job.key, "http://a", "p1")
    journal.mark_pending(job.key, note="server lost")
    assert journal.row(job.key).attempts == 1 and journal.row(job.key).server is None
    journal.mark_running(job.key, "http://b", "p2")
    journal.mark_pending(job.key, refund_attempt=True, note="Ctrl-C")
    row = journal.row(job.key)
    assert (row.status, row.attempts, row.error) == ("pending", 1, "Ctrl-C")
    journal.mark_failed(job.key, "x")
    assert journal.reset_failed() == 1 and journal.row(job.key).status == "pending"


def test_another_workflow_is_refused(tmp_path):
    journal = Journal(tmp_path)
    journal.bind_workflow("abc", "demo")
    journal.close()
    again = Journal(tmp_path)
    again.bind_workflow("abc", "demo")
    with pytest.raises(JournalMismatchError, match="another workflow"):
        again.bind_workflow("def", "demo")
    with pytest.raises(sqlite3.IntegrityError):  # the status column only takes the four statuses
        again.db.execute("UPDATE jobs SET status='lost'")
        again.db.execute("INSERT INTO jobs (key, position, name, job_values, status) VALUES ('k', 0, 'n', '{}', 'lost')")
