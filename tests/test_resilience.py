"""Real daphne processes on the real Redis layer: an idle socket lives on, and the control listener
survives a dropped Redis connection. The heartbeat flush is slowed to 20 s here, so a stop that
lands within seconds can only have come through the channel layer, not the database flag."""

import asyncio
import json
import time
import uuid

import pytest
import redis
from websockets.asyncio.client import connect

from tests.servers import Site, login

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slow_flush_site(tmp_path_factory, llm_server):
    env = {
        "OPENAI_BASE_URL": llm_server.base_url,
        "OPENAI_API_KEY": "test-key",
        "LLM_MODEL": "test-model",
        "LLM_PROVIDER": None,
        "CHAT_FLUSH_SECONDS": "20",
    }
    with Site(tmp_path_factory.mktemp("resilience"), env) as site:
        yield site


def socket(port: int, cookie: str):
    return connect(
        f"ws://127.0.0.1:{port}/ws/chat/", additional_headers={"Cookie": cookie}, origin=f"http://127.0.0.1:{port}"
    )


def send(conversation_id: str | None, content: str) -> str:
    return json.dumps({"type": "send", "conversation_id": conversation_id, "client_id": str(uuid.uuid4()),
                       "content": content})  # fmt: skip


async def frames_until(ws, kind: str, timeout: float = 20) -> list[dict]:
    frames = []
    while True:
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
        if frames[-1]["type"] == kind:
            return frames


def test_idle_socket_lives_30_seconds_then_completes_a_turn(slow_flush_site):
    port = slow_flush_site.ports[0]
    cookie = login(port)

    async def scenario() -> list[dict]:
        async with socket(port, cookie) as ws:
            with pytest.raises(TimeoutError):  # nothing comes, and the server does not close the socket
                await asyncio.wait_for(ws.recv(), 31)
            await ws.send(send(None, "[tokens=5]"))
            return await frames_until(ws, "done")

    frames = asyncio.run(scenario())
    assert frames[0]["type"] == "ack" and frames[-1]["status"] == "complete"
    assert "Timeout reading" not in slow_flush_site.logs()


def test_control_listener_survives_a_dropped_redis_connection(slow_flush_site):
    port_a, port_b = slow_flush_site.ports
    cookie = login(port_a)
    valkey = redis.Redis.from_url(slow_flush_site.env["REDIS_URL"])

    async def scenario() -> tuple[dict, float]:
        async with socket(port_a, cookie) as a:  # process A's control listener is up
            await a.send(send(None, "[tokens=3]"))
            await frames_until(a, "done")
        # Every subscriber connection is cut, process A's control listener's among them.
        subscribers = len(valkey.client_list(_type="pubsub"))
        assert valkey.client_kill_filter(_type="pubsub") >= 1
        # channels_redis reconnects, after redis-py's back-off (up to seconds on a busy machine), and
        # subscribes again; a fixed wait raced it, and a socket that subscribed meanwhile missed its chunks.
        deadline = time.monotonic() + 20
        while len(valkey.client_list(_type="pubsub")) < subscribers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        async with socket(port_a, cookie) as a, socket(port_b, cookie) as b:
            await a.send(send(None, "[tokens=400][delay=0.02]"))
            ack = json.loads(await a.recv())
            await frames_until(a, "chunk")
            await b.send(json.dumps({"type": "open", "conversation_id": ack["conversation_id"]}))
            await frames_until(b, "history")
            asked = time.monotonic()
            await b.send(json.dumps({"type": "stop", "message_id": ack["assistant_message_id"]}))
            done = (await frames_until(a, "done"))[-1]
            return done, time.monotonic() - asked

    done, took = asyncio.run(scenario())
    assert done["status"] == "stopped"
    assert took < 3, f"stopped after {took:.1f} s: not by the control listener (the flush runs every 20 s)"


def memory_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def test_a_200_mb_frame_is_refused_as_it_is_read_and_the_server_keeps_serving(slow_flush_site):
    """daphne caps a frame at CHAT_HARD_FRAME_BYTES (chatsite/serve.py): it refuses the frame from its header,
    so the 200 MB never sit in the server's memory."""
    port = slow_flush_site.ports[0]
    server = slow_flush_site.servers[0]
    cookie = login(port)
    huge = "x" * 200_000_000

    async def turn() -> list[dict]:
        async with socket(port, cookie) as ws:
            await ws.send(send(None, "[tokens=5]"))
            return await frames_until(ws, "done")

    async def oversized() -> int | None:
        async with socket(port, cookie) as ws:
            try:
                await ws.send(huge)
                await asyncio.wait_for(ws.recv(), 10)
            except Exception:  # noqa: BLE001 - the server drops the connection mid-send
                pass
            return ws.close_code

    asyncio.run(turn())  # the code paths of a socket and a turn are loaded before measuring
    before = memory_kib(server.pid)["VmHWM"]
    code = asyncio.run(oversized())
    peak = memory_kib(server.pid)["VmHWM"]
    assert code in (1009, 1006), code  # "message too big", or cut before the client could read it
    assert peak - before < 20 * 1024, f"server memory peaked {(peak - before) // 1024} MiB higher"
    assert asyncio.run(turn())[-1]["status"] == "complete"
