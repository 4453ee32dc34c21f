"""Redis or PostgreSQL going away during a reply: the reply ends with a clear error, not a silent spinner,
and the site serves again once the server is back. The tests stop and restart the embedded servers, or freeze
them (SIGSTOP) to see every wait end within its bound."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import psycopg
import pytest
import redis

from chatsite import embedded
from tests.servers import ROOT, Site, login
from tests.test_resilience import frames_until, send, socket

pytestmark = pytest.mark.e2e

EXPECTED = "".join(f"t{i} " for i in range(300))


@pytest.fixture(scope="module")
def outage_site(tmp_path_factory, llm_server):
    env = {"OPENAI_BASE_URL": llm_server.base_url, "OPENAI_API_KEY": "test-key", "LLM_MODEL": "test-model",
           "LLM_PROVIDER": None}  # fmt: skip
    with Site(tmp_path_factory.mktemp("outage"), env, processes=1) as site:
        yield site


async def back(redis_url: str, conversation_id: str) -> None:
    """Wait until the process has subscribed to the conversation again: what is published before that is lost
    (pub/sub keeps nothing), and the page re-syncs such a reply after 20 s of silence."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while not client.pubsub_numsub(f"asgi__group__chat.conversation.{conversation_id}")[0][1]:
        assert time.monotonic() < deadline, "the process did not subscribe again"
        await asyncio.sleep(0.1)


async def turn_when_back(ws, conversation_id: str, deadline: float) -> list[dict]:
    """A new message in the conversation, retried as a user would until the site answers again."""
    while True:
        await ws.send(send(conversation_id, "[tokens=3]"))
        first = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if first["type"] == "ack":
            frames = [first]
            # (A `done` for the reply the outage cut may come first, when this send is what ends it.)
            while not (frames[-1]["type"] == "done" and frames[-1]["message_id"] == first["assistant_message_id"]):
                frames += await frames_until(ws, "done")
            return frames
        assert time.monotonic() < deadline, f"still refused: {first}"
        await asyncio.sleep(0.5)


def test_redis_going_away_mid_reply_ends_it_as_delivery_failed_and_the_site_recovers(outage_site):
    port, var = outage_site.ports[0], outage_site.var
    cookie = login(port)

    async def scenario() -> tuple[dict, dict, list[dict]]:
        async with socket(port, cookie) as ws:
            await ws.send(send(None, "[tokens=300][delay=0.02]"))
            ack = json.loads(await ws.recv())
            await frames_until(ws, "chunk")
            embedded.stop_valkey(var)
            await asyncio.sleep(4)  # publishing fails, is retried for ~1.3 s, and the reply is ended
            await back(embedded.valkey(var), ack["conversation_id"])
            # The page re-syncs a silent reply with `open` (answered from the database).
            await ws.send(json.dumps({"type": "open", "conversation_id": ack["conversation_id"]}))
            history = (await frames_until(ws, "history"))[-1]
            cut = next(m for m in history["messages"] if m["id"] == ack["assistant_message_id"])
            after = await turn_when_back(ws, ack["conversation_id"], time.monotonic() + 10)
            return ack, cut, after

    ack, cut, after = asyncio.run(scenario())
    assert cut["status"] == "error" and cut["error"]["code"] == "delivery_failed"
    assert cut["content"] and EXPECTED.startswith(cut["content"]) and cut["content"] != EXPECTED
    assert after[-1]["status"] == "complete"


def test_postgresql_going_away_mid_reply_ends_it_with_save_failed_and_the_site_recovers(outage_site):
    port, var = outage_site.ports[0], outage_site.var
    cookie = login(port)

    async def scenario() -> tuple[dict, list[dict], dict, list[dict]]:
        async with socket(port, cookie) as ws:
            await ws.send(send(None, "[tokens=300][delay=0.02]"))
            ack = json.loads(await ws.recv())
            await frames_until(ws, "chunk")
            await asyncio.sleep(1.5)  # a flush or two lands
            embedded.stop_postgres(var)
            streamed = await frames_until(ws, "done", timeout=30)  # the text still streams over Redis
            embedded.postgres(var)
            after = await turn_when_back(ws, ack["conversation_id"], time.monotonic() + 15)
            await ws.send(json.dumps({"type": "open", "conversation_id": ack["conversation_id"]}))
            history = (await frames_until(ws, "history"))[-1]
            cut = next(m for m in history["messages"] if m["id"] == ack["assistant_message_id"])
            return ack, streamed, cut, after

    ack, streamed, cut, after = asyncio.run(scenario())
    done = streamed[-1]
    assert done["status"] == "error" and done["error"]["code"] == "save_failed"
    # Saved: what the last flush before the outage held, and final (not `streaming`) once the site is back.
    assert cut["status"] == "interrupted" and cut["content"] and EXPECTED.startswith(cut["content"])
    assert after[-1]["status"] == "complete"


