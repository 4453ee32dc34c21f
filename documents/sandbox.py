"""Run one function on a user's file in a child process, bounded in memory and in wall-clock time.

Parsing (documents/parsing.py) runs here, and so should anything else that reads the bytes of
an upload (OCR). A file that makes its reader allocate without end, or loop for ever, ends the
child and not the worker: the child caps its own address space with ``RLIMIT_AS`` (an allocation
beyond it fails, and Python raises MemoryError), and the parent kills it at the deadline.

Children come from multiprocessing's fork server, which imports ``PRELOAD`` once: a child is
forked in milliseconds with the parsers already loaded (a fresh interpreter would spend a few
tenths of a second importing them, for every document), and it never inherits the worker's
threads, database connections or event loop, as a plain fork of the worker would. The function
and its arguments go to the child pickled, and its result or exception comes back the same way.
As with any multiprocessing child, a script that calls ``run`` must guard its main code with
``if __name__ == "__main__":``. The child runs as the worker's user: this bounds resources, it is
not a security boundary.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

# What the fork server imports once for all its children (anything else is imported in the child).
PRELOAD = ["documents.parsing", "documents.rst", "pypdf", "docx", "lxml.etree", "bs4", "markdown_it"]

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


class Bounded(Exception):
    """The child did not finish within its bounds."""


class TimedOut(Bounded):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"took longer than {seconds:g} s")
        self.seconds = seconds


class OutOfMemory(Bounded):
    def __init__(self, memory_mb: int) -> None:
        super().__init__(f"needed more than {memory_mb} MB of memory")
        self.memory_mb = memory_mb


class Crashed(Bounded):
    """The child died without an answer (a crash in a C library, or a signal from outside)."""


@dataclass(frozen=True)
class Outcome:
    """What the function returned (or raised) in the child, and what that cost."""

    value: Any
    error: BaseException | None
    seconds: float  # wall clock, from forking the child to its answer
    peak_mb: float  # the child's peak resident memory (the fork server's shared pages included)

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def run(function: Callable[..., Any], *args: Any, memory_mb: int, seconds: float) -> Outcome:
    """``function(*args)`` in a child with at most ``memory_mb`` of address space, for at most ``seconds``.

    ``function`` must be importable by name (a module-level function). Raises ``TimedOut``,
    ``OutOfMemory`` or ``Crashed``; an exception raised by ``function`` is in the outcome.
    """
    receiver, sender = _context.Pipe(duplex=False)
    child = _context.Process(target=_child, args=(sender, memory_mb, seconds, function, args), daemon=True)
    started = time.monotonic()
    child.start()  # returns once the child is forked (the first call also starts the fork server)
    sender.close()
    try:
        answer = _answer(receiver, child, time.monotonic() + seconds)
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    if answer is None or (answer == "gone" and child.exitcode == -signal.SIGXCPU):
        raise TimedOut(seconds)  # the deadline, or the CPU limit above it
    if answer == "gone":
        code = child.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
        raise Crashed(f"stopped unexpectedly ({how})")
    kind, payload, peak_kb = answer
    if kind == "memory":
        raise OutOfMemory(memory_mb)
    return Outcome(
        value=payload if kind == "value" else None,
        error=payload if kind == "error" else None,
        seconds=time.monotonic() - started,
        peak_mb=peak_kb / 1024,
    )


def _answer(receiver: Connection, child: Any, deadline: float) -> tuple | str | None:
    """The child's message; "gone" if it died without one; None at the deadline."""
    if not wait([receiver, child.sentinel], timeout=max(0.0, deadline - time.monotonic())):
        return None
    if receiver.poll():  # it may have answered and exited both before we looked
        try:
            return receiver.recv()
        except EOFError:
            pass
    return "gone"


def _child(sender: Connection, memory_mb: int, seconds: float, function: Callable[..., Any], args: tuple) -> None:
    # Its own process group: a Ctrl-C in the terminal, or a signal to the worker's group, is for the
    # worker, which then ends the child itself (a document is not failed because the worker stopped).
    os.setpgid(0, 0)
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # If the worker dies, nobody kills the child at its deadline: its CPU time is bounded too, well
    # above the deadline (the deadline ends any child whose worker is alive first).
    cpu = math.ceil(2 * seconds) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        answer: tuple = ("value", function(*args))
    except MemoryError:
        answer = ("memory", None)
    except Exception as exc:  # noqa: BLE001 - any error goes back to the caller
        answer = ("error", exc)
    try:
        sender.send((*answer, _peak_kb()))
    except MemoryError:
        sender.send(("memory", None, _peak_kb()))
    except Exception as exc:  # noqa: BLE001 - an answer that cannot be pickled
        sender.send(("error", RuntimeError(f"{exc.__class__.__name__}: {exc}"), _peak_kb()))
    sender.close()


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
