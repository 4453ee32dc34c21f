"""Redis or PostgreSQL going away during a reply: the reply ends with a clear error, not a silent spinner,
and the site serves again once the server is back. The tests stop and restart the embedded servers."""

import asyncio
import json
import time

import pytest
import redis

from chatsite import embedded
from tests.servers import Site, login
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
