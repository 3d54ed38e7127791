"""One logging tree: every module logs to ``logging.getLogger(__name__)`` below the package logger, the CLI's
-v/-q set that root's level, and a message reaches stderr once even when the host also logs through the root
logger (as ComfyUI and the training scripts do)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["cli", "nodes", "pipelines", "runner", "training", "utils", "devmodels"]


def _package_sources() -> list[Path]:
    files = [ROOT / "__init__.py", ROOT / "__main__.py"]
    for d in SOURCE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return [f for f in files if f.is_file()]


def test_every_logger_is_named_after_its_module():
    bad = []
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger"):
                continue
            args = node.args
            literal = args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
            if literal and args[0].value.lower().split(".")[0] == "facebooth":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")  # a package name by hand
        for node in ast.parse(path.read_text(), str(path)).body:  # module-level loggers: log = logging.getLogger(__name__)
            is_logger = isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "attr", None) == "getLogger"
            if is_logger and [ast.unparse(a) for a in node.value.args] != ["__name__"] and \
                    [ast.unparse(t) for t in node.targets] != ["PACKAGE_LOGGER"]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "loggers outside the package tree (use logging.getLogger(__name__)):\n" + "\n".join(bad)


_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="ROOT %(name)s %(message)s")  # a host's root handler
from facebooth.cli import main as cli
print(cli.PACKAGE_LOGGER)
cli.main([FLAG] if FLAG else [])  # no command: prints help, but configures logging first
log = logging.getLogger("facebooth.pipelines.instantbooth.files")
log.debug("debug-line")
log.info("info-line")
log.warning("warning-line")
"""


def _run(flag: str) -> tuple[str, str]:
    code = _SCRIPT.replace("FLAG", repr(flag))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT.parent),
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


def test_cli_flags_configure_the_package_root_and_nothing_is_logged_twice():
    stdout, stderr = _run("")
    assert stdout.splitlines()[0] == "facebooth"
    assert stderr.count("info-line") == 1 and stderr.count("warning-line") == 1 and "debug-line" not in stderr
    assert "ROOT facebooth" not in stderr  # the CLI's handler only, not the host's as well
    _, verbose = _run("-v")
    assert verbose.count("debug-line") == 1 and verbose.count("info-line") == 1
    _, quiet = _run("-q")
    assert "info-line" not in quiet and quiet.count("warning-line") == 1
