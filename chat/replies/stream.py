"""``ReplyStream``: publishes one reply to its conversation's group, coalesced.

Deltas wait up to CHAT_COALESCE_SECONDS so a fast model does not flood the
channel layer; the first one goes out at once. ``text`` is exactly what has
been published, which is what a joining socket is given as the text so far.
A publish that still fails after a few retries marks the stream ``failed`` and
sets ``stop_event``: the reply then ends with an error instead of streaming
into the void.

Nothing is published before ``ready`` is set: the socket that asked can start
the model request first and acknowledge and announce meanwhile, without its
first chunk overtaking either.

The socket that asked (``origin``, in this process) is handed the reply's
frames directly, before they are published, never through the channel layer:
the group's copy excludes it. Its first chunk then waits neither for its own
SUBSCRIBE, which under load queued for seconds (docs/performance.md), nor for
Redis at all, and it hears how its reply ended even when Redis is gone. It gets
them only while it still shows the conversation; if it leaves and comes back,
it joins like any other socket (chat/replies/join.py), still on the direct path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from channels.layers import BaseChannelLayer
from django.conf import settings

from chat import protocol
from chat.replies import events

logger = logging.getLogger(__name__)

# Waits between attempts to publish one event (a Redis restart or failover takes about this long).
RETRY_PAUSES = (0.05, 0.25, 1.0)


class DeliveryError(Exception):
    """The channel layer would not take a reply's frames."""


class Origin(Protocol):
    """The socket that asked for a reply (``ChatConsumer``)."""

    channel_name: str

    async def deliver(self, conversation_id: int, frames: list[dict[str, Any]]) -> None:
        """Show ``frames`` if the socket still shows ``conversation_id``."""


class ReplyStream:
    def __init__(
        self,
        layer: BaseChannelLayer | None,
        conversation_id: int,
        reply_id: int,
        ready: asyncio.Event | None = None,
        origin: Origin | None = None,
    ) -> None:
        self.layer = layer
        self.conversation_id = conversation_id
        self.origin = origin
        if ready is None:
            ready = asyncio.Event()
            ready.set()
        self.ready = ready
        self.group = events.group_name(conversation_id)
        self.reply_id = reply_id
        self.text = ""
        self.pending = ""
        self.stop_event = asyncio.Event()
        self.failed: DeliveryError | None = None
        self._lock = asyncio.Lock()
        self._last_publish = 0.0
        self._timer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def send(self, *frames: dict[str, Any]) -> None:
        """Send protocol frames to every socket of the conversation, retrying a failing channel layer."""
        await self.ready.wait()
        if self.origin is None:
            await self._publish(events.frames(*frames))
            return
        try:
            await self.origin.deliver(self.conversation_id, list(frames))
        except Exception:  # noqa: BLE001 - a socket closing under us; the others must still get the frames
            logger.warning("reply %s: its socket did not take a frame", self.reply_id, exc_info=True)
        await self._publish(events.frames(*frames, exclude=self.origin.channel_name))

    async def _publish(self, event: dict[str, Any]) -> None:
        for pause in (*RETRY_PAUSES, None):
            try:
                await self.layer.group_send(self.group, event)
                return
            except Exception as exc:  # noqa: BLE001 - any layer failure: retry, then give up loudly
                if pause is None:
                    raise DeliveryError(f"could not publish to {self.group}: {exc!r}") from exc
                logger.warning("publishing reply %s failed (%r); retrying in %.2f s", self.reply_id, exc, pause)
                await asyncio.sleep(pause)

    async def emit(self, delta: str) -> None:
        """Add model output; it is published within CHAT_COALESCE_SECONDS.

        Never waits for the channel layer: the model's stream keeps being read
        while a publish is in flight, and what arrives meanwhile goes out
        together in the next one (under load, chunks grow instead of queueing).
        """
        self.pending += delta
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        wait = max(0.0, self._last_publish + settings.CHAT_COALESCE_SECONDS - time.monotonic())
        self._timer = asyncio.create_task(self._publish_after(wait))

    async def _publish_after(self, wait: float) -> None:
        if wait:
            await asyncio.sleep(wait)
        try:
            # Shielded: close() may cancel the wait above, never a chunk half-way into the channel layer.
            await asyncio.shield(self.publish())
        except DeliveryError:
            return  # recorded in self.failed; the reply is being stopped
        finally:
            self._timer = None
        if self.pending:
            self._schedule()

    async def publish(self) -> None:
        async with self._lock:
            if not self.pending or self.failed:
                return
            delta, self.pending = self.pending, ""
            offset = len(self.text)
            self.text += delta
            self._last_publish = time.monotonic()
            try:
                await self.send(protocol.chunk(self.reply_id, offset, delta))
            except DeliveryError as exc:
                logger.error("reply %s: %s; stopping it", self.reply_id, exc)
                self.failed = exc
                self.stop_event.set()
                raise

    # --- requests from any process (see control.ControlDispatcher) ---------------------------

    def control(self, message: dict[str, Any]) -> None:
        if message["type"] == events.STOP:
            self.stop_event.set()
        elif message["type"] == events.SNAPSHOT_REQUEST:
            self._spawn(self._send_snapshot(message["reply_channel"]))

    async def _send_snapshot(self, reply_channel: str) -> None:
        # Under the lock: the text matches the chunks sent, none in flight.
        async with self._lock:
            try:
                await self.layer.send(reply_channel, events.snapshot(self.reply_id, self.text))
            except Exception:  # noqa: BLE001 - the asker falls back to the database after its time-out
                logger.exception("could not answer a snapshot request for reply %s", self.reply_id)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # held until done, then dropped
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Publish what is pending and end the helper tasks."""
        if self._timer is not None:
            self._timer.cancel()  # a publish it started runs on, shielded; ours below waits for its lock
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
        try:
            await self.publish()
        except DeliveryError:
            pass  # recorded in self.failed
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
