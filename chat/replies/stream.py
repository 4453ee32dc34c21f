"""``ReplyStream``: publishes one reply to its conversation's group, coalesced.

Deltas wait up to CHAT_COALESCE_SECONDS so a fast model does not flood the
channel layer; the first one goes out at once. ``text`` is exactly what has
been published, which is what a joining socket is given as the text so far.
A publish that still fails after a few retries marks the stream ``failed`` and
sets ``stop_event``: the reply then ends with an error instead of streaming
into the void.

Nothing is published before ``ready`` is set: the socket that asked can start
the model request first and subscribe, acknowledge and announce meanwhile,
without its first chunk overtaking any of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.layers import BaseChannelLayer
from django.conf import settings

from chat import protocol
from chat.replies import events

logger = logging.getLogger(__name__)

# Waits between attempts to publish one event (a Redis restart or failover takes about this long).
RETRY_PAUSES = (0.05, 0.25, 1.0)


class DeliveryError(Exception):
    """The channel layer would not take a reply's frames."""


class ReplyStream:
    def __init__(
        self, layer: BaseChannelLayer | None, conversation_id: int, reply_id: int, ready: asyncio.Event | None = None
    ) -> None:
        self.layer = layer
        if ready is None:
            ready = asyncio.Event()
            ready.set()
        self.ready = ready
        self.group = events.group_name(conversation_id)
        self.reply_id = reply_id
        self.text = ""
        self.pending = ""
        self.stop_event = asyncio.Event()
        # Stopped because the process is stopping (running.drain), not by a user: ends `interrupted`.
        self.interrupted = False
        self.failed: DeliveryError | None = None
        self._lock = asyncio.Lock()
        self._last_publish = 0.0
        self._timer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def send(self, *frames: dict[str, Any]) -> None:
        """Send protocol frames to every socket of the conversation, retrying a failing channel layer."""
        event = events.frames(*frames)
        await self.ready.wait()
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

    def interrupt(self) -> None:
        """End the reply as `interrupted`, with its text so far (the process is stopping)."""
        self.interrupted = True
        self.stop_event.set()

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
