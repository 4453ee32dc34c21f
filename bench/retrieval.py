"""The retrieval evaluation: recall@1/5/10 and MRR of each variant of the pipeline, side by side,
against a plain BM25 baseline, over the SQLAlchemy documentation (the ingestion benchmark's corpus).

    .venv/bin/python bench/retrieval.py                 # the quality table (ingests the docs once, ~8 min)
    .venv/bin/python bench/retrieval.py --sweep         # + fusion weights and rerank diversity
    .venv/bin/python bench/retrieval.py --llm-rewrite   # + the local model's query rewrite
    .venv/bin/python bench/retrieval.py --latency       # + latency with 100k chunks (adds them once)
    .venv/bin/python bench/retrieval.py --questions FILE

It keeps its own database under var/bench/rag/ (CHATSITE_VAR_DIR), so it never touches the site's.
Every variant runs through ``manage.py retrieve --batch`` (the same pipeline the chat uses), with
the variant's flags. Questions are JSON lines: {"question", "history"?, "relevant_sources": [...],
"kind"?}; a source is relevant when the ingested path ends with one of ``relevant_sources``.

Metrics count documents, not chunks: recall@k is the share of a question's relevant files found
among the files of the top k chunks; MRR is 1 / the rank of the first chunk from a relevant file
(0 beyond 10).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import fetch_docs  # noqa: E402
from bench.load import pct  # noqa: E402

QUESTIONS = ROOT / "bench" / "questions" / "sqlalchemy.jsonl"
KS = (1, 5, 10)


def load_questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def relevant(source: str, wanted: list[str]) -> set[str]:
    return {w for w in wanted if source.endswith("/" + w) or source == w}


def score(ranked_sources: list[list[str]], questions: list[dict]) -> dict[str, float]:
    """recall@k and MRR over ``questions``, from each question's ranked chunk sources."""
    recalls = {k: [] for k in KS}
    rr = []
    for sources, q in zip(ranked_sources, questions, strict=True):
        wanted = q["relevant_sources"]
        for k in KS:
            found = set().union(*(relevant(s, wanted) for s in sources[:k])) if sources[:k] else set()
            recalls[k].append(len(found) / len(wanted))
        first = next((i for i, s in enumerate(sources[:10], 1) if relevant(s, wanted)), None)
        rr.append(1 / first if first else 0.0)
    return {**{f"R@{k}": statistics.mean(v) for k, v in recalls.items()}, "MRR": statistics.mean(rr)}


def run_variant(questions_file: Path, **flags) -> list[list[str]]:
    """``manage.py retrieve --batch`` with ``flags``: each question's ranked chunk sources."""
    from django.core.management import call_command

    out = io.StringIO()
    call_command("retrieve", batch=str(questions_file), k=10, stdout=out, stderr=io.StringIO(), **flags)
    return [[hit["source"] for hit in json.loads(line)] for line in out.getvalue().splitlines() if line.strip()]


# --- the BM25 baseline -------------------------------------------------------------

WORD = re.compile(r"\w+")


def bm25_baseline(questions: list[dict], rewrite: bool) -> list[list[str]]:
    """rank_bm25 (Okapi) over ~300-word chunks of each document's extracted text: no stemming,
    no stop words, no vectors. With ``rewrite``, the question gets the same "recent" rewrite."""
    from rank_bm25 import BM25Okapi

    from documents.models import Document
    from documents.search import rewrite_recent

    sources, corpus = [], []
    for source, text in Document.objects.filter(owner=None, status="ready").values_list("source", "file__text"):
        words = text.split()
        for start in range(0, len(words), 300):
            sources.append(source)
            corpus.append(WORD.findall(" ".join(words[start : start + 300]).lower()))
    bm25 = BM25Okapi(corpus)
    ranked = []
    for q in questions:
        text = rewrite_recent(q["question"], q.get("history") or []) if rewrite else q["question"]
        scores = bm25.get_scores(WORD.findall(text.lower()))
        top = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
        ranked.append([sources[i] for i in top])
    return ranked


# --- tables ------------------------------------------------------------------------


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["| variant | R@1 | R@5 | R@10 | MRR |", "|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['MRR']:.3f} |")
    return "\n".join(lines)


