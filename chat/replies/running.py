"""The asyncio tasks of this process's running replies.

A reply is a task of the process, not of the socket that asked for it: it
keeps running when that socket closes, and is saved when it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine

# Strong references: a task nobody holds may be garbage-collected mid-run.
RUNNING: dict[int, asyncio.Task] = {}


def spawn(reply_id: int, coro: Coroutine) -> asyncio.Task:
    # A fresh context: the task must not inherit the socket's thread-sensitive
    # context, which ends when the socket closes.
    task = asyncio.create_task(coro, context=contextvars.Context())
    RUNNING[reply_id] = task
    task.add_done_callback(lambda _: RUNNING.pop(reply_id, None))
    return task
