"""The benchmarks' harnesses, small, so they cannot rot: the load benchmark at N = 2 (all three
systems, every reply whole) and the retrieval evaluation on a tiny corpus."""

import json
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


@pytest.mark.django_db(transaction=True)
def test_the_retrieval_evaluation_scores_variants_and_the_bm25_baseline(tmp_path):
    """bench/retrieval.py's parts on a tiny corpus, so the evaluation cannot rot."""
    from bench import retrieval
    from tests.test_documents import ingest
    from tests.test_retrieval import HANDBOOK

    ingest(None, "docs/handbook.md", HANDBOOK)
    ingest(None, "docs/seals.md", b"# Seals\n\nReplace a leaking pump seal with a new gasket.\n")
    questions = [
        {"question": "how do I fix a leaking seal?", "relevant_sources": ["seals.md"]},
        {"question": "how do I prime the pump before the first start?", "relevant_sources": ["handbook.md"]},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in questions))
    ranked = retrieval.run_variant(path, mode="hybrid", rewrite="recent")
    assert [sources[0] for sources in ranked] == ["docs/seals.md", "docs/handbook.md"]
    assert retrieval.score(ranked, questions) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "MRR": 1.0}
    bm25 = retrieval.bm25_baseline(questions, rewrite=False)
    assert len(bm25) == 2 and all(sources for sources in bm25)
    # A miss counts as a miss.
    assert retrieval.score([["docs/handbook.md"]], questions[:1]) == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "MRR": 0.0}
