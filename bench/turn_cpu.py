"""CPU to start one turn, against the floor's cost to start one stream, in the same run.

    .venv/bin/python bench/turn_cpu.py

- baseline: one streaming request through a shared ``AsyncOpenAI`` to the mock
  (tests/llm_server.py, a 1-token reply), read the way the load benchmark's floor reads it:
  what the floor spends to start a stream;
- the site's database part of a turn start, in one thread as its hop runs it: the login check
  (chat/access.py) and ``services.begin_turn`` for a new conversation.

The load benchmark's time-to-first-chunk target at N = 200 (2 x the floor + 100 ms) leaves the
site about twice the baseline per turn; this shows how the database part alone compares.
CPU is this thread's (``time.thread_time``): the mock and PostgreSQL run elsewhere. It uses its
own database under var/bench/turn_cpu/; every turn is rolled back (it runs inside one outer
transaction, so the turn's own transaction is a savepoint here, not BEGIN and COMMIT).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARM_UP, ROUNDS, REPEATS = 20, 200, 3


def cpu_ms(run, rounds: int) -> float:
    """Median over REPEATS of the CPU milliseconds per call of ``run(rounds)``."""
    results = []
    for _ in range(REPEATS):
        started = time.thread_time()
        run(rounds)
        results.append((time.thread_time() - started) / rounds * 1000)
    return statistics.median(results)


def request_cpu() -> float:
    import openai

    from tests.llm_server import LLMServer

    server = LLMServer(0).start()
    loop = asyncio.new_event_loop()
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)

    async def requests(n: int) -> None:
        for _ in range(n):
            stream = await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "[tokens=1] hello"}], stream=True
            )
            async for _event in stream:
                pass

    try:
        loop.run_until_complete(requests(WARM_UP))
        return cpu_ms(lambda n: loop.run_until_complete(requests(n)), ROUNDS)
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        server.shutdown()


def turn_start_cpu() -> tuple[float, float]:
    """CPU ms per login check, and per login check + begin_turn (a new conversation)."""
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import transaction

    from chat import access, services
    from tests.conftest import logged_in_session

    call_command("migrate", verbosity=0)

    class RolledBack(Exception):
        pass

    result: tuple[float, float] = (0.0, 0.0)
    try:
        with transaction.atomic():
            user = User.objects.create_user(f"bench-{uuid.uuid4().hex[:8]}")
            session = logged_in_session(user)

            def logins(n: int) -> None:
                for _ in range(n):
                    assert access.still_logged_in(session.session_key, user.pk)

            def turns(n: int) -> None:
                for _ in range(n):
                    assert access.still_logged_in(session.session_key, user.pk)
                    services.begin_turn(user, None, str(uuid.uuid4()), "hello there", None, "test-model", "bench")

            turns(WARM_UP)
            result = (cpu_ms(logins, ROUNDS), cpu_ms(turns, ROUNDS))
            raise RolledBack
    except RolledBack:
        pass
    return result


def main() -> int:
    os.environ.setdefault("CHATSITE_VAR_DIR", str(ROOT / "var" / "bench" / "turn_cpu"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    # Raised so that they never refuse (the load benchmark does the same); they are still checked.
    for limit in ("CHAT_LIMIT_CONCURRENT_REPLIES", "CHAT_LIMIT_MESSAGES_PER_MINUTE", "CHAT_LIMIT_CONVERSATIONS"):
        os.environ.setdefault(limit, "1000000")
    import django

    django.setup()
    request = request_cpu()
    login, turn = turn_start_cpu()
    print(f"CPU per call, median of {REPEATS} x {ROUNDS} (this thread only):")
    print(f"  baseline: one streaming request (AsyncOpenAI, 1 token)  {request:6.2f} ms")
    print(f"  site: login check                                     {login:6.2f} ms  ({login / request:.1f}x)")
    print(f"  site: login check + begin_turn (new conversation)     {turn:6.2f} ms  ({turn / request:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
