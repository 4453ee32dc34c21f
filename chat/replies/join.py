"""A socket joining a reply mid-stream: the text so far, then the rest, with no gap and no repeat.

The text so far comes from the process generating the reply (a snapshot
request to its ``control_channel``), not from the database, which can be up
to CHAT_FLUSH_SECONDS behind. Frames that reach the socket while it waits are
held, then released through ``trim``: chunks cut at the snapshot's offset,
`message` frames the client was already shown dropped. If no snapshot comes
within SNAPSHOT_TIMEOUT (the reply just ended, or its process died), the
database's copy is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import BaseChannelLayer

from chat import protocol, services
from chat.models import Message
from chat.replies import events
from chat.services import db

# How long a joining socket waits for a running generation to tell its text so far.
SNAPSHOT_TIMEOUT = 2.0

# Called with the text so far, and the final row if the reply has ended meanwhile;
# with (None, None) if the reply's row was deleted meanwhile (by an admin).
Then = Callable[[str | None, Message | None], Awaitable[None]]


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


class Join:
    """One socket's pending joins (a socket shows one conversation, so at most one streaming reply)."""

    def __init__(self, layer: BaseChannelLayer, channel_name: str) -> None:
        self.layer = layer
        self.channel_name = channel_name
        self.held: list[dict[str, Any]] | None = None
        self.awaiting: dict[str, tuple[Then, frozenset[str]]] = {}
        self._deadlines: set[asyncio.Task] = set()

    @property
    def holding(self) -> bool:
        return self.held is not None

    def hold(self, frame: dict[str, Any]) -> None:
        self.held.append(frame)

    def reset(self) -> None:
        """The socket moved to another conversation: forget what was pending."""
        self.held = None
        self.awaiting.clear()

    async def start(self, reply: Message, then: Then, shown: frozenset[str]) -> None:
        """Ask the generating process for the text so far of ``reply``; ``then`` runs when it answers."""
        message_id = str(reply.pk)
        if self.held is None:
            self.held = []
        self.awaiting[message_id] = (then, shown)
        if reply.control_channel:
            await self.layer.send(reply.control_channel, events.snapshot_request(reply.pk, self.channel_name))
        task = asyncio.create_task(self._deadline(message_id))
        self._deadlines.add(task)
        task.add_done_callback(self._deadlines.discard)

    async def _deadline(self, message_id: str) -> None:
        await asyncio.sleep(SNAPSHOT_TIMEOUT)
        await self.layer.send(self.channel_name, events.snapshot(message_id, None))

    async def answered(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Handle a snapshot event; returns the held frames to send now."""
        message_id = event["message_id"]
        if message_id not in self.awaiting:
            return []  # answered already, or the socket moved on
        then, shown = self.awaiting.pop(message_id)
        text, final = event["content"], None
        if text is None:
            # No answer from a generating process: the database knows.
            row = await db(Message.objects.filter(pk=int(message_id)).first)()
            if row is None:  # deleted meanwhile: the socket is told so, and nothing of it is released
                await then(None, None)
                held, self.held = self.held or [], None
                return [
                    f
                    for f in held
                    if f.get("message_id") != message_id and f.get("message", {}).get("id") != message_id
                ]
            if row.status == Message.Status.STREAMING:
                # Still `streaming`, yet its process did not answer: if it is gone, the reply ends here.
                row = await db(services.interrupt_if_dead)(row.pk) or row
            text, final = row.content, (row if row.status != Message.Status.STREAMING else None)
        await then(text, final)
        held, self.held = self.held or [], None
        return trim(held, message_id, len(text), shown)

    def close(self) -> None:
        for task in self._deadlines:
            task.cancel()
