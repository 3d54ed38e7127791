"""``journal.sqlite``: the durable state of a batch, in its output folder.

Table ``jobs``, one row per job, ``status`` one of:

* ``pending``  not queued yet, or given back (lost server, Ctrl-C);
* ``running``  queued on ``server`` as ``prompt_id``; written *before* the prompt is posted, so after a crash a
  resume asks that server's queue and ``/history`` whether it ran, instead of running it again;
* ``done``     ``files`` (JSON list, relative to the output folder) written, in ``seconds``;
* ``failed``   ``error`` says why, after ``attempts`` submissions.

Only the driver process writes it (one connection, every change committed at once, WAL mode), so a SIGKILL
loses at most the change being made, never a committed one. Table ``meta`` pins the workflow, so a different
workflow never resumes into the same folder.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jobs import Job

STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    identity TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL DEFAULT '',
    seed TEXT,
    job_values TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    server TEXT,
    prompt_id TEXT,
    files TEXT,
    seconds REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    scores TEXT,
    updated REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class JournalMismatchError(RuntimeError):
    """The output folder holds the journal of another workflow."""


@dataclass
class Row:
    key: str
    position: int
    name: str
    identity: str
    prompt: str
    seed: Any
    values: dict
    status: str
    server: str | None
    prompt_id: str | None
    files: list[str]
    seconds: float | None
    error: str | None
    attempts: int
    scores: list | None


class Journal:
    FILENAME = "journal.sqlite"

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / self.FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- setup --------------------------------------------------------------------------------------

    def bind_workflow(self, digest: str, name: str) -> None:
        """Pin the workflow on first use; a later run with another workflow is refused."""
        row = self.db.execute("SELECT value FROM meta WHERE name='workflow_sha256'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('workflow_sha256', ?), ('workflow_name', ?), ('created', ?)",
                            (digest, name, str(time.time())))
        elif row[0] != digest:
            raise JournalMismatchError(
                f"{self.path} belongs to a batch of another workflow (or the workflow file changed). "
                "Use a new --out folder, or put the original workflow back to resume."
            )

    def add_jobs(self, jobs: Iterable[Job]) -> int:
        """Insert jobs not in the journal yet (a resume adds only new rows); returns how many were added."""
        before = self.db.total_changes
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO jobs (key, position, name, identity, prompt, seed, job_values, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(j.key, j.position, j.name, j.identity, j.prompt, None if j.seed is None else str(j.seed),
                  json.dumps(j.values, sort_keys=True, default=str), now) for j in jobs],
            )
        return self.db.total_changes - before

    # -- transitions (each commits at once) ----------------------------------------------------------

    def _set(self, key: str, **cols: Any) -> None:
        cols["updated"] = time.time()
        names = ", ".join(f"{k} = ?" for k in cols)
        self.db.execute(f"UPDATE jobs SET {names} WHERE key = ?", (*cols.values(), key))

    def mark_running(self, key: str, server: str, prompt_id: str) -> None:
        self.db.execute("UPDATE jobs SET status='running', server=?, prompt_id=?, attempts=attempts+1, error=NULL, "
                        "updated=? WHERE key=?", (server, prompt_id, time.time(), key))

    def mark_done(self, key: str, files: list[str], seconds: float, scores: list | None = None) -> None:
        self._set(key, status="done", files=json.dumps(files), seconds=seconds, error=None,
                  scores=None if scores is None else json.dumps(scores))

    def mark_failed(self, key: str, error: str) -> None:
        self._set(key, status="failed", error=error)

    def mark_pending(self, key: str, *, note: str | None = None, refund_attempt: bool = False) -> None:
        """Give a job back to the queue: after a lost server (the attempt counts) or a user stop (it does not)."""
        self.db.execute("UPDATE jobs SET status='pending', server=NULL, prompt_id=NULL, error=?, updated=?, "
                        "attempts=MAX(0, attempts - ?) WHERE key=?", (note, time.time(), int(refund_attempt), key))

    def reset_failed(self) -> int:
        cur = self.db.execute("UPDATE jobs SET status='pending', error=NULL, attempts=0 WHERE status='failed'")
        return cur.rowcount

    def set_scores(self, key: str, scores: list) -> None:
        self._set(key, scores=json.dumps(scores))

    # -- reading ------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = n
        return counts

    def rows(self, status: str | None = None) -> list[Row]:
        return self._select("WHERE status = ?", (status,)) if status else self._select("", ())

    def row(self, key: str) -> Row:
        found = self._select("WHERE key = ?", (key,))
        if not found:
            raise KeyError(key)
        return found[0]

    def _select(self, where: str, args: tuple) -> list[Row]:
        sql = ("SELECT key, position, name, identity, prompt, seed, job_values, status, server, prompt_id, files, "
               f"seconds, error, attempts, scores FROM jobs {where} ORDER BY position")
        return [
            Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8], r[9], json.loads(r[10] or "[]"),
                r[11], r[12], r[13], json.loads(r[14]) if r[14] else None)
            for r in self.db.execute(sql, args)
        ]
