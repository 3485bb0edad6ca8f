"""The short soak (issue 18, item 4): bench/soak.py for 20 s, with a worker
killed every 7 s and Redis restarted once, must lose no request and leave no
key behind, and every process must still run. Memory and descriptor growth
are benchmark targets, measured by the 20-minute run (`make soak`,
BENCHMARKS.md), not asserted here: 20 s is too short to tell growth from
warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ROOT

pytestmark = pytest.mark.slow


def test_short_soak_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    command = [
        sys.executable, "-m", "bench.soak", "--duration", "20", "--kill-every", "7",
        "--redis-restart-at", "10", "--sample-every", "3", "--warmup", "5",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240, check=False
    )
    assert out.with_suffix(".json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 0
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    report = json.dumps(summary, indent=1)
    assert summary["requests"] > 100, report
    assert [e for _, e in summary["events"]].count("restart redis") == 1, report
    assert sum(e.startswith("kill worker") for _, e in summary["events"]) == 2, report
    assert summary["lost"] == {}, report
    assert summary["keys_left"] == [], report
    assert all(summary["alive"].values()), report
