"""A chat turn over the WebSocket: send, ack, chunks, done, history."""

import asyncio
import uuid

import pytest
from channels.layers import get_channel_layer

from chat import protocol
from chat.models import Conversation, Message
from chat.replies import events
from tests.conftest import Client, reply_text

pytestmark = pytest.mark.django_db(transaction=True)


async def test_full_turn_streams_and_is_saved(alice):
    async with Client(alice) as client:
        ack = await client.say("hello there")
        assert ack["type"] == "ack"
        assert {"client_id", "conversation_id", "user_message_id", "assistant_message_id"} <= ack.keys()
        frames = await client.recv_until("done")
        done = frames[-1]
        assert done["status"] == "complete"
        assert done["error"] is None
        assert done["usage"]["completion_tokens"] == 4  # "You said: hello there"
        assert done["usage"]["prompt_tokens"] > 0
        text = reply_text(frames, ack["assistant_message_id"])
        assert text == "You said: hello there"

        reply = await Message.objects.aget(pk=ack["assistant_message_id"])
        assert reply.content == text
        assert reply.status == Message.Status.COMPLETE
        assert reply.completion_tokens == 4
        assert reply.first_token_ms is not None and reply.latency_ms >= reply.first_token_ms
        assert reply.model == "test-model"

        await client.send({"type": "open", "conversation_id": ack["conversation_id"]})
        history = await client.recv()
        assert history["type"] == "history"
        assert [(m["role"], m["content"], m["status"]) for m in history["messages"]] == [
            ("user", "hello there", "complete"),
            ("assistant", "You said: hello there", "complete"),
        ]
        assert [m["id"] for m in history["messages"]] == [ack["user_message_id"], ack["assistant_message_id"]]
        assert all(m["created_at"].endswith("Z") and m["sources"] == [] for m in history["messages"])


async def test_follow_up_sends_history_to_the_model(alice, llm_server):
    async with Client(alice) as client:
        ack = await client.say("my name is Ada")
        await client.recv_until("done")
        await client.say("what is my name?", ack["conversation_id"])
        await client.recv_until("done")
    prompt = llm_server.requests[-1]["messages"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1]["content"] == "my name is Ada"
    assert prompt[2]["content"] == "You said: my name is Ada"
    assert prompt[3]["content"] == "what is my name?"


async def test_deltas_are_coalesced(alice):
    async with Client(alice) as client:
        ack = await client.say("[tokens=200]")
        frames = await client.recv_until("done")
    chunks = [f for f in frames if f["type"] == "chunk"]
    assert reply_text(frames, ack["assistant_message_id"]) == "".join(f"t{i} " for i in range(200))
    # 200 tokens as fast as the server can send them cross the channel layer in far fewer frames.
    assert len(chunks) < 50


async def test_same_client_id_twice_creates_one_message(alice):
    client_id = str(uuid.uuid4())
    async with Client(alice) as client:
        first = await client.say("only once", client_id=client_id)
        await client.recv_until("done")
        again = await client.say("only once", first["conversation_id"], client_id=client_id)
        assert again == first
        # The reply comes again from offset 0, then done; nothing new is generated.
        frames = await client.recv_until("done")
        assert reply_text(frames, first["assistant_message_id"]) == "You said: only once"
        # A retried first send (conversation_id still null) is recognised too.
        third = await client.say("only once", None, client_id=client_id)
        assert third == first
        await client.recv_until("done")
    assert await Message.objects.filter(client_id=client_id).acount() == 1
    assert await Message.objects.acount() == 2
    assert await Conversation.objects.acount() == 1


async def test_repeated_client_id_while_streaming_resumes_without_gap(alice):
    client_id = str(uuid.uuid4())
    async with Client(alice) as client:
        first = await client.say("[tokens=20][delay=0.05]", client_id=client_id)
        await client.recv_until("chunk")
        # The connection drops and the client sends again, as the browser does on reconnect.
    async with Client(alice) as client:
        again = await client.say("[tokens=20][delay=0.05]", first["conversation_id"], client_id=client_id)
        assert again == first
        frames = await client.recv_until("done")
    assert frames[0]["type"] == "chunk" and frames[0]["offset"] == 0
    assert reply_text(frames, first["assistant_message_id"]) == "".join(f"t{i} " for i in range(20))


async def test_send_while_streaming_is_busy(alice):
    async with Client(alice) as client:
        ack = await client.say("[tokens=20][delay=0.05]")
        busy = await client.say("second", ack["conversation_id"])
        assert busy["type"] == "error" and busy["code"] == "busy"
        assert busy["client_id"]
        frames = await client.recv_until("done")
        assert frames[-1]["status"] == "complete"
    assert await Message.objects.filter(content="second").acount() == 0


async def test_stop_mid_stream_keeps_partial_text(alice):
    async with Client(alice) as client:
        ack = await client.say("[tokens=200][delay=0.02]")
        frames = await client.recv_until("chunk")
        await asyncio.sleep(0.2)
        await client.send({"type": "stop", "message_id": ack["assistant_message_id"]})
        frames += await client.recv_until("done")
    done = frames[-1]
    assert done["status"] == "stopped"
    text = reply_text(frames, ack["assistant_message_id"])
    assert 0 < len(text) < len("".join(f"t{i} " for i in range(200)))
    assert done["usage"]["completion_tokens"] == len(text.split())
    reply = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert reply.status == Message.Status.STOPPED
    assert reply.content == text


