"""``python -m facebooth weights {list,check,fetch}`` end to end against a local HTTP server on 127.0.0.1.

The server (below) supports Range requests and can be told to drop a response part-way, so resume, integrity
and archive safety are exercised on real sockets. Nothing here touches the internet.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from facebooth.cli import main as cli_main
from facebooth.utils.download import DownloadError, download_file, safetensors_header_problem
from facebooth.utils.files import atomic_save_safetensors

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ local server


class _State:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, list[int]] = {}  # path -> bytes to send before dropping, one per request
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append((self.path, rng))
                body = state.files.get(self.path)
                cut = state.cuts.get(self.path, [])
                cut_at = cut.pop(0) if cut else None
            if body is None:
                self.send_error(404)
                return
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and state.ranges:
                start = int(m.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Accept-Ranges", "bytes" if state.ranges else "none")
            self.send_header("Connection", "close")
            self.end_headers()
            if cut_at is not None:
                self.wfile.write(payload[:cut_at])  # then hang up mid-body
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server():
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("COMFYUI_DIR", "FACEBOOTH_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------------------ helpers


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _blob(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())


def _manifest(tmp_path: Path, face=(), others: dict | None = None) -> Path:
    methods = {"face": {"description": "faces", "entries": list(face)}}
    for name, entries in (others or {}).items():
        methods[name] = {"description": name, "entries": entries}
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({"schema_version": 1, "methods": methods}), encoding="utf-8")
    return p


def _file_entry(eid, url, data: bytes | None, *, folder="facebooth/face", filename=None, sha=True, size=True, **kw):
    e = {"id": eid, "methods": ["face"], "folder": folder, "filename": filename or f"{eid}.bin", "url": url,
         "size": len(data) if (data is not None and size) else None,
         "sha256": _sha(data) if (data is not None and sha) else None, "license": "MIT", "required": True}
    e.update(kw)
    return e


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps odd names such as '../x' verbatim
    return buf.getvalue()


def _pack_entry(url, files: dict[str, bytes], archive: bytes | None, pack="antelopev2", **kw):
    e = {"id": pack, "methods": ["face"], "folder": "insightface", "archive": "zip",
         "extract_to": f"models/{pack}", "url": url,
         "size": len(archive) if archive else None, "sha256": _sha(archive) if archive else None,
         "files": [{"name": n, "size": len(b), "sha256": _sha(b)} for n, b in files.items()],
         "license": "research only", "required": True}
    e.update(kw)
    return e


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ fetch


def test_fetch_single_file_end_to_end(server, tmp_path, capsys):
    data = _blob(300_000)
    server.files["/w/det.bin"] = data
    man = _manifest(tmp_path, [_file_entry("det", server.base + "/w/det.bin", data, subfolder="sub")])
    models = tmp_path / "models"
    rc, out, err = run(capsys, "weights", "fetch", "det", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 0, err
    final = models / "facebooth" / "face" / "sub" / "det.bin"
    assert final.read_bytes() == data
    assert "installed" in out and str(final) in out
    assert _all_files(models) == ["facebooth/face/sub/det.bin"]  # no .part left behind

    # A second fetch sees the valid file and does not download again.
    n = len(server.requests)
    rc, out, _ = run(capsys, "weights", "fetch", "det", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 0 and "already in place" in out and len(server.requests) == n


def test_fetch_zip_archive_unpacks_flat_into_insightface_models_pack(server, tmp_path, capsys):
    files = {"scrfd_10g_bnkps.onnx": _blob(5000, 1), "glintr100.onnx": _blob(9000, 2)}
    # Like the real antelopev2.zip: members wrapped in a top-level antelopev2/ folder.
    archive = _zip_bytes({f"antelopev2/{n}": b for n, b in files.items()} | {"antelopev2/readme.txt": b"hi"})
    server.files["/v0.7/antelopev2.zip"] = archive
    man = _manifest(tmp_path, [_pack_entry(server.base + "/v0.7/antelopev2.zip", files, archive)])
    models = tmp_path / "models"
    rc, out, err = run(capsys, "weights", "fetch", "antelopev2", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 0, err
    pack = models / "insightface" / "models" / "antelopev2"
    for n, b in files.items():
        assert (pack / n).read_bytes() == b
    assert not (pack / "antelopev2").exists()  # not the nested-zip mistake
    assert _all_files(models) == sorted(f"insightface/models/antelopev2/{n}" for n in files)  # zip removed

    rc, out, _ = run(capsys, "weights", "check", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 0 and "OK:" in out


@pytest.mark.parametrize("evil", ["../../evil.onnx", "/tmp/facebooth_evil_abs.onnx", "antelopev2/../../evil.onnx"])
def test_fetch_refuses_zip_with_path_traversal_member(server, tmp_path, capsys, evil):
    files = {"glintr100.onnx": _blob(3000, 3)}
    archive = _zip_bytes({"antelopev2/glintr100.onnx": files["glintr100.onnx"], evil: b"pwned"})
    server.files["/evil.zip"] = archive
    man = _manifest(tmp_path, [_pack_entry(server.base + "/evil.zip", files, archive)])
    models = tmp_path / "deep" / "models"
    rc, out, err = run(capsys, "weights", "fetch", "antelopev2", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 1
    assert "unsafe member" in err and evil in err
    assert not any("evil" in p for p in _all_files(tmp_path))
    assert not Path("/tmp/facebooth_evil_abs.onnx").exists()
    assert not (models / "insightface" / "models" / "antelopev2" / "glintr100.onnx").exists()  # nothing extracted
    assert not (models / "insightface" / "evil.zip").exists()  # the bad archive does not linger


def test_interrupted_download_resumes_with_range_and_is_byte_exact(server, tmp_path, capsys):
    data = _blob(2_500_000, 4)
    half = len(data) // 2
    server.files["/big.bin"] = data
    server.cuts["/big.bin"] = [half]  # the first response hangs up half-way
    man = _manifest(tmp_path, [_file_entry("big", server.base + "/big.bin", data)])
    models = tmp_path / "models"
    args = ["weights", "fetch", "big", "--manifest", str(man), "--models-dir", str(models), "--retries", "0"]

    rc, out, err = run(capsys, *args)
    final = models / "facebooth" / "face" / "big.bin"
    part = final.with_name("big.bin.part")
    assert rc == 1 and "interrupted" in err and "resume" in err
    assert not final.exists()
    assert part.stat().st_size == half

    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert server.requests[-1] == ("/big.bin", f"bytes={half}-")
    assert final.read_bytes() == data
    assert not part.exists()


def test_download_file_retries_and_resumes_within_one_call(server, tmp_path):
    data = _blob(1_200_000, 5)
    server.files["/f.bin"] = data
    server.cuts["/f.bin"] = [100_000, 700_000]  # two drops, then a complete response
    dest = tmp_path / "f.bin"
    download_file(server.base + "/f.bin", dest, size=len(data), sha256=_sha(data), retries=2, retry_wait=0)
    assert dest.read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=100000-", "bytes=800000-"]


def test_download_without_range_support_starts_over_and_stays_exact(server, tmp_path):
    data = _blob(400_000, 6)
    server.files["/f.bin"] = data
    server.cuts["/f.bin"] = [123_456]
    server.ranges = False
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="interrupted"):
        download_file(server.base + "/f.bin", dest, size=len(data), sha256=_sha(data), retries=0)
    download_file(server.base + "/f.bin", dest, size=len(data), sha256=_sha(data), retries=0)
    assert dest.read_bytes() == data


def test_sha256_mismatch_leaves_no_file_and_says_so(server, tmp_path, capsys):
    data = _blob(50_000, 7)
    server.files["/f.bin"] = data
    entry = _file_entry("f", server.base + "/f.bin", data)
    entry["sha256"] = _sha(data + b"x")
    man = _manifest(tmp_path, [entry])
    models = tmp_path / "models"
    rc, out, err = run(capsys, "weights", "fetch", "f", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 1
    assert "sha256 mismatch" in err and "nothing was installed" in err
    assert _all_files(tmp_path / "models") == []  # neither final file nor .part


def test_size_announced_by_server_differs_from_manifest(server, tmp_path, capsys):
    data = _blob(10_000, 8)
    server.files["/f.bin"] = b"<html>login page</html>"
    man = _manifest(tmp_path, [_file_entry("f", server.base + "/f.bin", data)])
    rc, out, err = run(capsys, "weights", "fetch", "f", "--manifest", str(man), "--models-dir", str(tmp_path / "m"))
    assert rc == 1 and "manifest expects 10,000" in err
    assert _all_files(tmp_path / "m") == []


def test_fetch_refuses_entry_without_url_and_prints_manual_instructions(server, tmp_path, capsys):
    entry = _file_entry("msid", None, None, folder="facebooth/face2diffusion", filename="msid.pt",
                        manual="Download it from the Drive page and save it as {path}.")
    man = _manifest(tmp_path, [entry])
    models = tmp_path / "models"
    rc, out, err = run(capsys, "weights", "fetch", "msid", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 1
    assert f"save it as {models / 'facebooth' / 'face2diffusion' / 'msid.pt'}." in out
    assert server.requests == []


def test_fetch_method_skips_produced_and_satisfied_alternatives(server, tmp_path, capsys):
    a, b = _blob(1000, 9), _blob(1000, 10)
    server.files["/a.bin"], server.files["/b.bin"] = a, b
    opt_a = _file_entry("opt-a", server.base + "/a.bin", a, one_of="backend")
    opt_b = _file_entry("opt-b", server.base + "/b.bin", b, one_of="backend")
    produced = {"id": "ids", "methods": ["face"], "folder": "facebooth/identities", "pattern": "*.safetensors",
                "produced_by": "the Save Identity node", "license": "yours", "required": False}
    man = _manifest(tmp_path, [opt_a, opt_b, produced])
    models = tmp_path / "models"
    rc, out, err = run(capsys, "weights", "fetch", "--method", "face", "--manifest", str(man),
                       "--models-dir", str(models))
    assert rc == 0, err
    # Only the first alternative is fetched.
    assert [p for p, _ in server.requests] == ["/a.bin"]
    assert (models / "facebooth" / "face" / "opt-a.bin").read_bytes() == a
    rc, out, _ = run(capsys, "weights", "fetch", "--method", "face", "--manifest", str(man),
                     "--models-dir", str(models))
    assert rc == 0 and "Nothing to fetch" in out and len(server.requests) == 1

    rc, out, _ = run(capsys, "weights", "fetch", "ids", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 1 and "produced by the Save Identity node" in out


def test_fetch_usage_errors(tmp_path, capsys):
    man = _manifest(tmp_path, [_file_entry("x", "https://example.invalid/x", b"1")])
    rc, _, err = run(capsys, "weights", "fetch", "--manifest", str(man), "--models-dir", str(tmp_path))
    assert rc == 2 and "entry ids" in err
    rc, _, err = run(capsys, "weights", "fetch", "nope", "--manifest", str(man), "--models-dir", str(tmp_path))
    assert rc == 2 and "No weights entry with id 'nope'" in err
    rc, _, err = run(capsys, "weights", "fetch", "x", "--manifest", str(man))
    assert rc == 2 and "No models directory" in err and "--models-dir" in err


# ------------------------------------------------------------------------------------------------ check


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_check_missing_and_corrupt_files(tmp_path, capsys):
    data = _blob(4000, 11)
    man = _manifest(tmp_path, [_file_entry("det", "https://example.invalid/det.bin", data),
                               _file_entry("extra", "https://example.invalid/e.bin", data, required=False)])
    models = tmp_path / "models"
    models.mkdir()
    args = ["weights", "check", "--manifest", str(man), "--models-dir", str(models)]

    rc, out, _ = run(capsys, *args)
    assert rc == 1
    assert "MISSING" in out and "get it: python -m facebooth weights fetch det" in out
    assert "missing     facebooth/face/extra.bin (optional)" in out  # optional: reported, not fatal

    target = models / "facebooth" / "face" / "det.bin"
    _write(target, data[:-1])
    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "CORRUPT" in out and "size is 3,999 bytes, expected 4,000" in out

    _write(target, bytes([data[0] ^ 1]) + data[1:])  # same size, different bytes
    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "sha256 is" in out
    rc, out, _ = run(capsys, *args, "--quick")  # --quick skips hashing
    assert rc == 0

    _write(target, data)
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and "OK:" in out


def test_check_validates_safetensors_headers_of_produced_files(tmp_path, capsys):
    produced = {"id": "adapters", "methods": ["instantbooth"], "folder": "facebooth/instantbooth",
                "pattern": "*.safetensors", "produced_by": "training/train_instantbooth.py",
                "license": "yours", "required": True}
    man = _manifest(tmp_path, [], {"instantbooth": [produced]})
    models = tmp_path / "models"
    folder = models / "facebooth" / "instantbooth"
    folder.mkdir(parents=True)
    args = ["weights", "check", "--method", "instantbooth", "--manifest", str(man), "--models-dir", str(models)]

    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "produced by training/train_instantbooth.py" in out

    good = atomic_save_safetensors({"w": torch.randn(8, 4)}, folder / "ib.safetensors", {"method": "instantbooth"})
    rc, out, _ = run(capsys, *args)
    assert rc == 0, out

    blob = good.read_bytes()
    (folder / "ib.safetensors").write_bytes(blob[:-10])  # truncated
    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "CORRUPT" in out and "truncated" in out


def test_safetensors_header_check_agrees_with_the_safetensors_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    good = atomic_save_safetensors({"a": torch.randn(3, 5), "b": torch.arange(7)}, tmp_path / "g.safetensors")
    blob = good.read_bytes()
    assert safetensors_header_problem(good) is None
    load_file(str(good))

    variants = {
        "truncated": blob[:-4],
        "html": b"<!DOCTYPE html><html>Sign in</html>",
        "tiny": b"\x01\x02",
        "trailing": blob + b"\x00" * 16,
    }
    for name, data in variants.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        problem = safetensors_header_problem(p)
        assert problem, name
        with pytest.raises(Exception):  # noqa: B017 -- any error: the reference implementation refuses them too
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


def _pack_manifest(tmp_path):
    files = {"scrfd_10g_bnkps.onnx": _blob(700, 12), "glintr100.onnx": _blob(900, 13)}
    man = _manifest(tmp_path, [_pack_entry("https://example.invalid/antelopev2.zip", files, None)])
    return man, files


def test_check_detects_nested_insightface_folder_and_its_fix_works(tmp_path, capsys):
    man, files = _pack_manifest(tmp_path)
    models = tmp_path / "Comfy UI" / "models"  # a space in the path: the fix must be quoted
    nested = models / "insightface" / "models" / "antelopev2" / "antelopev2"
    for n, b in files.items():
        _write(nested / n, b)
    args = ["weights", "check", "--manifest", str(man), "--models-dir", str(models)]

    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "MISPLACED" in out
    right = models / "insightface" / "models" / "antelopev2"
    fix = [line.split("fix: ", 1)[1] for line in out.splitlines() if "fix: " in line]
    assert fix and len(set(fix)) == 1
    assert fix[0] == f"mv '{nested}'/*.onnx '{right}'/ && rmdir '{nested}'"

    subprocess.run(["bash", "-c", fix[0]], check=True)
    rc, out, _ = run(capsys, *args)
    assert rc == 0, out
    assert not nested.exists()


def test_check_detects_pack_without_models_level(tmp_path, capsys):
    man, files = _pack_manifest(tmp_path)
    models = tmp_path / "models"
    flat = models / "insightface" / "antelopev2"
    for n, b in files.items():
        _write(flat / n, b)
    args = ["weights", "check", "--manifest", str(man), "--models-dir", str(models)]
    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "MISPLACED" in out
    fix = next(line.split("fix: ", 1)[1] for line in out.splitlines() if "fix: " in line)
    assert fix.startswith("mkdir -p ")
    subprocess.run(["bash", "-c", fix], check=True)
    rc, out, _ = run(capsys, *args)
    assert rc == 0, out


def test_check_one_of_alternatives(tmp_path, capsys):
    a, b = _blob(100, 14), _blob(100, 15)
    man = _manifest(tmp_path, [_file_entry("opt-a", "https://example.invalid/a", a, one_of="backend"),
                               _file_entry("opt-b", "https://example.invalid/b", b, one_of="backend")])
    models = tmp_path / "models"
    models.mkdir()
    args = ["weights", "check", "--manifest", str(man), "--models-dir", str(models)]
    rc, out, _ = run(capsys, *args)
    assert rc == 1 and "no complete option for backend" in out
    _write(models / "facebooth" / "face" / "opt-b.bin", b)
    rc, out, _ = run(capsys, *args)
    assert rc == 0, out
    assert "'opt-b' is complete" in out and "not needed" in out


def test_check_honours_extra_model_paths_yaml(tmp_path, capsys):
    data = _blob(500, 16)
    man = _manifest(tmp_path, [_file_entry("det", "https://example.invalid/det.bin", data)])
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    shared = tmp_path / "shared_models"
    _write(shared / "face_models" / "det.bin", data)
    args = ["weights", "check", "--manifest", str(man), "--comfyui-dir", str(comfy)]
    rc, _, _ = run(capsys, *args)
    assert rc == 1
    (comfy / "extra_model_paths.yaml").write_text(
        f"shared:\n  base_path: {shared}\n  facebooth/face: face_models\n", encoding="utf-8")
    rc, out, _ = run(capsys, *args)
    assert rc == 0, out
    assert str(shared / "face_models" / "det.bin") in out


def test_models_dir_from_environment(tmp_path, capsys, monkeypatch):
    data = _blob(100, 17)
    man = _manifest(tmp_path, [_file_entry("det", "https://example.invalid/det.bin", data)])
    rc, _, err = run(capsys, "weights", "check", "--manifest", str(man))
    assert rc == 2 and "No models directory" in err and "COMFYUI_DIR" in err

    fb_models = tmp_path / "fb"
    _write(fb_models / "facebooth" / "face" / "det.bin", data)
    monkeypatch.setenv("FACEBOOTH_MODELS_DIR", str(fb_models))
    rc, out, _ = run(capsys, "weights", "check", "--manifest", str(man))
    assert rc == 0 and f"models dir: {fb_models}" in out

    comfy = tmp_path / "comfy"
    (comfy / "models").mkdir(parents=True)
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))  # takes precedence over FACEBOOTH_MODELS_DIR
    rc, out, _ = run(capsys, "weights", "check", "--manifest", str(man))
    assert rc == 1 and f"models dir: {comfy / 'models'}" in out


def test_bad_manifest_is_a_clear_usage_error(tmp_path, capsys):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"schema_version": 1, "methods": {"face": {"entries": [{"id": "X"}]}}}))
    rc, _, err = run(capsys, "weights", "list", "--manifest", str(p))
    assert rc == 2 and "not a valid FaceBooth weights manifest" in err and "id must be lowercase" in err


# ------------------------------------------------------------------------------------------------ list + CLI wiring


def test_list_shows_status_with_models_dir(tmp_path, capsys):
    data = _blob(2048, 18)
    man = _manifest(tmp_path, [_file_entry("det", "https://example.invalid/det.bin", data)])
    models = tmp_path / "models"
    rc, out, _ = run(capsys, "weights", "list", "--manifest", str(man), "--models-dir", str(models))
    assert rc == 0
    header, row = out.splitlines()[:2]
    assert header.split() == ["METHOD", "ID", "FILE", "FOLDER", "SIZE", "REQUIRED", "SOURCE", "STATUS"]
    assert row.split()[:3] == ["face", "det", "det.bin"] and row.split()[-1] == "MISSING"
    _write(models / "facebooth" / "face" / "det.bin", data)
    rc, out, _ = run(capsys, "weights", "list", "--manifest", str(man), "--models-dir", str(models))
    assert out.splitlines()[1].split()[-1] == "ok"


def test_python_m_facebooth_weights_list_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "FACEBOOTH_MODELS_DIR")}
    proc = subprocess.run([sys.executable, "-m", "facebooth", "weights", "list"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["METHOD", "ID", "FILE"]
    for needle in ("models/antelopev2/glintr100.onnx", "msid.pt", "manual", "produced", "mtcnn/pnet.pt"):
        assert needle in proc.stdout
    methods = {line.split()[0] for line in lines[1:] if line.strip()}
    assert methods == {"face", "cross_init", "face2diffusion", "portraitbooth", "instantbooth", "personamagic", "evaluation"}

    proc = subprocess.run([sys.executable, "-m", "facebooth", "weights", "list", "--method", "face2diffusion"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0
    assert {line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip()} == {"face", "face2diffusion"}


def test_missing_or_broken_command_modules_are_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ["does_not_exist", "weights"])
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == ["weights"]
    rc, out, err = run(capsys, "weights", "list", "--method", "cross_init")
    assert rc == 0 and "cross-init-embeddings" in out
    # every listed command ships with the pack, so an absent one is a broken install: skipped with a warning
    assert "'does_not_exist' is unavailable" in err

    # A command module that exists but fails to import is skipped with a warning, not a crash.
    pkg = tmp_path / "fb_cli_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "broken.py").write_text("import a_module_that_is_not_installed_xyz\n", encoding="utf-8")
    (pkg / "hello.py").write_text(
        "def add_parser(subparsers):\n"
        "    p = subparsers.add_parser('hello')\n"
        "    p.set_defaults(func=lambda args: 7)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_main, "COMMAND_MODULES",
                        ["fb_cli_plugins.absent", "fb_cli_plugins.broken", "fb_cli_plugins.hello", "weights"])
    try:
        rc, out, err = run(capsys, "hello")
        assert rc == 7
        assert "'fb_cli_plugins.broken' is unavailable" in err and "a_module_that_is_not_installed_xyz" in err
        assert "'fb_cli_plugins.absent' is unavailable" in err
    finally:
        for m in [m for m in sys.modules if m.startswith("fb_cli_plugins")]:
            sys.modules.pop(m)


def test_no_command_prints_help_and_returns_2(capsys):
    rc = cli_main.main([])
    assert rc == 2 and "weights" in capsys.readouterr().err