def by_kind(ranked: list[list[str]], questions: list[dict]) -> str:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[q.get("kind", "all")].append(i)
    rows = []
    for kind, idx in sorted(groups.items()):
        m = score([ranked[i] for i in idx], [questions[i] for i in idx])
        rows.append((f"{kind} ({len(idx)})", m))
    return table(rows)


def quality(args: argparse.Namespace, questions: list[dict]) -> None:
    from django.test import override_settings

    variants = [
        ("full text", {"mode": "fulltext", "no_rerank": True}),
        ("vector", {"mode": "vector", "no_rerank": True}),
        ("hybrid", {"mode": "hybrid", "no_rerank": True}),
        ("hybrid + rerank", {"mode": "hybrid"}),
    ]
    rows = []
    shipped = None
    bm25 = score(bm25_baseline(questions, rewrite=False), questions)
    rows.append(("BM25 baseline (rank_bm25, 300-word chunks)", bm25))
    rows.append(("BM25 baseline + recent rewrite", score(bm25_baseline(questions, rewrite=True), questions)))
    for rewrite in ("none", "recent"):
        for name, flags in variants:
            started = time.monotonic()
            ranked = run_variant(args.questions, rewrite=rewrite, **flags)
            took = (time.monotonic() - started) / len(questions) * 1000
            rows.append((f"{name}, rewrite {rewrite} ({took:.0f} ms/q)", score(ranked, questions)))
            if name == "hybrid + rerank" and rewrite == "recent":
                shipped = ranked
    if args.llm_rewrite:
        ranked = run_variant(args.questions, rewrite="llm", mode="hybrid")
        rows.append(("hybrid + rerank, rewrite llm (local model)", score(ranked, questions)))
    print("\n## Retrieval quality\n")
    print(f"{len(questions)} questions from {args.questions.relative_to(ROOT)}\n")
    print(table(rows))
    print("\n### The shipped pipeline (hybrid + rerank, recent rewrite) by kind of question\n")
    print(by_kind(shipped, questions))
    final = score(shipped, questions)
    print(
        f"\nshipped vs BM25: R@5 {final['R@5'] - bm25['R@5']:+.3f} (target >= +0.10), "
        f"MRR {final['MRR'] - bm25['MRR']:+.3f} (target >= +0.08)"
    )
    if args.sweep:
        sweeps = [
            *({"RETRIEVAL_WEIGHT_VECTOR": v, "RETRIEVAL_WEIGHT_TEXT": t} for v, t in ((1, 1), (1, 0.5), (0.5, 1))),
            *({"RETRIEVAL_TEXT_MATCH_ROWS": rows} for rows in (250, 1500, 10**9)),
            *({"RETRIEVAL_RERANK_DIVERSITY": d} for d in (0, 0.1, 0.5)),
        ]
        rows = []
        for overrides in sweeps:
            with override_settings(**overrides):
                ranked = run_variant(args.questions, mode="hybrid")
            name = ", ".join(f"{key.removeprefix('RETRIEVAL_').lower()} {value}" for key, value in overrides.items())
            rows.append((name, score(ranked, questions)))
        print("\n### Sweeps of the shipped pipeline (one setting changed at a time)\n")
        print(table(rows))


# --- latency with 100k chunks ---------------------------------------------------------

TARGET_CHUNKS = 100_000


