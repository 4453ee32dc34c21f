"""The one writer of a streaming reply's database row.

While a reply streams, its row is written only from here: its sources once,
before the first chunk (when documents were used), a flush every
CHAT_FLUSH_SECONDS (the text so far, and ``updated_at`` so the row is not
taken for a dead process's), then one final write. Every UPDATE matches only a
row that is still ``streaming``, so a late flush can never overwrite the final
text or status, and a row that was finished or deleted elsewhere stops the
reply instead of being written again.

The flushes of all of a process's streaming replies go out together, one
statement per beat (``Heartbeat``): 200 concurrent replies cost one UPDATE a
second, not 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.utils import timezone

from chat.llm.redact import redact
from chat.models import Message
from chat.services import db

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
    error_detail: str = ""


def flush(texts: dict[int, str]) -> set[int]:
    """Save the text so far of several replies in one statement; returns the ids that should go on.

    A reply missing from the answer should stop: a stop was flagged, or its
    row is gone or no longer streaming.
    """
    if not texts:
        return set()
    table = Message._meta.db_table
    values = ", ".join(["(%s::bigint, %s::text)"] * len(texts))
    params = [value for item in texts.items() for value in item]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} AS m SET content = v.content, updated_at = %s "  # noqa: S608 - no user input in it
            f"FROM (VALUES {values}) AS v(id, content) "
            "WHERE m.id = v.id AND m.status = %s AND NOT m.stop_requested RETURNING m.id",
            [timezone.now(), *params, Message.Status.STREAMING],
        )
        return {row[0] for row in cursor.fetchall()}


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
            # Whatever the detail quotes (a provider's error, an exception's repr) may hold a URL's credentials.
            error_message=redact(outcome.error_message),
            error_detail=redact(outcome.error_detail),
            control_channel="",
            updated_at=timezone.now(),
        )
    )


def save_sources(reply_id: int, sources: list[dict]) -> None:
    """The passages the reply's prompt holds, saved before its first chunk: a tab that opens the
    conversation mid-stream gets them with the history."""
    Message.objects.filter(pk=reply_id, status=Message.Status.STREAMING).update(sources=sources)


class Heartbeat:
    """Flushes every streaming reply of this process (and event loop) together, every CHAT_FLUSH_SECONDS."""

    _per_loop: dict[asyncio.AbstractEventLoop, Heartbeat] = {}

    def __init__(self) -> None:
        self.rows: dict[int, tuple[Callable[[], str], Callable[[], None]]] = {}
        self.task: asyncio.Task | None = None

    @classmethod
    def of_this_loop(cls) -> Heartbeat:
        loop = asyncio.get_running_loop()
        if loop not in cls._per_loop:
            cls._per_loop = {k: v for k, v in cls._per_loop.items() if not k.is_closed()}
            cls._per_loop[loop] = cls()
        return cls._per_loop[loop]

    def add(self, reply_id: int, text: Callable[[], str], on_stop: Callable[[], None]) -> None:
        self.rows[reply_id] = (text, on_stop)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._beat())

    def discard(self, reply_id: int) -> None:
        self.rows.pop(reply_id, None)

    async def _beat(self) -> None:
        while self.rows:
            await asyncio.sleep(settings.CHAT_FLUSH_SECONDS)
            rows = dict(self.rows)
            try:
                live = await db(flush)({reply_id: text() for reply_id, (text, _) in rows.items()})
            except Exception:  # noqa: BLE001 - a database hiccup must not end the replies; try again next beat
                logger.exception("could not flush %d streaming replies", len(rows))
                continue
            for reply_id, (_, on_stop) in rows.items():
                if reply_id not in live and reply_id in self.rows:
                    on_stop()


class ReplyRow:
    """A streaming reply's row: flushed with the process's heartbeat, then written once, finally."""

    def __init__(self, reply_id: int) -> None:
        self.reply_id = reply_id
        self._heartbeat: Heartbeat | None = None

    def start(self, text: Callable[[], str], on_stop: Callable[[], None]) -> None:
        """Flush ``text()`` every CHAT_FLUSH_SECONDS; call ``on_stop`` when the row says stop."""
        self._heartbeat = Heartbeat.of_this_loop()
        self._heartbeat.add(self.reply_id, text, on_stop)

    async def save_sources(self, sources: list[dict]) -> None:
        await db(save_sources)(self.reply_id, sources)

    async def finish(self, outcome: Outcome, content: str, latency_ms: int) -> None:
        if self._heartbeat is not None:
            # A flush already running cannot be called back, but after this write
            # commits its UPDATE matches no row (the status guard).
            self._heartbeat.discard(self.reply_id)
            self._heartbeat = None
        if not await db(finish)(self.reply_id, outcome, content, latency_ms):
            logger.warning("reply %s was no longer streaming at its final write (%s)", self.reply_id, outcome.status)