async def test_stop_after_done_is_ignored(alice):
    async with Client(alice) as client:
        ack = await client.say("short")
        await client.recv_until("done")
        await client.send({"type": "stop", "message_id": ack["assistant_message_id"]})
        assert await client.nothing_more()
    assert (await Message.objects.aget(pk=ack["assistant_message_id"])).status == Message.Status.COMPLETE


async def test_regenerate_makes_a_new_reply_to_the_same_message(alice, llm_server):
    async with Client(alice) as client:
        ack = await client.say("again please")
        await client.recv_until("done")
        await client.send({"type": "regenerate", "message_id": ack["assistant_message_id"]})
        frames = await client.recv_until("done")
    announced = frames[0]
    assert announced["type"] == "message"
    new = announced["message"]
    assert new["role"] == "assistant" and new["reply_to"] == ack["user_message_id"]
    assert new["id"] != ack["assistant_message_id"]
    assert reply_text(frames, new["id"]) == "You said: again please"
    assert frames[-1]["message_id"] == new["id"] and frames[-1]["status"] == "complete"
    # The model saw the question once, not the old reply as history.
    assert [m["role"] for m in llm_server.requests[-1]["messages"]] == ["system", "user"]
    assert await Message.objects.filter(role="user").acount() == 1


async def test_socket_closed_mid_stream_reply_still_completes(alice):
    client = Client(alice)
    await client.__aenter__()
    ack = await client.say("[tokens=30][delay=0.03]")
    await client.recv_until("chunk")
    await client.close()
    for _ in range(100):
        reply = await Message.objects.aget(pk=ack["assistant_message_id"])
        if reply.status != Message.Status.STREAMING:
            break
        await asyncio.sleep(0.1)
    assert reply.status == Message.Status.COMPLETE
    assert reply.content == "".join(f"t{i} " for i in range(30))


async def test_two_sockets_receive_the_identical_stream(alice):
    async with Client(alice) as first, Client(alice) as second:
        ack = await first.say("[tokens=40][delay=0.1]")  # 4 s of reply: the second socket joins it mid-way
        first_frames = await first.recv_until("chunk")
        await second.send({"type": "open", "conversation_id": ack["conversation_id"]})
        first_frames += await first.recv_until("done")
        second_frames = await second.recv_until("done")
    history = second_frames[0]
    assert history["type"] == "history"
    streamed = history["messages"][-1]
    assert streamed["id"] == ack["assistant_message_id"]
    assert streamed["status"] == "streaming"
    # The joining socket gets the text so far in history, then the rest with no gap or repeat.
    chunks = [f for f in second_frames if f["type"] == "chunk"]
    assert chunks
    text = streamed["content"]
    for chunk in chunks:
        assert chunk["offset"] == len(text)
        text += chunk["delta"]
    expected = "".join(f"t{i} " for i in range(40))
    assert text == expected
    assert reply_text(first_frames, ack["assistant_message_id"]) == expected
    assert first_frames[-1] == second_frames[-1]


async def test_other_tab_sees_new_messages(alice, settings):
    settings.CHAT_TITLES = "first_message"  # no `conversation` frame from the first reply's title to race these
    async with Client(alice) as first, Client(alice) as second:
        ack = await first.say("first message")
        await first.recv_until("done")
        await second.send({"type": "open", "conversation_id": ack["conversation_id"]})
        assert (await second.recv())["type"] == "history"
        sent = await first.say("[tokens=5]", ack["conversation_id"])
        first_frames = await first.recv_until("done")
        frames = await second.recv_until("done")
    assert frames[0] == {"type": "message", "message": frames[0]["message"]}
    assert frames[0]["message"]["id"] == sent["user_message_id"]
    assert frames[1]["message"]["id"] == sent["assistant_message_id"]
    assert [f for f in frames if f["type"] != "message"] == [f for f in first_frames if f["type"] != "message"]


async def test_emoji_and_cjk_round_trip_with_offsets_in_code_points(alice, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 12
    text = "你好世界 🙂🚀 é"  # 9 code points, 11 UTF-16 units, 24 UTF-8 bytes
    async with Client(alice) as client:
        ack = await client.say(text)
        frames = await client.recv_until("done")
        # The limit counts code points, as offsets do: 12 emoji fit (24 UTF-16 units), 13 do not.
        assert (await client.say("🙂" * 12, ack["conversation_id"]))["type"] == "ack"
        await client.recv_until("done")
        assert (await client.say("🙂" * 13, ack["conversation_id"]))["code"] == "too_large"
    assert reply_text(frames, ack["assistant_message_id"]) == f"You said: {text}"
    saved = await Message.objects.aget(pk=ack["user_message_id"])
    assert saved.content == text


async def test_frames_of_a_reply_its_history_showed_ended_are_dropped(alice, settings):
    """A reply that ended just before a socket's `open` read it may still have frames on their way
    through the group: the history already has its text, so they are not shown again."""
    settings.CHAT_TITLES = "first_message"
    async with Client(alice) as client:
        ack = await client.say("hello")
        await client.recv_until("done")
        conversation, reply = ack["conversation_id"], int(ack["assistant_message_id"])
        await client.send({"type": "open", "conversation_id": conversation})
        await client.recv_until("history")
        group = events.group_name(conversation)
        late = events.frames(protocol.chunk(reply, 0, "You said: hello"), protocol.status(reply, "queued"))
        await get_channel_layer().group_send(group, late)
        # Frames about other things still come, in order.
        replaced = protocol.replaced(int(conversation), int(ack["user_message_id"]))
        await get_channel_layer().group_send(group, events.frames(replaced))
        assert await client.recv() == replaced
