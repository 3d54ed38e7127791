"""``facebooth batch`` against two real ComfyUI servers on this machine (loopback only).

Server A is the session's ``comfy_server``; server B is started here on its own base folder (ComfyUI numbers
SaveImage files per folder, so two servers never share an output folder). The kill-a-server test runs last
because it kills B. Jobs are a tiny txt2img (64 px, 2 steps) on the random checkpoint; each test uses its own
seeds so its jobs are its own in the servers' histories, which is where "ran exactly once" is counted.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from facebooth.runner import drawn_face, local_setup
from facebooth.runner.batch.dispatcher import Settings
from facebooth.runner.batch.jobs import matrix_jobs
from facebooth.runner.batch.journal import Journal
from facebooth.runner.batch.run import BatchSpec, execute
from facebooth.runner.batch.servers import ComfyBackend, HttpTransport
from facebooth.runner.server import ComfyServer
from helpers.batch_workflows import FACES, PROMPTS, TXT2IMG
from PIL import Image


@pytest.fixture(scope="module")
def servers(request, comfyui_dir, facebooth_cache_dir, tmp_path_factory):
    """[A, B]: B starts in a thread while the session server A starts (or is already up)."""
    base = tmp_path_factory.mktemp("comfy-base-b")
    local_setup.prepare_base_dir(base, cache_dir=facebooth_cache_dir, comfyui_dir=comfyui_dir)
    # Not die_with_parent: it is started from a thread that ends (the signal follows the starting thread).
    b = ComfyServer(comfyui_dir, base, startup_timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = []
    starter = threading.Thread(target=lambda: _start(b, errors))
    starter.start()
    try:
        a = request.getfixturevalue("comfy_server")
    finally:
        starter.join()
    if errors:
        raise errors[0]
    yield [a, b]
    b.stop()


def _start(server, errors):
    try:
        server.start()
    except BaseException as exc:  # noqa: BLE001 (re-raised in the fixture)
        errors.append(exc)


@pytest.fixture(scope="module")
def base_values(comfy_setup):
    return {"CHECKPOINT": comfy_setup.checkpoint_name, "WORKFLOW": "batchtest"}


def executions(urls, keys) -> collections.Counter:
    """How many times each job key ran to success, over the servers' whole /history (an interrupted run made
    nothing, so it does not count)."""
    import urllib.request

    count = collections.Counter()
    for url in urls:
        with urllib.request.urlopen(url + "/history", timeout=60) as r:
            history = json.load(r)
        for entry in history.values():
            job = ((entry["prompt"][3] or {}).get("extra_pnginfo") or {}).get("facebooth_job")
            if job and job["key"] in keys and (entry.get("status") or {}).get("status_str") == "success":
                count[job["key"]] += 1
    return count


def run_in_process(spec, urls, inflight=2):
    backends = [ComfyBackend(HttpTransport(u), inflight) for u in urls]
    return asyncio.run(execute(spec, backends, handle_signals=False))


def assert_complete_outputs(out: Path, journal: Journal, n_jobs: int) -> None:
    rows = journal.rows()
    assert [r.status for r in rows] == ["done"] * n_jobs
    files = sorted(p.name for p in (out / "images").iterdir())
    assert len(files) == n_jobs and not [f for f in files if f.endswith(".tmp")]
    for r in rows:
        assert len(r.files) == 1
        img = Image.open(out / r.files[0])
        img.load()  # a partial file would fail here
        meta = json.loads(img.text["facebooth_job"])
        assert meta["key"] == r.key and meta["values"] == r.values
        assert json.loads(img.text["prompt"])["3"]["inputs"]["seed"] == r.values["SEED"]


def test_twelve_jobs_over_two_servers_each_done_once(servers, base_values, tmp_path):
    jobs = matrix_jobs(None, PROMPTS, seeds=6, seed_base=1000)
    assert len(jobs) == 12
    spec = BatchSpec(TXT2IMG, "batchtest", jobs, base_values, tmp_path)
    outcome = run_in_process(spec, [s.url for s in servers])
    assert outcome.counts == {"pending": 0, "running": 0, "done": 12, "failed": 0}
    journal = Journal(tmp_path)
    assert_complete_outputs(tmp_path, journal, 12)
    assert {r.server for r in journal.rows()} == {s.url for s in servers}  # both pulled work
    assert all(r.attempts == 1 for r in journal.rows())
    keys = {j.key for j in jobs}
    assert executions([s.url for s in servers], keys) == {k: 1 for k in keys}
    report = (tmp_path / "report.html").read_text()
    assert all(p in report for p in PROMPTS) and report.count("<img ") == 12
    assert len((tmp_path / "manifest.csv").read_text().splitlines()) == 13


def _journal_counts(path: Path) -> dict:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    except sqlite3.Error:  # the journal is being created
        return {}
    finally:
        db.close()


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "facebooth", "batch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _run_until(args, journal_path: Path, done: int):
    """Start the CLI and return it once the journal shows ``done`` jobs done and one running."""
    proc = _cli(args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal_path.exists():
            counts = _journal_counts(journal_path)
            if counts.get("done", 0) >= done and counts.get("running", 0) >= 1:
                return proc
        time.sleep(0.2)
    raise AssertionError("the batch ended or stalled before it could be stopped:\n" + (proc.stdout.read() if proc.poll() is not None else ""))


def _queued_prompt_ids(urls) -> set:
    import urllib.request

    ids = set()
    for url in urls:
        with urllib.request.urlopen(url + "/queue", timeout=60) as r:
            queue = json.load(r)
        ids |= {item[1] for item in queue["queue_running"] + queue["queue_pending"]}
    return ids


def test_ctrl_c_then_sigkill_mid_run_then_resume_loses_and_repeats_nothing(servers, comfy_setup, tmp_path):
    wf = tmp_path / "tiny_api.json"
    wf.write_text(json.dumps(TXT2IMG))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "out"
    urls = [s.url for s in servers]
    args = [str(wf), "--prompts", str(prompts), "--seeds", "8", "--seed-base", "2000", "--out", str(out),
            "--checkpoint", comfy_setup.checkpoint_name] + [a for u in urls for a in ("--server", u)]
    journal_path = out / "journal.sqlite"

    # Ctrl-C: our prompts leave the servers, the journal keeps them pending, exit status 130.
    first = _run_until(args, journal_path, done=1)
    first.send_signal(signal.SIGINT)
    text, _ = first.communicate(timeout=120)
    assert first.returncode == 130, text
    at_stop = _journal_counts(journal_path)
    print(f"\njournal after Ctrl-C: {at_stop}")
    assert "running" not in at_stop and at_stop.get("pending", 0) >= 1
    db = sqlite3.connect(journal_path)
    ours = {row[0] for row in db.execute("SELECT prompt_id FROM jobs WHERE prompt_id IS NOT NULL")}
    db.close()
    assert not ours & _queued_prompt_ids(urls)

    # SIGKILL: nothing can be cleaned up; the journal still knows what was running where.
    second = _run_until(args, journal_path, done=at_stop.get("done", 0) + 1)
    second.send_signal(signal.SIGKILL)
    second.wait(30)
    at_kill = _journal_counts(journal_path)
    print(f"journal at SIGKILL: {at_kill}")
    assert at_kill.get("running", 0) >= 1 and at_kill.get("done", 0) < 8
    for f in (out / "images").iterdir():  # whatever is there under a final name is a whole image
        if not f.name.endswith(".tmp"):
            Image.open(f).load()

    third = _cli(args)
    log_text, _ = third.communicate(timeout=300)
    assert third.returncode == 0, log_text
    after = _journal_counts(journal_path)
    print(f"journal after resume: {after}")
    assert after == {"done": 8}
    journal = Journal(out)
    assert_complete_outputs(out, journal, 8)
    keys = {r.key for r in journal.rows()}
    assert executions([s.url for s in servers], keys) == {k: 1 for k in keys}
    assert sum(r.attempts for r in journal.rows()) == 8


def test_a_policy_failure_fails_its_job_and_the_batch_goes_on(servers, comfy_setup, tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    drawn_face.synthetic_face(0).save(faces / "anna.png")
    drawn_face.synthetic_face(1).save(faces / "ben.png")
    Image.new("RGB", (128, 128), (40, 80, 160)).save(faces / "empty_wall.png")
    table = tmp_path / "jobs.jsonl"
    rows = [{"FACE_IMAGE": "faces/anna.png"}, {"FACE_IMAGE": "faces/empty_wall.png", "3.mode": "detect"},
            {"FACE_IMAGE": "faces/ben.png"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from facebooth.runner.batch.jobs import load_table

    jobs = load_table(table)
    spec = BatchSpec(FACES, "faces", jobs, dict(comfy_setup.substitutions), tmp_path / "out")
    outcome = run_in_process(spec, [s.url for s in servers])
    assert outcome.counts == {"pending": 0, "running": 0, "done": 2, "failed": 1}
    journal = Journal(tmp_path / "out")
    failed = journal.rows("failed")
    assert [r.identity for r in failed] == ["empty_wall"]
    assert "No face found" in failed[0].error and failed[0].attempts == 1
    assert "No face found" in (tmp_path / "out" / "report.html").read_text()
    done = journal.rows("done")
    assert [r.identity for r in done] == ["anna", "ben"]
    # The face went up once per server, under its content hash.
    for r in done:
        assert Image.open(tmp_path / "out" / r.files[0]).size == (224, 224)


def test_dry_run_lists_missing_node_file_and_placeholder_at_once(servers, comfy_setup, tmp_path):
    workflow = json.loads(json.dumps(FACES))
    workflow["5"] = {"class_type": "FaceBoothNoSuchNode", "inputs": {"text": "$CAPTION"}}
    wf = tmp_path / "broken_api.json"
    wf.write_text(json.dumps(workflow))
    table = tmp_path / "jobs.csv"
    table.write_text("FACE_IMAGE,CAPTION\nno_such_face.png,hello\nno_such_face.png,\n")
    out = tmp_path / "out"
    proc = _cli([str(wf), "--jobs", str(table), "--out", str(out), "--dry-run", "--server", servers[0].url,
                 "--checkpoint", comfy_setup.checkpoint_name,
                 "--set", f"ARCFACE={comfy_setup.substitutions['ARCFACE']}"])
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, text
    assert "missing node type: node 5 is 'FaceBoothNoSuchNode'" in text
    assert "missing file: node 1 (LoadImage) input 'image' = 'no_such_face.png'" in text and "(all jobs)" in text
    assert "unfilled placeholder: $CAPTION" in text and "(job 2)" in text
    assert "3 problem(s) found in 2 job(s)" in text
    assert not (out / "journal.sqlite").exists()  # nothing queued, nothing journaled


def test_killed_server_hands_its_jobs_to_the_other(servers, base_values, tmp_path):
    a, b = servers
    jobs = matrix_jobs(None, PROMPTS[:1], seeds=6, seed_base=3000)
    spec = BatchSpec(TXT2IMG, "batchtest", jobs, base_values, tmp_path, Settings(inflight=2))
    killed = threading.Event()

    def kill_b_when_busy():
        path = tmp_path / "journal.sqlite"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if path.exists():
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
                try:
                    busy = db.execute("SELECT COUNT(*) FROM jobs WHERE status='running' AND server=?",
                                      (b.url,)).fetchone()[0]
                except sqlite3.Error:  # the journal is being created
                    busy = 0
                finally:
                    db.close()
                if busy:
                    os.killpg(b.proc.pid, signal.SIGKILL)
                    killed.set()
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_b_when_busy)
    watcher.start()
    outcome = run_in_process(spec, [a.url, b.url])
    watcher.join()
    assert killed.is_set()
    assert outcome.counts == {"pending": 0, "running": 0, "done": 6, "failed": 0}
    journal = Journal(tmp_path)
    assert_complete_outputs(tmp_path, journal, 6)
    moved = [r for r in journal.rows() if r.attempts == 2]
    assert moved and all(r.server == a.url for r in moved)
    keys = {j.key for j in jobs}
    on_a = executions([a.url], keys)
    assert set(on_a.values()) == {1}  # nothing ran twice on the survivor
    assert set(on_a) | {r.key for r in journal.rows() if r.server == b.url} == keys