# --- stalled servers: frozen with SIGSTOP, so connections stay open and nothing answers ----------------------

# Short bounds, so that each stall costs seconds (the defaults are in chatsite/settings.py). Connecting may
# take longer than a frame waits (as by default): a frame whose thread has no connection yet is cut at DB_WAIT too.
DB_WAIT, REDIS_TIMEOUT, CONNECT_TIMEOUT = 3, 2, 5
# How late past its bound an answer may come on a loaded machine.
SLACK = 3


@pytest.fixture(scope="module")
def stall_site(tmp_path_factory, llm_server):
    env = {"OPENAI_BASE_URL": llm_server.base_url, "OPENAI_API_KEY": "test-key", "LLM_MODEL": "test-model",
           "LLM_PROVIDER": None, "CHAT_DB_WAIT_SECONDS": str(DB_WAIT),
           "DATABASE_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT), "DATABASE_STATEMENT_TIMEOUT": "2",
           "DATABASE_LOCK_TIMEOUT": "1", "REDIS_SOCKET_TIMEOUT": str(REDIS_TIMEOUT),
           "LIMITS_REDIS_TIMEOUT": str(REDIS_TIMEOUT)}  # fmt: skip
    with Site(tmp_path_factory.mktemp("stall"), env, processes=1) as site:
        yield site


