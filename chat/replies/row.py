"""The one writer of a streaming reply's database row.

While a reply streams, its row is written only from here: a flush every
CHAT_FLUSH_SECONDS (the text so far, and ``updated_at`` so the row is not
taken for a dead process's), then one final write. Both UPDATEs match only a
row that is still ``streaming``, so a late flush can never overwrite the final
text or status, and a row that was finished or deleted elsewhere stops the
reply instead of being written again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from chat.models import Message

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a reply ended, as its final row and its `done` frame say."""

    status: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_ms: int | None = None
    error_code: str = ""
    error_message: str = ""


def db(fn):
    """Run an ORM function in a worker thread, not tied to any socket's thread."""
    return sync_to_async(fn, thread_sensitive=False)


def flush(reply_id: int, content: str) -> bool:
    """Save the text so far; False when the reply should stop (a stop was flagged, or the row is gone or final)."""
    return bool(
        Message.objects.filter(pk=reply_id, status=Message.Status.STREAMING, stop_requested=False).update(
            content=content, updated_at=timezone.now()
        )
    )


def finish(reply_id: int, outcome: Outcome, content: str, latency_ms: int) -> bool:
    """The final write; False if the row was no longer streaming (deleted, or marked interrupted)."""
    return bool(
        Message.objects.filter(pk=reply_id, status=Message.Status.STREAMING).update(
            status=outcome.status,
            content=content,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            first_token_ms=outcome.first_token_ms,
            latency_ms=latency_ms,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
            control_channel="",
            updated_at=timezone.now(),
        )
    )


class ReplyRow:
    """Flushes a streaming reply's row on a heartbeat, then writes it once, finally."""

    def __init__(self, reply_id: int) -> None:
        self.reply_id = reply_id
        self._heartbeat: asyncio.Task | None = None

    def start(self, text: Callable[[], str], on_stop: Callable[[], None]) -> None:
        """Flush ``text()`` every CHAT_FLUSH_SECONDS; call ``on_stop`` when the row says stop."""
        self._heartbeat = asyncio.create_task(self._beat(text, on_stop))

    async def _beat(self, text: Callable[[], str], on_stop: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(settings.CHAT_FLUSH_SECONDS)
            try:
                wanted = await db(flush)(self.reply_id, text())
            except Exception:  # noqa: BLE001 - a database hiccup must not end the reply; try again next beat
                logger.exception("could not flush reply %s", self.reply_id)
                continue
            if not wanted:
                on_stop()

    async def finish(self, outcome: Outcome, content: str, latency_ms: int) -> None:
        # A flush already running in its thread cannot be called back, but after this
        # write commits its UPDATE matches no row (the status guard).
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        if not await db(finish)(self.reply_id, outcome, content, latency_ms):
            logger.warning("reply %s was no longer streaming at its final write (%s)", self.reply_id, outcome.status)
