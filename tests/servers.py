"""Real server processes, for the end-to-end and browser tests and the benchmarks."""

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from chatsite import embedded

ROOT = Path(__file__).resolve().parent.parent
USERNAME = "erin"
PASSWORD = "e2e-pass-4821"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Site:
    """Daphne processes on their own embedded PostgreSQL + Valkey, handed to them as DATABASE_URL / REDIS_URL.

    ``env`` adds to (and ``None`` values remove from) the processes' environment; ``args`` go to
    each ``python -m chatsite.serve``. Use as a
    context manager: migrates, creates the user USERNAME, starts the processes, and stops
    everything on exit. ``ports`` and ``servers`` (the Popen objects) are in the same order.
    """

    def __init__(self, var: Path, env: dict[str, str | None], processes: int = 2, args: tuple[str, ...] = ()) -> None:
        self.var = var
        self.processes = processes
        self.args = args  # more options for each `python -m chatsite.serve`
        db = embedded.postgres(var)
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://postgres@{urllib.parse.quote(db['HOST'], safe='')}/postgres",
            "REDIS_URL": embedded.valkey(var),
            "CHATSITE_VAR_DIR": str(var),
            "ALLOWED_HOSTS": "127.0.0.1",
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        }
        for key, value in env.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.ports: list[int] = []
        self.servers: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []

    def manage(self, *args: str) -> None:
        subprocess.run([sys.executable, "manage.py", *args], env=self.env, cwd=ROOT, check=True, capture_output=True)

    def __enter__(self) -> "Site":
        try:
            self.manage("migrate", "--noinput")
            user = f"User.objects.create_user('{USERNAME}', password='{PASSWORD}')"
            self.manage("shell", "-c", f"from django.contrib.auth.models import User; {user}")
            for _ in range(self.processes):
                port = free_port()
                self.ports.append(port)
                self.servers.append(self._serve(port))
            for port, server in zip(self.ports, self.servers, strict=True):
                wait_for_http(f"http://127.0.0.1:{port}/accounts/login/", server)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers + self.workers:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        embedded.stop_valkey(self.var)
        embedded.stop_postgres(self.var)

    def _serve(self, port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "chatsite.serve", *self.args, "-b", "127.0.0.1", "-p", str(port)],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.var / f"daphne-{port}.log", "a"),
        )

    def restart(self, index: int) -> None:
        """Start process ``index`` again on its port (after it was killed); returns once it serves."""
        self.servers[index] = self._serve(self.ports[index])
        wait_for_http(f"http://127.0.0.1:{self.ports[index]}/accounts/login/", self.servers[index])

    def start_worker(self, **env: str) -> subprocess.Popen:
        """A document worker (``manage.py worker``) on this site's database and Redis; stopped on exit."""
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "worker"],
            env={**self.env, **env},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.var / f"worker-{len(self.workers)}.log", "a"),
        )
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Stop every worker started so far: the site is shared by tests, and a worker left running
        would take the next test's jobs and send its progress frames to that test's sockets."""
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def forget_documents(self) -> None:
        """Delete every document, with its chunks and file, in the site's database (the foreign keys
        cascade in Django, not in the database: children first)."""
        url = self.env["DATABASE_URL"].replace("postgres://", "postgresql://", 1)
        with psycopg.connect(url) as connection:  # one transaction
            for table in ("documents_chunk", "documents_documentfile", "documents_document"):
                connection.execute(f"DELETE FROM {table}")  # noqa: S608 - table names, no input

    @contextmanager
    def paused(self, server: str) -> Iterator[None]:
        """The site's embedded ``"postgres"`` (its postmaster and every backend) or ``"valkey"`` frozen with
        SIGSTOP while the block runs, then woken with SIGCONT: connections stay open and nothing answers,
        as with a server that hangs or a network path that drops every packet."""
        stopped: list[int] = []
        try:
            if server == "postgres":
                postmaster = int((self.var / "pgdata" / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGSTOP)  # first: it forks no backend once the list below is read
                stopped.append(postmaster)
                targets = children(postmaster)
            else:
                targets = [int((self.var / "valkey.pid").read_text().strip())]
            for pid in targets:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)

    def logs(self) -> str:
        logs = sorted(self.var.glob("daphne-*.log")) + sorted(self.var.glob("worker-*.log"))
        return "\n".join(path.read_text()[-4000:] for path in logs)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name, in parentheses, may hold spaces: the fields after it are fixed.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def login(port: int, username: str = USERNAME, password: str = PASSWORD) -> str:
    """Log in through the HTML form, as a browser does; return the Cookie header."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"http://127.0.0.1:{port}/accounts/login/").read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token}).encode()
    opener.open(f"http://127.0.0.1:{port}/accounts/login/", form)
    if "sessionid" not in {c.name for c in jar}:
        raise RuntimeError("login failed: no sessionid cookie")
    return "; ".join(f"{c.name}={c.value}" for c in jar)
