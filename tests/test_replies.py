"""The running-reply mechanisms one at a time: joining mid-stream, the row's one writer, failed delivery."""

import asyncio
from datetime import timedelta

import pytest
from channels.layers import InMemoryChannelLayer
from django.utils import timezone

from chat import protocol, services
from chat.flows import answer
from chat.models import Conversation, Message
from chat.replies import control, events, row
from chat.replies.control import ControlDispatcher
from chat.replies.join import Join, trim
from chat.replies.row import Outcome
from chat.replies.stream import ReplyStream

pytestmark = pytest.mark.django_db(transaction=True)


def chunk(offset: int, delta: str, message_id: int = 7) -> dict:
    return protocol.chunk(message_id, offset, delta)


# --- trim: what a joining socket is sent after its snapshot -------------------------------


def test_chunk_straddling_the_snapshot_offset_is_cut_there():
    held = [chunk(0, "Hello "), chunk(6, "wor"), chunk(9, "ld!")]
    # The snapshot had "Hello wo" (8 characters).
    assert trim(held, "7", 8, frozenset()) == [chunk(8, "r"), chunk(9, "ld!")]


def test_chunks_within_the_snapshot_are_dropped_and_other_replies_kept():
    held = [chunk(0, "ab"), chunk(2, "cd"), chunk(0, "other", message_id=8)]
    assert trim(held, "7", 4, frozenset()) == [chunk(0, "other", message_id=8)]


def test_message_frame_already_in_history_is_dropped():
    shown = {"type": "message", "message": {"id": "5"}}
    new = {"type": "message", "message": {"id": "6"}}
    assert trim([shown, new, chunk(3, "x")], "7", 3, frozenset({"5"})) == [new, chunk(3, "x")]


def test_offsets_count_code_points():
    held = [chunk(0, "héllo 🙂"), chunk(7, " ok")]
    assert trim(held, "7", 6, frozenset()) == [chunk(6, "🙂"), chunk(7, " ok")]


# --- Join: waiting for the generating process ----------------------------------------------


async def streaming_reply(user, control_channel: str = "", content: str = "saved so far") -> Message:
    conversation = await Conversation.objects.acreate(owner=user)
    question = await Message.objects.acreate(conversation=conversation, role="user", content="q")
    return await Message.objects.acreate(
        conversation=conversation,
        role="assistant",
        status="streaming",
        content=content,
        reply_to=question,
        control_channel=control_channel,
    )


