"""``ControlDispatcher``: one channel-layer address per process for requests to its running replies.

A reply's row stores its process's address (``control_channel``); `stop` and
snapshot requests from any process are sent there with a ``reply_id`` and
handed to that reply's ``ReplyStream``. One long-lived receive per process
rather than one per reply: fewer subscriptions, and no receive is cancelled
each time a reply ends. The listener outlives channel-layer failures: an error
is logged, and it listens again after a pause.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from channels.layers import BaseChannelLayer

from chat.replies import events
from chat.replies.stream import ReplyStream

logger = logging.getLogger(__name__)

# The streams of this process's running replies, by reply id.
STREAMS: dict[int, ReplyStream] = {}
# Pause before listening again after a failure.
RETRY_PAUSE = 0.5
# How long ``is_running`` waits for a reply's process to answer.
PROBE_TIMEOUT = 1.0


def register(stream: ReplyStream) -> None:
    STREAMS[stream.reply_id] = stream


def unregister(stream: ReplyStream) -> None:
    STREAMS.pop(stream.reply_id, None)


async def is_running(layer: BaseChannelLayer, reply_id: int, control_channel: str) -> bool:
    """Whether a process still runs this reply: its control address is asked, as a joining socket asks it.

    No answer in PROBE_TIMEOUT, or "not running here", is False: the process
    died or the reply ended. (A live but slow process is told apart by the
    row's flush time: services.interrupt_if_dead.)
    """
    if not control_channel:
        return False
    channel = await layer.new_channel()
    await layer.send(control_channel, events.snapshot_request(reply_id, channel))
    try:
        answer = await asyncio.wait_for(layer.receive(channel), PROBE_TIMEOUT)
    except TimeoutError:
        return False
    return answer["content"] is not None


class ControlDispatcher:
    _per_loop: dict[asyncio.AbstractEventLoop, ControlDispatcher] = {}

    def __init__(self, layer: BaseChannelLayer, channel: str) -> None:
        self.layer = layer
        self.channel = channel
        # A fresh context: the listener must not inherit the state of the socket that happened to start it.
        self.task = asyncio.create_task(self._run(), context=contextvars.Context())

    @classmethod
    async def address(cls, layer: BaseChannelLayer) -> str:
        """This process's control address (the listener starts on first use)."""
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
            try:
                message = await self.layer.receive(self.channel)
                await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the process's only control listener must not die
                logger.exception("control listener %s failed; listening again", self.channel)
                await asyncio.sleep(RETRY_PAUSE)

    async def _dispatch(self, message: dict) -> None:
        stream = STREAMS.get(message.get("reply_id"))
        if stream is not None:
            stream.control(message)
        elif message["type"] == events.SNAPSHOT_REQUEST:
            # Not running here (any more): the asker reads the database at once.
            await self.layer.send(message["reply_channel"], events.snapshot(message["reply_id"], None))