def add_copies() -> None:
    """Other users' copies of the shared documents, until the table holds ~100k chunks: one copy
    for "bench-small" (who then sees ~15 % of the table), the rest for "bench-big" (~92 %). Each
    copied vector gets its own noise, so the HNSW graph holds no exact duplicates."""
    from django.contrib.auth.models import User
    from django.db import connection

    from documents.models import Chunk, Document

    if Chunk.objects.count() >= TARGET_CHUNKS * 0.95:
        return
    shared = list(Document.objects.filter(owner=None, status="ready"))
    per_copy = sum(d.chunk_count for d in shared)
    copies = -(-(TARGET_CHUNKS - Chunk.objects.count()) // per_copy)
    small, _ = User.objects.get_or_create(username="bench-small")
    big, _ = User.objects.get_or_create(username="bench-big")
    started = time.monotonic()
    for copy in range(copies):
        owner = small if copy == 0 else big
        for doc in shared:
            twin = Document.objects.create(
                owner=owner, title=doc.title, source=f"copy{copy}/{doc.source}", content_hash=doc.content_hash,
                live_hash=doc.live_hash, mime_type=doc.mime_type, size=doc.size, status="ready",
                chunk_count=doc.chunk_count, embedding_model=doc.embedding_model,
                embedding_dimensions=doc.embedding_dimensions,
            )  # fmt: skip
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO documents_chunk (document_id, ordinal, text, token_count, heading, char_start, "
                    "char_end, page, embedding) SELECT %s, ordinal, text, token_count, heading, char_start, "
                    "char_end, page, embedding + (SELECT array_agg(random() * 0.04 - 0.02)::vector "
                    "FROM generate_series(1, 384) WHERE c.id IS NOT NULL) "
                    "FROM documents_chunk c WHERE document_id = %s",
                    [twin.pk, doc.pk],
                )
        print(f"  copy {copy + 1}/{copies}: {Chunk.objects.count()} chunks ({time.monotonic() - started:.0f} s)")
    with connection.cursor() as cursor:
        # Vacuuming the HNSW index of 100k chunks can take longer than the site's statement limit.
        cursor.execute("SET statement_timeout = 0")
        cursor.execute("VACUUM ANALYZE documents_chunk")
        cursor.execute("VACUUM ANALYZE documents_document")


def latency(questions: list[dict]) -> None:
    from django.contrib.auth.models import User

    from documents import search
    from documents.models import Chunk

    print("\n## Latency with 100k chunks\n")
    add_copies()
    total = Chunk.objects.count()
    search.embed_query("warm up")  # the model loads once per process (~0.3 s), not per question
    users = [("shared only", 0)] + [(name, User.objects.get(username=name).pk) for name in ("bench-small", "bench-big")]
    print(f"{total} chunks in the table; each question embedded, searched (hybrid) and reranked, 3 times\n")
    print("| user sees | vector path | embed p50 / p99 | search p50 / p99 | rerank p50 | total p50 / p99 | fewest |")
    print("|---|---|---|---|---|---|---|")
    plans = {}
    for name, user_id in users:
        where = search.scope(user_id)
        embed, sql, rerank, whole, fewest = [], [], [], [], 10**9
        for _ in range(3):
            for q in questions:
                text = search.rewrite_recent(q["question"], q.get("history") or [])
                t0 = time.perf_counter()
                vector = search.embed_query(text)
                t1 = time.perf_counter()
                hits = search.retrieve(where, text, vector)
                t2 = time.perf_counter()
                search.rerank(hits)
                t3 = time.perf_counter()
                embed.append(t1 - t0), sql.append(t2 - t1), rerank.append(t3 - t2), whole.append(t3 - t0)
                fewest = min(fewest, len(hits))
        path = (
            "exact scan"
            if search.exact_scan(where.chunks, search.table_statistics().chunks)
            else "HNSW, iterative scan"
        )

        def p(values: list[float], q: float) -> str:
            return f"{pct(values, q * 100) * 1000:.1f}"

        cells = [
            f"{name}: {where.chunks} chunks ({where.chunks / total:.0%})",
            path,
            f"{p(embed, 0.5)} / {p(embed, 0.99)} ms",
            f"{p(sql, 0.5)} / {p(sql, 0.99)} ms",
            f"{p(rerank, 0.5)} ms",
            f"{p(whole, 0.5)} / {p(whole, 0.99)} ms",
            str(fewest),
        ]
        print("| " + " | ".join(cells) + " |")
        text = questions[0]["question"]
        plans[name] = search.retrieve(where, text, search.embed_query(text), explain=True)
    for name, plan in plans.items():
        # The plan's lines, without the (long) lists of document ids.
        lines = [re.sub(r"'\{[0-9,]+\}'", "'{...}'", line) for line in plan]
        print(f"\nEXPLAIN ANALYZE for {name}:\n\n" + "\n".join("    " + line for line in lines))


# --- what retrieval adds before the first chunk -----------------------------------------


def ttfc(questions: list[dict], turns: int) -> None:
    """One daphne process on this database, the mock LLM (tests/llm_server.py, echoing the question
    at once), the local embedder: time to first chunk of new conversations with documents on and
    off, alternating."""
    import subprocess
    import uuid

    from django.contrib.auth.models import User
    from websockets.asyncio.client import connect

    from bench.load import PASSWORD, Mock
    from documents import search
    from tests.servers import free_port, login, wait_for_http

    names = ["bench-ttfc", *(name for name in ("bench-big",) if User.objects.filter(username=name).exists())]
    for name in names:
        user, _ = User.objects.get_or_create(username=name)
        user.set_password(PASSWORD)
        user.save()
    print("\n## Time to first chunk with and without retrieval\n")
    with Mock() as mock:
        env = {**os.environ, "OPENAI_BASE_URL": mock.base_url, "OPENAI_API_KEY": "bench", "LLM_MODEL": "test-model"}
        # Turns follow each other quickly: the per-user message limit would refuse them.
        env.update(ALLOWED_HOSTS="127.0.0.1", CHAT_LIMIT_MESSAGES_PER_MINUTE="0")
        port = free_port()
        log = open(ROOT / "var" / "bench" / "rag" / "daphne.log", "w")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "chatsite.serve", "-b", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        try:
            wait_for_http(f"http://127.0.0.1:{port}/accounts/login/", server)

            async def measure(cookie: str) -> dict[bool, list[float]]:
                times: dict[bool, list[float]] = {False: [], True: []}
                url, origin = f"ws://127.0.0.1:{port}/ws/chat/", f"http://127.0.0.1:{port}"
                async with connect(url, additional_headers={"Cookie": cookie}, origin=origin) as ws:
                    for i in range(turns + 2):
                        for use in (False, True):
                            question = questions[i % len(questions)]["question"]
                            frame = {"type": "send", "conversation_id": None, "client_id": str(uuid.uuid4()),
                                     "content": question, "use_documents": use}  # fmt: skip
                            sent = time.perf_counter()
                            await ws.send(json.dumps(frame))
                            first = None
                            while True:
                                got = json.loads(await ws.recv())
                                if got["type"] == "chunk" and first is None:
                                    first = time.perf_counter() - sent
                                if got["type"] == "sources" and not use:
                                    raise AssertionError("sources with documents off")
                                if got["type"] == "error" or got["type"] == "done" and got["status"] != "complete":
                                    raise AssertionError(f"turn failed: {got}")
                                if got["type"] == "done":
                                    break
                            if i >= 2:  # the first turns load the embedder and warm the caches
                                times[use].append(first)
                return times

            print(f"{turns} turns each way, alternating; a new conversation each; the mock echoes at once\n")
            print("| user | chunks searched | TTFC p50 off | TTFC p50 on | added p50 | added p90 |")
            print("|---|---|---|---|---|---|")
            for name in names:
                times = asyncio.run(measure(login(port, name, PASSWORD)))
                p50 = statistics.median
                added = sorted(b - a for a, b in zip(times[False], times[True], strict=True))  # paired turns
                chunks = search.scope(User.objects.get(username=name).pk).chunks
                print(
                    f"| {name} | {chunks} | {p50(times[False]) * 1000:.0f} ms | {p50(times[True]) * 1000:.0f} ms "
                    f"| {p50(added) * 1000:.0f} ms | {added[int(0.9 * len(added))] * 1000:.0f} ms |"
                )
        finally:
            server.terminate()
            server.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--sweep", action="store_true", help="also sweep fusion weights and rerank diversity")
    parser.add_argument("--llm-rewrite", action="store_true", help="also the local model's query rewrite")
    parser.add_argument("--latency", action="store_true", help="also latency with 100k chunks")
    parser.add_argument("--ttfc", action="store_true", help="also time to first chunk with and without retrieval")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    args.questions = args.questions.resolve()

    # Its own database, never the site's (set before Django starts the embedded servers).
    os.environ.setdefault("CHATSITE_VAR_DIR", str(ROOT / "var" / "bench" / "rag"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    docs = fetch_docs()
    started = time.monotonic()
    call_command("ingest", str(docs), shared=True, stdout=io.StringIO(), stderr=io.StringIO())
    print(f"corpus: {docs.relative_to(ROOT)} (ingest/check took {time.monotonic() - started:.0f} s)")
    questions = load_questions(args.questions)
    if not args.skip_quality:
        quality(args, questions)
    if args.latency:
        latency(questions)
    if args.ttfc:
        ttfc(questions, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
