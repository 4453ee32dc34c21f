"""End to end: two real daphne processes, the real Redis channel layer, a real WebSocket client.

The stack here is a second embedded PostgreSQL and Valkey started by the
test and handed to the servers as DATABASE_URL / REDIS_URL, so the
"external servers" configuration is exercised too.
"""

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect

from tests.servers import login

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "e2e-pass-4821"


async def frames_until(ws, kind: str, timeout: float = 20) -> list[dict]:
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        frames.append(frame)
        if frame["type"] == kind:
            return frames


def test_two_processes_share_one_conversation(site):
    port_a, port_b = site.ports
    cookie = login(port_a)

    async def scenario() -> dict:
        def ws(port: int):
            return connect(
                f"ws://127.0.0.1:{port}/ws/chat/",
                additional_headers={"Cookie": cookie},
                origin=f"http://127.0.0.1:{port}",
            )

        # No session: closed with 4401, which the page turns into the login page.
        async with connect(f"ws://127.0.0.1:{port_a}/ws/chat/", origin=f"http://127.0.0.1:{port_a}") as anonymous:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await anonymous.recv()
        assert closed.value.rcvd.code == 4401

        def send(conversation_id: str | None, content: str) -> str:
            frame = {"type": "send", "conversation_id": conversation_id, "client_id": str(uuid.uuid4())}
            return json.dumps({**frame, "content": content})

        async with ws(port_a) as a, ws(port_b) as b:
            started = time.monotonic()
            await a.send(send(None, "[tokens=40][delay=0.03]"))
            ack = json.loads(await a.recv())
            assert ack["type"] == "ack"
            first = json.loads(await a.recv())
            first_chunk_s = time.monotonic() - started
            assert first["type"] == "chunk"

            # Process B joins mid-stream: text so far from process A, then the rest, no gap, no repeat.
            await b.send(json.dumps({"type": "open", "conversation_id": ack["conversation_id"]}))
            b_frames = await frames_until(b, "done")
            a_frames = [first, *await frames_until(a, "done")]
            expected = "".join(f"t{i} " for i in range(40))
            history = b_frames[0]
            assert history["type"] == "history"
            so_far = history["messages"][-1]["content"]
            b_chunks = [f for f in b_frames if f["type"] == "chunk"]
            assert history["messages"][-1]["status"] == "streaming" and b_chunks
            assert b_chunks[0]["offset"] == len(so_far)
            assert so_far + "".join(f["delta"] for f in b_chunks) == expected
            assert "".join(f["delta"] for f in a_frames if f["type"] == "chunk") == expected
            assert a_frames[-1] == b_frames[-1] and a_frames[-1]["status"] == "complete"

            # Stop from process B a reply that process A is generating.
            await a.send(send(ack["conversation_id"], "[tokens=300][delay=0.03]"))
            second = json.loads(await a.recv())
            message = await frames_until(b, "message")
            reply_id = second["assistant_message_id"]
            await frames_until(b, "chunk")
            await b.send(json.dumps({"type": "stop", "message_id": reply_id}))
            a_done = (await frames_until(a, "done"))[-1]
            b_done = (await frames_until(b, "done"))[-1]
            assert a_done == b_done and a_done["status"] == "stopped", a_done
            assert message[-1]["message"]["role"] in {"user", "assistant"}

        # A fresh socket on process B sees the conversation as saved.
        async with ws(port_b) as c:
            await c.send(json.dumps({"type": "open", "conversation_id": ack["conversation_id"]}))
            saved = json.loads(await c.recv())["messages"]
        assert [(m["role"], m["status"]) for m in saved] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "stopped"),
        ]
        assert saved[1]["content"] == expected
        return {"first_chunk_s": first_chunk_s}

    result = asyncio.run(scenario())
    print(f"\ntime to first chunk through daphne + Redis: {result['first_chunk_s'] * 1000:.0f} ms")


def test_a_resend_on_another_process_resumes_the_reply_without_gap(site):
    """The page lost its socket to process A before the `ack`, reconnected to B and sent again (same client_id):
    B answers with the same ids, the text so far from A, then the rest as A streams it."""
    port_a, port_b = site.ports
    cookie = login(port_a)
    client_id = str(uuid.uuid4())
    frame = json.dumps({"type": "send", "conversation_id": None, "client_id": client_id,
                        "content": "[tokens=150][delay=0.02]"})  # fmt: skip

    def ws(port: int):
        return connect(f"ws://127.0.0.1:{port}/ws/chat/", additional_headers={"Cookie": cookie},
                       origin=f"http://127.0.0.1:{port}")  # fmt: skip

    async def scenario() -> tuple[dict, list[dict]]:
        async with ws(port_a) as a:
            await a.send(frame)
            first = json.loads(await a.recv())
            await frames_until(a, "chunk")
        await asyncio.sleep(0.5)  # the reply streams on in process A with nobody watching
        async with ws(port_b) as b:
            await b.send(frame)
            return first, await frames_until(b, "done")

    first, frames = asyncio.run(scenario())
    ack, rest = frames[0], frames[1:]
    assert ack == first  # the same conversation and message ids: nothing was made twice
    chunks = [f for f in rest if f["type"] == "chunk"]
    assert chunks[0]["offset"] == 0 and len(chunks[0]["delta"]) > 0  # the text so far, at once
    text = ""
    for chunk in chunks:
        assert chunk["offset"] == len(text), "a gap or a repeat"
        text += chunk["delta"]
    assert text == "".join(f"t{i} " for i in range(150))
    assert rest[-1]["status"] == "complete"
