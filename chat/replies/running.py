"""The asyncio tasks of this process's running replies, and how they end when the process stops.

A reply is a task of the process, not of the socket that asked for it: it
keeps running when that socket closes, and is saved when it ends.

``drain`` is what a stopping server does (chatsite/serve.py, on SIGTERM or
Ctrl-C): no new reply starts, the running ones get CHAT_DRAIN_SECONDS to
finish, and any still streaming then is ended ``interrupted`` with its text so
far, written by its own flow (so its sockets hear ``done`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Coroutine, Iterator

from django.conf import settings

logger = logging.getLogger(__name__)

# Strong references: a task nobody holds may be garbage-collected mid-run.
RUNNING: dict[int, asyncio.Task] = {}
# How to end each running reply as `interrupted` (ReplyStream.interrupt).
_INTERRUPTS: dict[int, Callable[[], None]] = {}
_draining = False
# Turns past `accepting()` whose reply is not spawned yet (their transaction may still be open).
_starting = 0


def spawn(reply_id: int, coro: Coroutine, interrupt: Callable[[], None]) -> asyncio.Task:
    # A fresh context: the task must not inherit the socket's thread-sensitive
    # context, which ends when the socket closes.
    task = asyncio.create_task(coro, context=contextvars.Context())
    RUNNING[reply_id] = task
    _INTERRUPTS[reply_id] = interrupt

    def forget(_: asyncio.Task) -> None:
        RUNNING.pop(reply_id, None)
        _INTERRUPTS.pop(reply_id, None)

    task.add_done_callback(forget)
    return task


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """Around a turn from its acceptance to its reply's spawn: ``drain`` waits for it too, so a turn
    accepted just before the process began stopping is not left `streaming` with nobody writing it."""
    global _starting
    _starting += 1
    try:
        yield
    finally:
        _starting -= 1


def accepting() -> bool:
    """False once the process is stopping: a new turn is refused (and sent again to another process)."""
    return not _draining


async def drain(seconds: float | None = None) -> None:
    """Stop taking replies, let the running ones finish for ``seconds`` (CHAT_DRAIN_SECONDS), then end
    those still running as `interrupted` and give them CHAT_DRAIN_FINAL_SECONDS to write it."""
    global _draining
    _draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (settings.CHAT_DRAIN_SECONDS if seconds is None else seconds)
    if RUNNING:
        logger.info("stopping: waiting up to %.0f s for %d streaming reply(ies)", deadline - loop.time(), len(RUNNING))
    # Again while any is left: a turn that passed `accepting()` just before starts its reply meanwhile.
    while (RUNNING or _starting) and loop.time() < deadline:
        if RUNNING:
            await asyncio.wait(list(RUNNING.values()), timeout=deadline - loop.time())
        else:
            await asyncio.sleep(0.05)
    if not RUNNING:
        return
    left = dict(RUNNING)
    logger.warning("stopping: %d reply(ies) still streaming are ended as interrupted", len(left))
    for reply_id in left:
        _INTERRUPTS[reply_id]()
    _, stuck = await asyncio.wait(left.values(), timeout=settings.CHAT_DRAIN_FINAL_SECONDS)
    if stuck:
        # Their rows keep the last flush and become `interrupted` when found stale (services.recover_stale).
        logger.error("stopping: %d reply(ies) did not end in time", len(stuck))