class Socket:
    """What a Join sends to its socket, and what its ``then`` was given."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.given: list[tuple] = []

    async def send(self, frame: dict) -> None:
        self.sent.append(frame)

    async def then(self, text, final) -> None:
        self.given.append((text, final.status if final else None))


async def test_snapshot_answer_releases_held_frames_by_offset(alice):
    layer = InMemoryChannelLayer()
    me = await layer.new_channel()
    generator = await layer.new_channel()
    reply = await streaming_reply(alice, control_channel=generator)
    socket = Socket()
    join = Join(layer, me, socket.send)
    await join.start(reply, socket.then, frozenset(), conversation_id=reply.conversation_id)
    request = await layer.receive(generator)
    assert request == events.snapshot_request(reply.pk, me)
    await join.deliver(chunk(0, "live text", reply.pk))
    await join.deliver(chunk(9, " and more", reply.pk))
    assert socket.sent == []  # held
    await join.answered(events.snapshot(reply.pk, "live t"))
    assert socket.given == [("live t", None)]
    assert socket.sent == [chunk(6, "ext", reply.pk), chunk(9, " and more", reply.pk)]
    assert not join.holding
    await join.deliver(chunk(18, "!", reply.pk))
    assert socket.sent[-1] == chunk(18, "!", reply.pk)  # no longer held
    join.close()


async def test_no_snapshot_in_time_falls_back_to_the_database(alice, monkeypatch):
    monkeypatch.setattr("chat.replies.join.SNAPSHOT_TIMEOUT", 0.1)
    layer = InMemoryChannelLayer()
    me = await layer.new_channel()
    # The generating process is gone: its control channel has no listener.
    reply = await streaming_reply(alice, control_channel=await layer.new_channel(), content="saved so far")
    socket = Socket()
    join = Join(layer, me, socket.send)
    await join.start(reply, socket.then, frozenset(), conversation_id=reply.conversation_id)
    await join.deliver(chunk(0, "saved so far, and on", reply.pk))
    for _ in range(100):  # the deadline fires in this process
        if socket.given:
            break
        await asyncio.sleep(0.05)
    assert socket.given == [("saved so far", None)]
    assert socket.sent == [chunk(12, ", and on", reply.pk)]
    assert not join.holding
    join.close()


async def test_reply_finished_meanwhile_gives_the_final_row(alice):
    layer = InMemoryChannelLayer()
    me = await layer.new_channel()
    reply = await streaming_reply(alice)
    await Message.objects.filter(pk=reply.pk).aupdate(status="complete", content="all of it")
    socket = Socket()
    join = Join(layer, me, socket.send)
    await join.start(reply, socket.then, frozenset(), conversation_id=reply.conversation_id)
    await join.answered(events.snapshot(reply.pk, None))
    assert socket.sent == []
    assert socket.given == [("all of it", "complete")]
    join.close()


# --- the row's one writer ----------------------------------------------------------------


async def test_a_late_flush_never_overwrites_the_final_row(alice):
    reply = await streaming_reply(alice, content="")
    assert await services.db(row.flush)({reply.pk: "partial"}) == {reply.pk}
    await services.db(row.finish)(reply.pk, Outcome("complete", 3, 5), "the whole answer", 10)
    # A flush that was already on its way when the reply finished:
    assert await services.db(row.flush)({reply.pk: "partial, later"}) == set()
    saved = await Message.objects.aget(pk=reply.pk)
    assert (saved.status, saved.content) == ("complete", "the whole answer")


async def test_flush_tells_a_flagged_stop(alice):
    reply = await streaming_reply(alice)
    other = await streaming_reply(alice)
    await Message.objects.filter(pk=reply.pk).aupdate(stop_requested=True)
    assert await services.db(row.flush)({reply.pk: "a", other.pk: "b"}) == {other.pk}


async def test_stop_flagged_in_the_database_alone_stops_the_reply(alice, settings):
    """The database flag works with no channel message at all (the control address leads nowhere)."""
    settings.CHAT_FLUSH_SECONDS = 0.1
    layer = InMemoryChannelLayer()
    client_id = "8a1f6c3e-0d0e-4c55-9a53-3f6d1c1f0a01"
    turn = await services.db(services.begin_turn)(alice, None, client_id, "[tokens=300][delay=0.02]", None,
                                                  "test-model", "nowhere!x")  # fmt: skip
    task = answer.start(layer, turn)
    await asyncio.sleep(0.5)
    assert await services.db(services.request_stop)(alice, str(turn.reply.pk))
    await asyncio.wait_for(task, 5)
    saved = await Message.objects.aget(pk=turn.reply.pk)
    assert saved.status == "stopped" and 0 < len(saved.content.split()) < 300


# --- a channel layer that fails -------------------------------------------------------------


class FailingLayer(InMemoryChannelLayer):
    """Takes the first ``good`` group sends, fails the next ``bad`` ones, then works again."""

    def __init__(self, good: int, bad: int) -> None:
        super().__init__()
        self.good, self.bad, self.sent = good, bad, []

    async def group_send(self, group, message):
        if self.good <= 0 and self.bad > 0:
            self.bad -= 1
            raise ConnectionError("Redis went away")
        self.good -= 1
        self.sent.append(message)
        await super().group_send(group, message)


async def test_reply_whose_publishing_fails_ends_with_an_error_and_done(alice, monkeypatch):
    monkeypatch.setattr("chat.replies.stream.RETRY_PAUSES", (0.01, 0.01))
    layer = FailingLayer(good=2, bad=3)  # the second chunk and its two retries fail
    turn = await services.db(services.begin_turn)(alice, None, "8a1f6c3e-0d0e-4c55-9a53-3f6d1c1f0a02",
                                                  "[tokens=100][delay=0.01]", None, "test-model", "")  # fmt: skip
    await asyncio.wait_for(answer.start(layer, turn), 10)
    saved = await Message.objects.aget(pk=turn.reply.pk)
    assert saved.status == "error" and saved.error_code == protocol.DELIVERY_FAILED
    assert saved.content  # what was generated is saved: the client re-syncs from it
    done = [f for event in layer.sent for f in event["frames"] if f["type"] == "done"]
    assert len(done) == 1 and done[0]["status"] == "error"
    assert done[0]["error"]["code"] == protocol.DELIVERY_FAILED


async def test_a_reply_publishes_nothing_before_it_is_ready():
    """The asking socket subscribes, acknowledges and announces while the model request is under way:
    no frame of the reply may overtake those."""
    layer = FailingLayer(good=100, bad=0)
    ready = asyncio.Event()
    stream = ReplyStream(layer, conversation_id=1, reply_id=7, ready=ready)
    await stream.emit("Hello")
    status = asyncio.create_task(stream.send(protocol.status(7, "queued")))
    await asyncio.sleep(0.2)
    assert layer.sent == []
    ready.set()
    await asyncio.wait_for(status, 1)
    await stream.close()
    frames = [frame for event in layer.sent for frame in event["frames"]]
    assert {frame["type"] for frame in frames} == {"chunk", "status"}
    assert stream.text == "Hello"


# --- a reply whose process is gone ------------------------------------------------------------


async def test_is_running_asks_the_replys_process():
    layer = InMemoryChannelLayer()
    address = await ControlDispatcher.address(layer)
    stream = ReplyStream(layer, conversation_id=1, reply_id=4242)
    control.register(stream)
    try:
        assert await control.is_running(layer, 4242, address)
        assert not await control.is_running(layer, 4243, address)  # alive, but not running that reply
        assert not await control.is_running(layer, 4242, "specific.nobody-listens")  # no answer in time
    finally:
        control.unregister(stream)


async def test_a_silent_process_s_reply_is_interrupted_only_once_its_flushes_stopped(alice):
    reply = await streaming_reply(alice, content="saved so far")
    # Flushed a moment ago: its process may only be slow to answer. Left alone.
    assert await services.db(services.interrupt_if_dead)(reply.pk) is None
    await Message.objects.filter(pk=reply.pk).aupdate(updated_at=timezone.now() - timedelta(seconds=5))
    ended = await services.db(services.interrupt_if_dead)(reply.pk)
    assert (ended.status, ended.content, ended.error_code) == ("interrupted", "saved so far", "interrupted")
