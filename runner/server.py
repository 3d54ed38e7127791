"""Start and stop a real ComfyUI server in a subprocess.

Used by the integration tests and by ``python -m facebooth examples``. The server runs from a ComfyUI source
tree with its own ``--base-directory`` (models, custom_nodes, input, output, user), so a run never touches
the user's ComfyUI folders unless asked to.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .client import ComfyClient

log = logging.getLogger(__name__)

BASE_SUBDIRS = ("custom_nodes", "models", "input", "output", "user", "temp")


class ComfyUINotFoundError(FileNotFoundError):
    """The given folder is not a ComfyUI source tree."""


class ComfyServerError(RuntimeError):
    """ComfyUI exited or did not answer in time. The message carries the last log lines."""


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_comfyui_dir(comfyui_dir: str | os.PathLike | None) -> Path:
    """Return the ComfyUI folder as a Path, or raise with a message that says how to point at one."""
    if not comfyui_dir:
        raise ComfyUINotFoundError(
            "No ComfyUI folder given, and this pack is not inside one (ComfyUI/custom_nodes/<pack>). Pass "
            "--comfyui-dir /path/to/ComfyUI (or set COMFYUI_DIR), or pass --server URL to use a ComfyUI that is "
            "already running."
        )
    path = Path(comfyui_dir).expanduser()
    if not is_comfyui_dir(path):
        raise ComfyUINotFoundError(
            f"{path} is not a ComfyUI folder (expected main.py and comfy/ inside). Pass the folder you cloned "
            "ComfyUI into with --comfyui-dir (or COMFYUI_DIR)."
        )
    return path


def is_comfyui_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


# Not resolved: a pack linked into custom_nodes is imported through the link, and that is where it "lives".
_PACK_AS_IMPORTED = Path(os.path.abspath(__file__)).parent.parent


def find_enclosing_comfyui(start: str | os.PathLike = _PACK_AS_IMPORTED) -> Path | None:
    """The ComfyUI this pack lives in (``ComfyUI/custom_nodes/<pack>``): the nearest folder above ``start``
    with ``main.py`` and ``comfy/``, or None. Both the path as given and its resolved form are searched, so a
    pack linked into custom_nodes is found from the link as well."""
    start = Path(start).absolute()
    for base in dict.fromkeys((start, start.resolve())):
        for folder in base.parents:
            if is_comfyui_dir(folder):
                return folder
    return None


def default_comfyui_dir(given: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """``--comfyui-dir``, else ``$COMFYUI_DIR``, else the ComfyUI this pack was cloned into (None if none)."""
    return given or os.environ.get("COMFYUI_DIR") or find_enclosing_comfyui()


def pack_import_problems(startup_log: str, link_name: str = "FaceBooth") -> list[str]:
    """Lines of ComfyUI's startup log that say the pack, or one of its node modules, failed to import.

    ComfyUI marks a pack that raised on import with "Cannot import ..." and "(IMPORT FAILED)"; our own
    ``nodes/__init__.py`` logs "FaceBooth: the <module> nodes could not be loaded" and keeps the rest. A
    traceback frame inside the pack's folder during startup counts too.
    """
    problems = []
    pack_path = f"custom_nodes{os.sep}{link_name}{os.sep}"
    for line in startup_log.splitlines():
        text = line.strip()
        if ("IMPORT FAILED" in text or "Cannot import" in text) and link_name in text:
            problems.append(text)
        elif text.startswith("FaceBooth:") and "could not be loaded" in text:
            problems.append(text)
        elif text.startswith('File "') and pack_path in text:
            problems.append(text)
    return problems


def link_pack(base_dir: str | os.PathLike, pack_dir: str | os.PathLike, name: str = "FaceBooth") -> Path:
    """Install the pack into ``base_dir/custom_nodes/<name>`` as a symlink, the way users install from git."""
    link = Path(base_dir) / "custom_nodes" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(pack_dir).resolve()
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return link
        raise FileExistsError(f"{link} already exists and is not a link to {target}")
    link.symlink_to(target, target_is_directory=True)
    return link


def _set_parent_death_signal() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ComfyServer:
    """A ComfyUI subprocess. Use as a context manager; ``client`` talks to it once started.

    ``startup_timeout`` covers importing torch and all nodes, which takes 10-60 s on a busy CPU machine.
    The log (stdout+stderr of ComfyUI) goes to ``log_file`` (default: ``<base_dir>/comfyui.log``).
    """

    def __init__(
        self,
        comfyui_dir: str | os.PathLike,
        base_dir: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        cpu: bool = True,
        extra_args: Sequence[str] = (),
        log_file: str | os.PathLike | None = None,
        python: str | None = None,
        startup_timeout: float = 180.0,
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.comfyui_dir = check_comfyui_dir(comfyui_dir)
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="facebooth-comfy-")).resolve()
        self.host = host
        self.port = port or find_free_port(host)
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.log_file = Path(log_file) if log_file else self.base_dir / "comfyui.log"
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.startup_timeout = startup_timeout
        self.env = env
        # Linux: ComfyUI gets SIGTERM when the thread that started it dies, even by SIGKILL (batch, Ray actors),
        # so a killed driver never leaves an orphan server holding memory.
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.proc: subprocess.Popen | None = None
        self._log_handle = None
        self.client = ComfyClient(self.url)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        db = self.base_dir / "user" / "comfyui.db"  # ComfyUI's default lives in its own tree; keep runs isolated
        cmd = [
            self.python, "main.py",
            "--listen", self.host, "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--database-url", f"sqlite:///{db}",
            "--disable-auto-launch", "--disable-api-nodes",
        ]
        if self.cpu:
            cmd.append("--cpu")
        return cmd + self.extra_args

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        for sub in BASE_SUBDIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_file, "ab")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log.info("Starting ComfyUI: %s (log: %s)", " ".join(self.command()), self.log_file)
        self.proc = subprocess.Popen(
            self.command(), cwd=self.comfyui_dir, stdout=self._log_handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=_set_parent_death_signal if self.die_with_parent else None,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self.proc.returncode} while starting. Last log lines "
                    f"({self.log_file}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f} s. Last log lines "
                    f"({self.log_file}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # ComfyUI runs in its own session: signal its whole group (it may have spawned workers).
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- log ----------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def startup_log(self) -> str:
        """The log up to the point the HTTP server started: node imports and their failures."""
        text = self.log_text()
        cut = text.find("Starting server")
        return text if cut < 0 else text[:cut]