def page_status(port: int, cookie: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Cookie": cookie})
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as error:
        return error.code


async def timed(ws, frame: dict) -> tuple[dict, float]:
    """The first frame that answers ``frame``, and how long it took."""
    started = time.monotonic()
    await ws.send(json.dumps(frame))
    return json.loads(await asyncio.wait_for(ws.recv(), 30)), time.monotonic() - started


def sent(site: Site, client_id: str) -> int:
    """Messages saved with ``client_id``, read in the site's own database."""
    url = site.env["DATABASE_URL"].replace("postgres://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute("SELECT count(*) FROM chat_message WHERE client_id = %s", [client_id]).fetchone()[0]


def test_a_stalled_postgresql_is_an_error_within_the_bound_and_the_site_serves_after(stall_site):
    port = stall_site.ports[0]
    cookie = login(port)
    stalled_send = {"type": "send", "conversation_id": None, "client_id": str(uuid.uuid4()), "content": "stalled?"}

    async def scenario():
        async with socket(port, cookie) as ws:
            await ws.send(send(None, "[tokens=3]"))  # the process's connections and listeners are up
            conversation_id = (await frames_until(ws, "done"))[0]["conversation_id"]
            with stall_site.paused("postgres"):
                refused = await timed(ws, stalled_send)
                reopened = await timed(ws, {"type": "open", "conversation_id": conversation_id})
                started = time.monotonic()
                page = await asyncio.to_thread(page_status, port, cookie), time.monotonic() - started
            after = await turn_when_back(ws, conversation_id, time.monotonic() + 30)
            return refused, reopened, page, after, await asyncio.to_thread(page_status, port, cookie)

    (refused, send_took), (reopened, open_took), (status, page_took), after, page_after = asyncio.run(scenario())
    # The send and another frame: an error each, once the wait for the database ran out, not a hang.
    assert refused == {**refused, "type": "error", "code": "internal_error", "client_id": stalled_send["client_id"]}
    assert DB_WAIT * 0.9 < send_took < DB_WAIT + SLACK
    assert reopened["type"] == "error" and reopened["code"] == "internal_error"
    assert open_took < DB_WAIT + SLACK
    assert (
        "DatabaseTimeout: checked: no answer from the database" in (stall_site.var / f"daphne-{port}.log").read_text()
    )
    # A page: its request opens a connection of its own (Django runs each request on a thread of its own),
    # which gives up after DATABASE_CONNECT_TIMEOUT: the page is an error.
    assert status == 500 and page_took < CONNECT_TIMEOUT + SLACK
    # Served again, and the send the user was told had failed was not saved when the database woke up.
    assert after[-1]["status"] == "complete" and page_after == 200
    assert sent(stall_site, stalled_send["client_id"]) == 0


def test_a_stalled_redis_is_an_error_within_the_bound_with_no_transaction_open_and_the_site_serves_after(stall_site):
    port = stall_site.ports[0]
    cookie = login(port)
    url = stall_site.env["DATABASE_URL"].replace("postgres://", "postgresql://", 1)

    async def watch_transactions(stop: asyncio.Event) -> int:
        """The most backends seen at once inside a transaction with nothing running (waiting on something else)."""
        most = 0
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
            while not stop.is_set():
                cursor = await connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' "
                    "AND pid <> pg_backend_pid()"
                )
                most = max(most, (await cursor.fetchone())[0])
                await asyncio.sleep(0.02)
        return most

    async def scenario():
        async with socket(port, cookie) as ws:
            await ws.send(send(None, "[tokens=3]"))
            conversation_id = (await frames_until(ws, "done"))[0]["conversation_id"]
            with stall_site.paused("valkey"):
                stop = asyncio.Event()
                watcher = asyncio.create_task(watch_transactions(stop))
                frame = json.loads(send(conversation_id, "stalled?"))
                refused = await timed(ws, frame)
                stop.set()
                in_transaction = await watcher
                page = await asyncio.to_thread(page_status, port, cookie)  # needs only PostgreSQL
            await back(stall_site.env["REDIS_URL"], conversation_id)
            after = await turn_when_back(ws, conversation_id, time.monotonic() + 30)
            return frame, refused, in_transaction, page, after

    frame, (refused, took), in_transaction, page, after = asyncio.run(scenario())
    assert refused == {**refused, "type": "error", "code": "internal_error", "client_id": frame["client_id"]}
    assert REDIS_TIMEOUT * 0.9 < took < REDIS_TIMEOUT + SLACK
    # The send waited for Redis before its transaction: no backend sat in one meanwhile, holding its locks.
    assert in_transaction == 0
    assert sent(stall_site, frame["client_id"]) == 0
    assert page == 200
    assert after[-1]["status"] == "complete"


LIMITS_SCRIPT = """
from django.db import connection
with connection.cursor() as cursor:
    for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"):
        cursor.execute("SHOW " + name)
        print(name, cursor.fetchone()[0])
    print("connect_timeout", connection.connection.info.get_parameters().get("connect_timeout"))
    try:
        cursor.execute("SELECT pg_sleep(1)")
        print("slept")
    except Exception as error:
        print("refused", type(error.__cause__).__name__)
"""


def test_every_connection_starts_with_the_time_limits_and_migrate_runs_without_the_statement_one(tmp_path):
    """A statement limit of 10 ms: `migrate` (an extension, tables, GIN and HNSW indexes) still runs whole,
    and on any other connection a longer statement is cancelled by the server."""
    db = embedded.postgres(tmp_path)
    try:
        env = {**os.environ, "DATABASE_URL": f"postgres://postgres@{urllib.parse.quote(db['HOST'], safe='')}/postgres",
               "REDIS_URL": "redis://127.0.0.1:1/0", "CHATSITE_VAR_DIR": str(tmp_path),
               "DJANGO_SETTINGS_MODULE": "chatsite.settings", "DATABASE_STATEMENT_TIMEOUT": "0.01"}  # fmt: skip
        migrate = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], env=env, cwd=ROOT,
                                 capture_output=True, text=True)  # fmt: skip
        assert migrate.returncode == 0, migrate.stderr[-2000:]
        shell = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c", LIMITS_SCRIPT], env=env,
                               cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        embedded.stop_postgres(tmp_path)
    assert shell.stdout.split("\n")[:5] == [
        "statement_timeout 10ms",
        "lock_timeout 5s",
        "idle_in_transaction_session_timeout 30s",
        "connect_timeout 5",
        "refused QueryCanceled",
    ]
