"""The socket that asked for a reply gets its frames directly from the flow in its process
(``ReplyStream.origin``, ``ChatConsumer.deliver``); every other socket gets them through the
conversation's group, whose copy skips the asking socket. Each path is tested alone here."""

import asyncio

import pytest
from channels.layers import get_channel_layer

from chat import protocol, services
from chat.consumers import ChatConsumer
from chat.flows import answer
from chat.models import Message
from chat.replies import events
from tests.conftest import Client, reply_text
from tests.test_replies import FailingLayer

pytestmark = pytest.mark.django_db(transaction=True)

TOKENS = "".join(f"t{i} " for i in range(5))


async def test_the_asking_socket_streams_before_its_subscription_completes(alice, monkeypatch):
    """Under load a SUBSCRIBE queued for seconds; the asking socket's reply must not wait for it."""
    layer = get_channel_layer()
    release = asyncio.Event()
    group_add = layer.group_add

    async def stuck_group_add(group: str, channel: str) -> None:
        if group.startswith("chat.conversation."):
            await release.wait()
        await group_add(group, channel)

    async with Client(alice) as client:
        monkeypatch.setattr(layer, "group_add", stuck_group_add)
        try:
            ack = await client.say("[tokens=5]")
            frames = await client.recv_until("done", timeout=10)
            assert not release.is_set()
            assert reply_text(frames, ack["assistant_message_id"]) == TOKENS
            assert frames[-1]["status"] == "complete"
        finally:
            release.set()


async def test_the_groups_copy_skips_the_asking_socket(alice, settings, monkeypatch):
    """With the direct path switched off, the asking socket gets nothing of its reply: nothing comes twice.
    The other tab gets it all, announced first, through the group."""
    settings.CHAT_TITLES = "first_message"  # no `conversation` frame for the first reply
    async with Client(alice) as asking, Client(alice) as other:
        first = await asking.say("first message")
        await asking.recv_until("done")
        await other.send({"type": "open", "conversation_id": first["conversation_id"]})
        assert (await other.recv())["type"] == "history"

        async def deliver_nothing(self, conversation_id, frames):
            return None

        monkeypatch.setattr(ChatConsumer, "deliver", deliver_nothing)
        ack = await asking.say("[tokens=5]", first["conversation_id"])
        assert ack["type"] == "ack"
        frames = await other.recv_until("done")
        assert [f["type"] for f in frames[:2]] == ["message", "message"]
        assert reply_text(frames, ack["assistant_message_id"]) == TOKENS
        assert await asking.nothing_more(0.5)


async def test_the_asking_socket_gets_nothing_of_its_reply_while_away_then_joins_again(alice, settings):
    settings.CHAT_TITLES = "first_message"  # no `conversation` frames in between
    async with Client(alice) as client:
        elsewhere = await client.say("elsewhere")
        await client.recv_until("done")
        ack = await client.say("[tokens=40][delay=0.03]")
        reply_id = ack["assistant_message_id"]
        before = await client.recv_until("chunk")

        await client.send({"type": "open", "conversation_id": elsewhere["conversation_id"]})
        while (frame := await client.recv())["type"] != "history":
            before.append(frame)  # delivered before the socket moved
        assert frame["conversation_id"] == elsewhere["conversation_id"]
        assert await client.nothing_more(0.3)  # the reply goes on, but not to this socket

        await client.send({"type": "open", "conversation_id": ack["conversation_id"]})
        frames = await client.recv_until("done")
    history = frames[0]
    assert history["type"] == "history"
    streamed = history["messages"][-1]
    assert streamed["id"] == reply_id and streamed["status"] == "streaming"
    rest = frames[1:]
    if rest[0]["type"] == "chunk":
        assert rest[0]["offset"] == len(streamed["content"])
    expected = "".join(f"t{i} " for i in range(40))
    assert streamed["content"] + "".join(f["delta"] for f in rest if f["type"] == "chunk") == expected
    assert reply_text(before, reply_id) == expected[: len(reply_text(before, reply_id))]
    saved = await Message.objects.aget(pk=reply_id)
    assert saved.status == "complete" and saved.content == expected


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


class Asker:
    """Stands in for the asking socket: records what is delivered to it."""

    channel_name = "asker"

    def __init__(self, shows: int) -> None:
        self.shows, self.frames = shows, []

    async def deliver(self, conversation_id, frames):
        if conversation_id == self.shows:
            self.frames.extend(frames)


async def test_the_asking_socket_hears_how_its_reply_ended_when_publishing_fails(alice, monkeypatch):
    monkeypatch.setattr("chat.replies.stream.RETRY_PAUSES", (0.01,))
    layer = FailingLayer(good=1, bad=1000)  # the first chunk goes out; then Redis is gone
    turn = await services.db(services.begin_turn)(alice, None, "5b0c2a43-8f3e-4f7e-9a51-0c8c1e6f2d11",
                                                  "[tokens=50][delay=0.01]", None, "test-model", "")  # fmt: skip
    asker = Asker(shows=turn.conversation.pk)
    await asyncio.wait_for(answer.start(layer, turn, origin=asker), 10)
    assert [f["type"] for f in asker.frames][-1] == "done"
    assert asker.frames[-1]["error"]["code"] == protocol.DELIVERY_FAILED
    # The group's copy never includes the asking socket.
    assert layer.sent and all(event["exclude"] == "asker" for event in layer.sent)
