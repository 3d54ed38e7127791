"""``python -m facebooth examples ...`` as a subprocess from the repository root, for the CLI tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def examples_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "facebooth", "examples", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
    )
