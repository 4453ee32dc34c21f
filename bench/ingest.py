"""The ingestion benchmark: the SQLAlchemy documentation through the whole pipeline, against the embedder alone.

    .venv/bin/python bench/ingest.py                 # everything (about 10 minutes on 2 cores)
    .venv/bin/python bench/ingest.py --limit 20      # the first 20 files only (a quick look)

On its own embedded PostgreSQL and Valkey (tests/servers.py), it measures, in one run:

1. the embedder alone: chunks/s embedding a sample of the corpus's own chunks, in batches, with
   the same threads as the pipeline (the baseline);
2. ``manage.py ingest --shared DOCS``: files/s, chunks/s, time by step, peak RSS; the embedding
   step's chunks/s against the baseline (target: >= 0.8x);
3. the same command again on the unchanged folder (target: seconds);
4. chat while a worker ingests: one daphne process and one ``manage.py worker`` (the defaults
   of ``make run``), clients streaming 200-token replies from the mock, first with the worker
   idle, then while it ingests; p50/p99/max gap between chunks of a stream in each phase.

The docs are ``doc/build/`` of the sqlalchemy 2.1.9 sdist, fetched once into var/bench/ with
``pip download --no-binary :all: --no-deps sqlalchemy==2.1.9``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import Mock, pct, run_sockets  # noqa: E402
from tests.servers import Site, login  # noqa: E402

SDIST = "sqlalchemy==2.1.9"
DOCS = ROOT / "var" / "bench" / "sqlalchemy-2.1.9" / "doc" / "build"


def fetch_docs() -> Path:
    if DOCS.is_dir():
        return DOCS
    target = ROOT / "var" / "bench"
    target.mkdir(parents=True, exist_ok=True)
    print(f"fetching {SDIST} (sdist) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST, "-d", str(target)],
        check=True,
        capture_output=True,
    )
    (archive,) = target.glob("sqlalchemy-2.1.9.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return DOCS


def pick_files(docs: Path, limit: int | None, into: Path) -> Path:
    """The corpus (or its first ``limit`` supported files, copied) as one folder."""
    if not limit:
        return docs
    from documents.parsing import mime_type_for

    files = sorted(p for p in docs.rglob("*") if p.is_file() and mime_type_for(p.name))[:limit]
    for path in files:
        copy = into / path.relative_to(docs)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    return into


def embedder_alone(folder: Path, threads: int, sample: int) -> tuple[float, int]:
    """Chunks/s of the embedder alone on ``sample`` chunks of the corpus (parsed and split first, untimed)."""
    from documents.embedding import LocalEmbedder
    from documents.parsing import Unreadable, mime_type_for, parse
    from documents.splitting import split

    pieces = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and mime_type_for(p.name)):
        try:
            pieces.extend(split(parse(path.read_bytes(), path.name).sections))
        except Unreadable:
            continue
    random.Random(1).shuffle(pieces)
    texts = [p.embedded_text() for p in pieces[:sample]]
    from django.conf import settings

    embedder = LocalEmbedder(threads, settings.EMBEDDING_BATCH)
    embedder.embed(texts[:8])  # warm up
    started = time.perf_counter()
    embedder.embed(texts)
    return len(texts) / (time.perf_counter() - started), len(pieces)


def run_ingest(site: Site, folder: Path, threads: int) -> dict:
    """``manage.py ingest --shared`` as a child process: its summary, wall time and peak RSS."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "manage.py", "ingest", "--shared", str(folder), "--threads", str(threads)],
        cwd=ROOT,
        env={**site.env, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    out = done.stdout
    files = int(re.search(r"(\d+) files:", out).group(1))
    chunks = int(re.search(r"\((\d+) chunks\)", out).group(1))
    failed = int(re.search(r"(\d+) failed", out).group(1))
    steps = dict((name, float(s)) for name, s in re.findall(r"(\w+) ([\d.]+) s", out.split("time by step:")[-1]))
    return {"files": files, "chunks": chunks, "failed": failed, "wall": wall, "peak": peak, "steps": steps,
            "out": out.strip(), "errors": done.stderr.count("failed: ")}  # fmt: skip


async def chat_gaps(site: Site, cookie: str, content: str, seconds: float, clients: int) -> dict:
    """Streams started one after another by ``clients`` sockets for ``seconds``: gaps between chunks."""
    gaps: list[float] = []
    replies = complete = 0
    deadline = time.monotonic() + seconds
    port = site.ports[0]
    while time.monotonic() < deadline:
        streams = await run_sockets(
            f"ws://127.0.0.1:{port}/ws/chat/", f"http://127.0.0.1:{port}", [cookie], clients, content, 60
        )
        for s in streams:
            replies += 1
            complete += s.status == "complete" and not s.error
            gaps.extend(b - a for a, b in zip(s.chunk_times, s.chunk_times[1:], strict=False))
    return {"replies": replies, "complete": complete, "p50": pct(gaps, 50), "p99": pct(gaps, 99),
            "max": max(gaps) if gaps else None}  # fmt: skip


def queue_folder(site: Site, folder: Path, owner: str) -> int:
    """Register every file of ``folder`` as ``owner``'s queued upload, as the upload view does."""
    code = (
        "from pathlib import Path\n"
        "from django.contrib.auth.models import User\n"
        "from django.db import transaction\n"
        "from documents import services, tasks\n"
        "from documents.parsing import mime_type_for\n"
        f"owner = User.objects.get(username={owner!r})\n"
        f"for p in sorted(Path({str(folder)!r}).rglob('*')):\n"
        "    if p.is_file() and mime_type_for(p.name):\n"
        "        with transaction.atomic():\n"
        "            r = services.register(owner, str(p), p.read_bytes(), force=True)\n"
        "            r.unchanged or tasks.enqueue(r.document)\n"
    )
    site.manage("shell", "-c", code)
    from documents.parsing import mime_type_for

    return sum(1 for p in folder.rglob("*") if p.is_file() and mime_type_for(p.name))


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="ingest only the first N files")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="embedding threads (ingest)")
    parser.add_argument("--sample", type=int, default=640, help="chunks embedded for the embedder-alone baseline")
    parser.add_argument("--chat-seconds", type=float, default=40, help="length of each chat phase")
    parser.add_argument("--clients", type=int, default=5, help="sockets streaming at once in the chat phases")
    args = parser.parse_args()

    docs = fetch_docs()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        folder = pick_files(docs, args.limit, Path(tmp) / "docs")
        with Mock() as mock:
            env = {"OPENAI_BASE_URL": mock.base_url, "OPENAI_API_KEY": "bench", "LLM_MODEL": "mock",
                   "LLM_PROVIDER": None, "CHAT_LIMIT_MESSAGES_PER_MINUTE": "0",
                   "CHAT_LIMIT_CONCURRENT_REPLIES": "0"}  # fmt: skip
            (Path(tmp) / "stack").mkdir()
            with Site(Path(tmp) / "stack", env, processes=1) as site:
                os.environ.update({k: v for k, v in site.env.items() if k in ("DATABASE_URL", "REDIS_URL")})
                os.environ["CHATSITE_VAR_DIR"] = site.env["CHATSITE_VAR_DIR"]
                os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
                import django

                django.setup()

                print(f"corpus: {folder} ({sum(1 for p in folder.rglob('*') if p.is_file())} files)", flush=True)
                alone, total_chunks = embedder_alone(folder, args.threads, args.sample)
                print(
                    f"embedder alone: {alone:.1f} chunks/s ({args.threads} threads, {args.sample} chunks)", flush=True
                )

                first = run_ingest(site, folder, args.threads)
                print(first["out"], flush=True)
                embed_rate = first["chunks"] / first["steps"]["embed"]
                again = run_ingest(site, folder, args.threads)
                print(again["out"].splitlines()[0], flush=True)

                # Chat while a worker ingests (the worker with the site's defaults: EMBEDDING_THREADS=1).
                cookie = login(site.ports[0])
                content = "[tokens=200][first_delay=0.05][delay=0.01]"
                quiet = asyncio.run(chat_gaps(site, cookie, content, args.chat_seconds, args.clients))
                queued = queue_folder(site, folder, "erin")
                worker = site.start_worker()
                time.sleep(3)  # the worker starts and takes its first document
                busy = asyncio.run(chat_gaps(site, cookie, content, args.chat_seconds, args.clients))
                still_running = worker.poll() is None
    print()
    print("| measure | value |\n|---|---|")
    print(f"| files | {first['files']} ({first['failed']} failed, e.g. index pages with no text) |")
    print(f"| chunks | {first['chunks']} |")
    print(f"| ingest wall time | {first['wall']:.1f} s |")
    print(f"| files/s | {first['files'] / first['wall']:.2f} |")
    print(f"| chunks/s (whole pipeline) | {first['chunks'] / first['wall']:.1f} |")
    print(f"| time by step | {', '.join(f'{k} {v:.1f} s' for k, v in first['steps'].items())} |")
    print(f"| embedder alone (baseline) | {alone:.1f} chunks/s |")
    print(
        f"| embedding step in the pipeline | {embed_rate:.1f} chunks/s = **{embed_rate / alone:.2f}×** the baseline |"
    )
    print(f"| peak RSS of `manage.py ingest` | {first['peak'] / 2**20:.0f} MiB |")
    print(f"| re-ingesting the unchanged folder | {again['wall']:.1f} s (process start included) |")
    print()
    print(f"chat while a worker ingests {queued} queued files ({args.clients} sockets streaming 200-token replies):")
    print("| phase | replies complete | gap p50 | gap p99 | gap max |\n|---|---|---|---|---|")
    for name, phase in (("worker idle", quiet), ("worker ingesting", busy)):
        print(f"| {name} | {phase['complete']}/{phase['replies']} | {ms(phase['p50'])} | {ms(phase['p99'])} | "
              f"{ms(phase['max'])} |")  # fmt: skip
    print(f"(worker still running at the end: {still_running}; chunks in the corpus: {total_chunks})")
    ok = embed_rate / alone >= 0.8 and busy["complete"] == busy["replies"]
    print("embedding step >= 0.8x the embedder alone:", "met" if embed_rate / alone >= 0.8 else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
