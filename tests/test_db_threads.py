"""Database calls run on their own threads: work queued on the event loop's default pool
(host-name lookups for new connections to the model) never waits behind them, nor they behind it."""

import asyncio
import threading

import pytest

from chat.services import db

pytestmark = pytest.mark.django_db(transaction=True)


async def test_database_calls_do_not_wait_for_the_loops_default_pool():
    loop = asyncio.get_running_loop()
    release = threading.Event()
    # Every thread of the default pool busy, and more work queued behind them.
    blocked = [loop.run_in_executor(None, release.wait, 10) for _ in range(64)]
    try:
        name = await asyncio.wait_for(db(lambda: threading.current_thread().name)(), 5)
        assert name.startswith("db")
    finally:
        release.set()
        await asyncio.gather(*blocked)


async def test_the_loops_default_pool_does_not_wait_for_database_calls():
    loop = asyncio.get_running_loop()
    release = threading.Event()
    blocked = [db(release.wait)(10) for _ in range(64)]
    waiting = asyncio.gather(*blocked)
    try:
        # What asyncio runs there: a host-name lookup, as for a new connection to the model's endpoint.
        await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 80), 5)
    finally:
        release.set()
        await waiting
