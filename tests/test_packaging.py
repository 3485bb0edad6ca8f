"""The command line as installed: `python -m keras_server` runs it, and
every way of starting it names itself in its usage lines and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ROOT

# Each test starts Python processes (seconds).
pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_python_m_keras_server_names_itself() -> None:
    """`python -m keras_server` runs the same command line, and its usage and
    errors name the program as it was run."""
    helped = run(sys.executable, "-m", "keras_server", "--help", cwd=ROOT)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: python -m keras_server "), helped.stdout[:200]
    assert "--role" in helped.stdout
    bad = run(sys.executable, "-m", "keras_server", "--batch-size", "0", cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.startswith("python -m keras_server: error: --batch-size="), bad.stderr
    unknown = run(sys.executable, "-m", "keras_server", "--no-such-flag", cwd=ROOT)
    assert unknown.returncode == 2
    assert "python -m keras_server: error: unrecognized arguments" in unknown.stderr


def test_run_keras_server_py_still_names_itself() -> None:
    bad = run(sys.executable, "run_keras_server.py", "--batch-size", "0", cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.startswith("run_keras_server.py: error: --batch-size="), bad.stderr
