"""A socket joining a reply mid-stream: the text so far, then the rest, with no gap and no repeat.

The text so far comes from the process generating the reply (a snapshot
request to its ``control_channel``), not from the database, which can be up
to CHAT_FLUSH_SECONDS behind. Frames that reach the socket while it waits are
held, then released through ``trim``: chunks cut at the snapshot's offset,
`message` frames the client was already shown dropped. If no snapshot comes
within SNAPSHOT_TIMEOUT (the reply just ended, or its process died), or the
request cannot be sent, the database's copy is used.

Nothing here can leave a socket holding frames for ever: the deadline is a
timer of this process (not a message through the channel layer, which may be
the thing that failed); whatever fails while settling a join, and more than
CHAT_JOIN_MAX_HELD_FRAMES held frames, end it with an `out_of_sync` error
frame, on which the client re-sends `open` (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import BaseChannelLayer
from django.conf import settings

from chat import protocol, services
from chat.models import Message
from chat.replies import events
from chat.services import db

logger = logging.getLogger(__name__)

# How long a joining socket waits for a running generation to tell its text so far.
SNAPSHOT_TIMEOUT = 2.0

# Called with the text so far, and the final row if the reply has ended meanwhile;
# with (None, None) if the reply's row was deleted meanwhile (by an admin).
Then = Callable[[str | None, Message | None], Awaitable[None]]
# Sends one frame to the socket.
Send = Callable[[dict[str, Any]], Awaitable[None]]


def trim(held: list[dict[str, Any]], message_id: str, known: int, shown: frozenset[str]) -> list[dict[str, Any]]:
    """The held frames still to send, once the client has ``known`` characters of ``message_id``.

    Chunks of that reply wholly within the first ``known`` characters are
    dropped and one that straddles the offset is cut to start there; `message`
    frames for ids in ``shown`` (already in the client's history) are dropped.
    """
    out = []
    for frame in held:
        if frame["type"] == "message" and frame["message"]["id"] in shown:
            continue
        if frame["type"] == "chunk" and frame["message_id"] == message_id:
            end = frame["offset"] + len(frame["delta"])
            if end <= known:
                continue
            if frame["offset"] < known:
                frame = protocol.chunk(int(message_id), known, frame["delta"][known - frame["offset"] :])
        out.append(frame)
    return out


def _about(frame: dict[str, Any], message_id: str) -> bool:
    return frame.get("message_id") == message_id or frame.get("message", {}).get("id") == message_id


class Join:
    """One socket's pending joins (a socket shows one conversation, so at most one streaming reply).

    Frames for the socket go through ``deliver``: sent at once, or held while a join waits.
    """

    def __init__(self, layer: BaseChannelLayer, channel_name: str, send: Send) -> None:
        self.layer = layer
        self.channel_name = channel_name
        self.send = send
        self.held: list[dict[str, Any]] | None = None
        self.awaiting: dict[str, tuple[Then, frozenset[str]]] = {}
        self.conversation_id: int | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        # Bumped whenever what is pending is forgotten: a settle under way for an older join stops.
        self._generation = 0

    @property
    def holding(self) -> bool:
        return self.held is not None

    async def deliver(self, frame: dict[str, Any]) -> None:
        if self.held is None:
            await self.send(frame)
            return
        self.held.append(frame)
        if len(self.held) > settings.CHAT_JOIN_MAX_HELD_FRAMES:
            logger.warning("a joining socket held %d frames; giving up the join", len(self.held))
            await self._give_up()

    def reset(self) -> None:
        """Forget what was pending (the socket moved to another conversation, or re-read this one)."""
        self.held = None
        self._forget_awaiting()

    def _forget_awaiting(self) -> None:
        self.awaiting.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._generation += 1

    async def start(
        self, reply: Message, then: Then, shown: frozenset[str], *, conversation_id: int, again: bool = False
    ) -> None:
        """Ask the generating process for the text so far of ``reply``; ``then`` runs when it answers.

        ``again`` (an `open`): any earlier join of this socket is superseded; the frames held for it
        are kept (the new snapshot trims them), so a join that never got its answer is started anew.
        """
        message_id = str(reply.pk)
        if again:
            self._forget_awaiting()
        if self.held is None:
            self.held = []
        self.conversation_id = conversation_id
        self.awaiting[message_id] = (then, shown)
        if reply.control_channel:
            try:
                await self.layer.send(reply.control_channel, events.snapshot_request(reply.pk, self.channel_name))
            except Exception:  # noqa: BLE001 - the channel layer failed: the database's copy, now
                logger.warning("could not ask for the text so far of reply %s", reply.pk, exc_info=True)
                await self.settle(message_id, None)
                return
        loop = asyncio.get_running_loop()
        self._timers[message_id] = loop.call_later(SNAPSHOT_TIMEOUT, self._deadline, message_id)

    def _deadline(self, message_id: str) -> None:
        self._timers.pop(message_id, None)
        task = asyncio.create_task(self.settle(message_id, None))
        self._tasks.add(task)  # held until done
        task.add_done_callback(self._tasks.discard)

    async def answered(self, event: dict[str, Any]) -> None:
        """A snapshot event from the generating process (or its "not running here")."""
        await self.settle(event["message_id"], event["content"])

    async def settle(self, message_id: str, text: str | None) -> None:
        """The join of ``message_id`` ends: ``then`` with its text so far (``None``: read the database),
        then the held frames, trimmed, in order."""
        async with self._lock:
            if message_id not in self.awaiting:
                return  # answered already, or the socket moved on
            then, shown = self.awaiting.pop(message_id)
            timer = self._timers.pop(message_id, None)
            if timer is not None:
                timer.cancel()
            generation = self._generation
            try:
                await self._settle(message_id, text, then, shown, generation)
            except Exception:  # noqa: BLE001 - the socket must not hold frames for ever: it is told
                logger.exception("joining reply %s failed", message_id)
                if generation == self._generation:
                    await self._give_up()

    async def _settle(self, message_id: str, text: str | None, then: Then, shown: frozenset[str], generation: int):
        final = None
        if text is None:
            # No answer from a generating process: the database knows.
            row = await db(Message.objects.filter(pk=int(message_id)).first)()
            if row is not None and row.status == Message.Status.STREAMING:
                # Still `streaming`, yet its process did not answer: if it is gone, the reply ends here.
                row = await db(services.interrupt_if_dead)(row.pk) or row
            if generation != self._generation:
                return
            if row is None:  # deleted meanwhile: the socket is told so, and nothing of it is released
                await then(None, None)
                await self._release(lambda frame: [] if _about(frame, message_id) else [frame], generation)
                return
            text, final = row.content, (row if row.status != Message.Status.STREAMING else None)
        await then(text, final)
        known = len(text)
        await self._release(lambda frame: trim([frame], message_id, known, shown), generation)

    async def _release(self, keep: Callable[[dict[str, Any]], list[dict[str, Any]]], generation: int) -> None:
        # Frames that arrive while these are sent join the end of the list: order is kept.
        while self.held and generation == self._generation:
            for frame in keep(self.held.pop(0)):
                await self.send(frame)
        if generation == self._generation:
            self.held = None

    async def _give_up(self) -> None:
        """Drop what is held and tell the client to re-sync (it re-sends `open`)."""
        conversation_id = self.conversation_id
        self.reset()
        try:
            await self.send(protocol.out_of_sync(conversation_id))
        except Exception:  # noqa: BLE001 - the socket is gone
            logger.info("could not tell a socket to re-sync", exc_info=True)

    def close(self) -> None:
        self.reset()
        for task in self._tasks:
            task.cancel()
