"""Serve the site with daphne, as this site needs it: ``python -m chatsite.serve -b HOST -p PORT``.

``--document-workers N`` also runs N document workers (``manage.py worker``)
and starts again any that dies. Any other daphne option may follow. On top of
daphne:

- Django's system checks run first, and what they find is logged (say,
  documents embedded with another model than the configured one);
- the WebSocket message and frame caps come from CHAT_HARD_FRAME_BYTES, so
  daphne refuses an oversized frame (close 1009) as it reads the frame's
  header, before any of it is buffered; the consumer's own checks
  (CHAT_MAX_FRAME_BYTES and below) then never see more than that;
- a request body over the largest limit is refused with 413 as its headers
  arrive, before daphne reads it (chatsite/bodies.py);
- SIGTERM or Ctrl-C stops gracefully: the port is closed, no new turn starts,
  streaming replies get CHAT_DRAIN_SECONDS to finish and any left is ended
  `interrupted` with its text (chat/replies/running.py), then the process
  exits. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from daphne import http_protocol
from daphne.cli import CommandLineInterface
from daphne.server import Server as DaphneServer
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import reactor

APPLICATION = "chatsite.asgi:application"
# While stopping: how long the last frames of the drained replies and the sockets' closing handshakes may take.
SETTLE_SECONDS = 1.0
# autobahn lets a server close only with 1000 or 3000-4999 (not 1012, "service restart"): the page
# reconnects after any close but 4401.
CLOSE_RESTARTING = 1000
logger = logging.getLogger("chatsite.serve")


class Supervised(threading.Thread):
    """A child process that is started again whenever it dies, until ``stop``.

    After a death, a pause: none if it had run a minute, else 1 s, doubling
    while it keeps dying that fast, up to SERVE_RESTART_MAX_SECONDS.
    """

    def __init__(self, name: str, command: list[str]) -> None:
        super().__init__(name=name, daemon=True)
        self.command = command
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # stop() never misses a process being started

    def run(self) -> None:
        from django.conf import settings

        pause = 0.0
        while True:
            with self._lock:
                if self.stopping.is_set():
                    return
                started = time.monotonic()
                # A process group of its own: Ctrl-C reaches the server, which stops the child itself.
                self.process = subprocess.Popen(self.command, cwd=settings.BASE_DIR, process_group=0)
            logger.info("%s started (pid %d)", self.name, self.process.pid)
            code = self.process.wait()
            if self.stopping.is_set():
                return
            quick = time.monotonic() - started < 60
            pause = min(max(2 * pause, 1.0), settings.SERVE_RESTART_MAX_SECONDS) if quick else 0.0
            logger.warning(
                "%s (pid %d) exited with %s; starting it again in %.0f s", self.name, self.process.pid, code, pause
            )
            if self.stopping.wait(pause):
                return

    def stop(self) -> None:
        """Ask the child to stop (SIGTERM); it is not started again."""
        with self._lock:
            self.stopping.set()
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()

    def wait(self, timeout: float) -> None:
        """After ``stop``: wait up to ``timeout`` for the child to exit, then kill it."""
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop in time: killed", self.name, self.process.pid)
                self.process.kill()
                self.process.wait()
        self.join(timeout)


class Server(DaphneServer):
    """daphne's server with a graceful stop; ``children`` are stopped with it."""

    def __init__(self, *args, children: list[Supervised], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.children = children
        self.stopping = False
        self.ports: list = []  # the listening ports, closed first when stopping

    def run(self) -> None:
        # After daphne's reactor has installed its own SIGTERM/SIGINT handlers (which stop at once).
        reactor.callWhenRunning(self._handle_signals)
        super().run()

    def listen_success(self, port) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def _handle_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        if self.stopping:
            logger.warning("stopping at once")
            reactor.callFromThread(reactor.stop)
            return
        self.stopping = True
        logger.info("%s: stopping (again to stop at once)", signal.Signals(number).name)
        reactor.callFromThread(self._drain)

    def _drain(self) -> None:
        for port in self.ports:
            port.stopListening()
        for child in self.children:
            child.stop()
        asyncio.ensure_future(self._stop()).add_done_callback(lambda _: reactor.stop())

    async def _stop(self) -> None:
        from chat.replies import running

        drained = bool(running.RUNNING)
        await running.drain()
        if drained:
            # The replies' last frames cross the channel layer back to this process's sockets.
            await asyncio.sleep(SETTLE_SECONDS)
        # Each socket is closed (the page reconnects), not just dropped.
        sockets = [p for p in self.connections if isinstance(p, WebSocketProtocol)]
        for protocol in sockets:
            protocol.serverClose(code=CLOSE_RESTARTING)
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline and any(self._open(protocol) for protocol in sockets):
            await asyncio.sleep(0.05)

    def _open(self, protocol: WebSocketProtocol) -> bool:
        return protocol in self.connections and "disconnected" not in self.connections[protocol]


def report_checks() -> None:
    """Django's system checks, database ones included, logged: manage.py runs them, daphne does not."""
    from django.core import checks
    from django.db import connections

    for message in checks.run_checks(databases=["default"]):
        if not message.is_silenced():
            logger.log(logging.ERROR if message.is_serious() else logging.WARNING, "%s", message)
    connections.close_all()  # this thread serves no queries: the database threads do (chat/services.py)


def main(argv: list[str]) -> None:
    if any(arg.startswith("--proxy-headers") for arg in argv):
        # daphne would take X-Forwarded-For's leftmost entry, which the client writes itself.
        sys.exit("chatsite.serve: no --proxy-headers; set TRUSTED_PROXY_HOPS instead (README, Deploying)")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    import django

    django.setup()
    from django.conf import settings

    from chatsite.bodies import BoundedRequest

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--document-workers", type=int, default=0)
    own, daphne_argv = parser.parse_known_args(argv)

    report_checks()
    worker = [sys.executable, str(settings.BASE_DIR / "manage.py"), "worker"]
    children = [Supervised(f"document worker {n + 1}", worker) for n in range(own.document_workers)]
    for child in children:
        child.start()
    # daphne's HTTPFactory builds every request from this name: ours refuses oversized bodies unread.
    http_protocol.WebRequest = BoundedRequest
    limit = str(settings.CHAT_HARD_FRAME_BYTES)
    cli = CommandLineInterface()
    cli.server_class = functools.partial(Server, children=children)
    try:
        cli.run([*daphne_argv, "--websocket-max-message-size", limit, "--websocket-max-frame-size", limit, APPLICATION])
    finally:
        for child in children:
            child.stop()
        for child in children:
            child.wait(settings.CHAT_DRAIN_FINAL_SECONDS)


if __name__ == "__main__":
    main(sys.argv[1:])
