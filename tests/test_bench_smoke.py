"""The load benchmark's harness at N = 2, so it cannot rot: all three systems, every reply whole."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_load_benchmark_runs_at_n_2():
    # A session of its own, so that on a time-out the harness's servers are killed with it, not left running.
    bench = subprocess.Popen(
        [sys.executable, "bench/load.py", "--points", "2", "--users", "2", "--tokens", "20", "--pause", "0",
         "--timeout", "60", "--queries"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = bench.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGKILL)
        raise
    run = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for system in ("floor", "fastapi", "site"):
        assert any(line.split()[1:3] == [system, "2/2"] for line in run.stdout.splitlines() if line.strip()), system
    assert "N=2: site replies whole 2/2 ok" in run.stdout
    # Every follow-up turn costs the same number of SQL statements however long the history
    # (the first turn, which creates the conversation, skips the history and busy checks).
    queries = next(line for line in run.stdout.splitlines() if line.startswith("SQL statements per turn"))
    counts = [int(part.rsplit(": ", 1)[1]) for part in queries.split(": ", 1)[1].split(", ")]
    assert len(counts) == 4 and 0 < counts[0] <= counts[1] == counts[2] == counts[3], queries
