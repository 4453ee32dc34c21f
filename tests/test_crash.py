"""A daphne process killed (SIGKILL) mid-reply: after a restart the reply is final, as `interrupted` with
its text kept up to the last flush, and the conversation takes a new message within seconds."""

import asyncio
import json
import time

import pytest

from tests.servers import Site, login
from tests.test_resilience import frames_until, send, socket

pytestmark = pytest.mark.e2e


def test_a_reply_cut_by_sigkill_is_interrupted_with_its_text_and_the_conversation_moves_on(
    tmp_path_factory, llm_server
):
    env = {"OPENAI_BASE_URL": llm_server.base_url, "OPENAI_API_KEY": "test-key", "LLM_MODEL": "test-model",
           "LLM_PROVIDER": None}  # fmt: skip
    with Site(tmp_path_factory.mktemp("crash"), env, processes=1) as site:
        port = site.ports[0]
        cookie = login(port)

        async def stream_then_kill() -> tuple[dict, str]:
            async with socket(port, cookie) as ws:
                await ws.send(send(None, "[tokens=400][delay=0.02]"))  # 8 s of reply
                ack = json.loads(await ws.recv())
                text, started, a_second_before = "", time.monotonic(), None
                while time.monotonic() - started < 2.5:
                    frame = json.loads(await ws.recv())
                    text += frame.get("delta", "")
                    if a_second_before is None and time.monotonic() - started >= 1.5:
                        a_second_before = text
                site.servers[0].kill()  # SIGKILL: no shutdown code runs
                site.servers[0].wait()
                return ack, a_second_before

        ack, a_second_before = asyncio.run(stream_then_kill())
        site.restart(0)
        restarted = time.monotonic()

        async def after_restart() -> tuple[dict, dict]:
            async with socket(port, cookie) as ws:
                while True:  # the page would show `busy` and let the user retry
                    await ws.send(send(ack["conversation_id"], "[tokens=3]"))
                    answer = json.loads(await ws.recv())
                    if answer["type"] == "ack" or time.monotonic() - restarted > 10:
                        break
                    assert answer["code"] == "busy", answer
                    await asyncio.sleep(0.5)
                new_reply = await frames_until(ws, "done") if answer["type"] == "ack" else None
                await ws.send(json.dumps({"type": "open", "conversation_id": ack["conversation_id"]}))
                history = await frames_until(ws, "history")
                return answer, new_reply, history[-1]

        answer, new_reply, history = asyncio.run(after_restart())
    took = time.monotonic() - restarted
    assert answer["type"] == "ack", f"still {answer} {took:.1f} s after the restart"
    assert new_reply[-1]["status"] == "complete"
    cut = next(m for m in history["messages"] if m["id"] == ack["assistant_message_id"])
    assert cut["status"] == "interrupted" and cut["error"]["code"] == "interrupted"
    full = "".join(f"t{i} " for i in range(400))
    # Kept up to the last flush (every second): at least what had streamed a second before the kill.
    assert full.startswith(cut["content"]) and len(cut["content"]) >= len(a_second_before) > 0
