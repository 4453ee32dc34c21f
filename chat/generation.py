"""A running reply: the task that runs the answering flow, and the stream that publishes it.

A generation is owned by the process whose consumer started it, not by the
socket: it keeps running when that socket closes. Anything that needs it from
elsewhere (`stop`, the text so far for a socket that joins mid-stream) sends
to the address stored in its row's ``control_channel``: its process's
``ControlDispatcher``, which hands the message to the reply's ``ReplyStream``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer
from django.conf import settings

from chat import protocol, services

logger = logging.getLogger(__name__)

# Strong references: a task nobody holds may be garbage-collected mid-run.
RUNNING: dict[int, asyncio.Task] = {}
# The streams of this process's running replies, by reply id, for the ControlDispatcher.
STREAMS: dict[int, ReplyStream] = {}


def db(fn):
    """Run an ORM function in a worker thread, not tied to any consumer's thread."""
    return database_sync_to_async(fn, thread_sensitive=False)


def group_name(conversation_id: int | str) -> str:
    return f"chat.conversation.{conversation_id}"


class ReplyStream:
    """Publishes one reply to its conversation group.

    Deltas are coalesced for CHAT_COALESCE_SECONDS so a fast model does not
    flood the channel layer; the first one goes out at once. ``text`` is
    exactly what has been published, which is what a joining socket is given.
    """

    def __init__(self, layer: BaseChannelLayer, conversation_id: int, reply_id: int) -> None:
        self.layer = layer
        self.group = group_name(conversation_id)
        self.reply_id = reply_id
        self.text = ""
        self.pending = ""
        self.stop_event = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_publish = 0.0
        self._timer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        STREAMS[self.reply_id] = self
        self._spawn(self._heartbeat())

    async def send(self, frame: dict[str, Any], exclude: str | None = None) -> None:
        await self.layer.group_send(self.group, {"type": "chat.frame", "frame": frame, "exclude": exclude})

    async def emit(self, delta: str) -> None:
        self.pending += delta
        if self._timer is not None:
            return
        wait = self._last_publish + settings.CHAT_COALESCE_SECONDS - time.monotonic()
        if wait <= 0:
            await self.publish()
        else:
            self._timer = asyncio.create_task(self._publish_after(wait))

    async def _publish_after(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self.publish()

    async def publish(self) -> None:
        async with self._lock:
            if not self.pending:
                return
            delta, self.pending = self.pending, ""
            offset = len(self.text)
            self.text += delta
            self._last_publish = time.monotonic()
            await self.send(protocol.chunk(self.reply_id, offset, delta))

    def control(self, message: dict[str, Any]) -> None:
        """A message for this reply from any process (see ``ControlDispatcher``)."""
        if message["type"] == "reply.stop":
            self.stop_event.set()
        elif message["type"] == "reply.snapshot":
            self._spawn(self._send_snapshot(message["reply_channel"]))

    async def _send_snapshot(self, reply_channel: str) -> None:
        # Under the lock: the text matches the chunks sent, none in flight.
        async with self._lock:
            await self.layer.send(
                reply_channel, {"type": "chat.snapshot", "message_id": str(self.reply_id), "content": self.text}
            )

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        # Held until done (snapshot answers come and go for the life of a long reply).
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        # Keeps the row fresh (so it is not taken for a dead process's) and the
        # text at most CHAT_FLUSH_SECONDS behind; also notices a stop flagged in the database.
        while True:
            await asyncio.sleep(settings.CHAT_FLUSH_SECONDS)
            try:
                wanted = await db(services.flush_reply)(self.reply_id, self.text)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the reply; try again next beat
                logger.exception("could not flush reply %s", self.reply_id)
                continue
            if not wanted:
                self.stop_event.set()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.publish()
        STREAMS.pop(self.reply_id, None)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ControlDispatcher:
    """One channel-layer address per process (and event loop) for messages to its running replies.

    (It must use new_channel()'s default prefix: channels_redis polls all of a
    process's "!" channels under one lock, assuming they share one Redis key.)

    `stop` and snapshot requests from any process are sent here with a
    ``reply_id``. One long-lived receive per process, rather than one per
    reply: channels_redis shares a process's receive among its channels, and
    cancelling one receive each time a reply ends can lose another's message.
    """

    _per_loop: dict[asyncio.AbstractEventLoop, ControlDispatcher] = {}

    def __init__(self, layer: BaseChannelLayer, channel: str) -> None:
        self.layer = layer
        self.channel = channel
        self.task = asyncio.create_task(self._run(), context=contextvars.Context())

    @classmethod
    async def address(cls, layer: BaseChannelLayer) -> str:
        loop = asyncio.get_running_loop()
        dispatcher = cls._per_loop.get(loop)
        if dispatcher is None or dispatcher.task.done():
            dispatcher = cls._per_loop[loop] = cls(layer, await layer.new_channel())
        return dispatcher.channel

    @classmethod
    async def shutdown(cls) -> None:
        dispatcher = cls._per_loop.pop(asyncio.get_running_loop(), None)
        if dispatcher is not None:
            dispatcher.task.cancel()
            await asyncio.gather(dispatcher.task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            message = await self.layer.receive(self.channel)
            stream = STREAMS.get(message.get("reply_id"))
            if stream is not None:
                stream.control(message)
            elif message["type"] == "reply.snapshot":
                # Not running here (any more): the asker reads the database at once.
                await self.layer.send(
                    message["reply_channel"],
                    {"type": "chat.snapshot", "message_id": str(message["reply_id"]), "content": None},
                )


def start(layer: BaseChannelLayer, turn: services.Turn, question: str) -> asyncio.Task:
    """Start the answering flow for ``turn.reply`` as a task of this process."""
    from chat.flows.answer import run_answer

    stream = ReplyStream(layer, turn.conversation.pk, turn.reply.pk)
    shared = {
        "conversation_id": turn.conversation.pk,
        "user_message_id": turn.user_message.pk,
        "reply_id": turn.reply.pk,
        "question": question,
        "stream": stream,
    }
    # A fresh context: the task must not inherit the consumer's thread-sensitive
    # context, which ends when the socket closes.
    task = asyncio.create_task(run_answer(shared), context=contextvars.Context())
    RUNNING[turn.reply.pk] = task
    task.add_done_callback(lambda _: RUNNING.pop(turn.reply.pk, None))
    return task
