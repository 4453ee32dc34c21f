"""The sidebar: a user's conversations, newest first, a page at a time, optionally searched.

Search matches every word of the query as a word prefix ("sess comm" finds "session commit"), in
conversation titles and message text, through GIN indexes on ``to_tsvector('simple', ...)`` (any
language, no stemming). Pages are keyed on (updated_at, id), so a page never repeats or skips a
conversation when new ones arrive.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from channels.layers import BaseChannelLayer
from django.contrib.postgres.search import SearchQuery, SearchVector
from django.db.models import Q

from chat import protocol
from chat.models import Conversation, Message
from chat.replies import events

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
# Words of a query beyond this many are ignored.
MAX_WORDS = 8
WORD = re.compile(r"\w+")


def _query(text: str) -> SearchQuery | None:
    words = WORD.findall(text.lower())[:MAX_WORDS]
    if not words:
        return None
    # \w+ words are safe in tsquery syntax; :* makes each a prefix.
    return SearchQuery(" & ".join(f"{word}:*" for word in words), search_type="raw", config="simple")


def cursor(conversation: Conversation) -> str:
    return f"{conversation.updated_at.isoformat()}|{conversation.pk}"


def page(user, q: str = "", before: str = "", size: int | None = None) -> tuple[list[Conversation], str | None]:
    """One page of ``user``'s conversations (newest activity first) and the cursor of the next."""
    size = size or PAGE_SIZE
    conversations = Conversation.objects.filter(owner=user).only("id", "title", "updated_at")
    if before:
        moment, _, pk = before.rpartition("|")
        when = datetime.fromisoformat(moment)
        conversations = conversations.filter(Q(updated_at__lt=when) | Q(updated_at=when, pk__lt=int(pk)))
    query = _query(q)
    if query is not None:
        by_title = Conversation.objects.annotate(words=SearchVector("title", config="simple")).filter(
            owner=user, words=query
        )
        by_text = (
            Message.objects.shown()
            .annotate(words=SearchVector("content", config="simple"))
            .filter(conversation__owner=user, words=query)
        )
        conversations = conversations.filter(
            Q(pk__in=by_title.values("pk")) | Q(pk__in=by_text.values("conversation_id"))
        )
    rows = list(conversations.order_by("-updated_at", "-pk")[: size + 1])
    more = len(rows) > size
    rows = rows[:size]
    return rows, cursor(rows[-1]) if more else None


async def tell_tabs(layer: BaseChannelLayer, conversation: Conversation, deleted: bool = False) -> None:
    """Every open tab of the owner, on any process, shows the conversation's new title (or drops
    it). Best effort: the change is saved whether or not a tab hears of it."""
    try:
        await layer.group_send(
            events.user_group(conversation.owner_id), events.frames(protocol.conversation(conversation, deleted))
        )
    except Exception:  # noqa: BLE001
        logger.warning("could not tell the tabs about conversation %s", conversation.pk, exc_info=True)
