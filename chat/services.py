"""Database operations of a chat turn (synchronous; async callers run them through ``db``).

Every lookup takes the user and filters by owner, so a conversation or message
that is not yours is "not found", exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from chat import limits, protocol, titles
from chat.models import Conversation, Feedback, Message
from chat.protocol import ProtocolError
from documents import search

# The first key of this project's advisory locks on a send's client_id (the second is the client_id's hash).
SEND_LOCK = 0x43484154  # "CHAT"


# The threads that run database calls, each with its own persistent connection. Not channels'
# single "thread-sensitive" thread: it serialised every socket's queries, and at 200 concurrent
# turns their starts queued behind each other for seconds. Not the event loop's default pool
# either: asyncio resolves host names there (every new connection to the model's endpoint), and
# those waited behind 200 queued turns, so no reply got its first token before the last turn had
# started (docs/performance.md).
DB_EXECUTOR = ThreadPoolExecutor(max_workers=settings.CHAT_DB_THREADS, thread_name_prefix="db")


class DatabaseTimeout(Exception):
    """A database call that did not end within CHAT_DB_WAIT_SECONDS: the server stopped answering (its own
    time limits cannot fire then). Its thread may still wait; the caller does not (the frame gets an error)."""


# Set for a call whose caller stopped waiting (``db``): a turn seen so rolls back instead of committing.
_abandoned: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("abandoned", default=None)


def db(fn):
    """``fn`` as a coroutine function, run on ``DB_EXECUTOR``; connections are checked
    (close_old_connections) around each call, as channels does. Waits at most CHAT_DB_WAIT_SECONDS."""
    call = database_sync_to_async(fn, thread_sensitive=False, executor=DB_EXECUTOR)

    @functools.wraps(fn)
    async def bounded(*args, **kwargs):
        abandoned = threading.Event()
        token = _abandoned.set(abandoned)  # the call's thread runs in a copy of this context
        try:
            return await asyncio.wait_for(call(*args, **kwargs), settings.CHAT_DB_WAIT_SECONDS)
        except TimeoutError:
            abandoned.set()
            raise DatabaseTimeout(
                f"{fn.__name__}: no answer from the database in {settings.CHAT_DB_WAIT_SECONDS} s"
            ) from None
        finally:
            _abandoned.reset(token)

    return bounded


def _unless_abandoned() -> None:
    """Raise (rolling the transaction back) if the caller stopped waiting: it was told the turn failed,
    so the turn must not appear when the database answers again (a send would be ``streaming`` for ever)."""
    abandoned = _abandoned.get()
    if abandoned is not None and abandoned.is_set():
        raise DatabaseTimeout("the caller stopped waiting for this turn")


@dataclass
class Turn:
    conversation: Conversation
    user_message: Message
    reply: Message
    #: True when the send repeated a known client_id: nothing new was created.
    replayed: bool = False
    created_conversation: bool = False
    #: An edit: the first message it took out of the conversation (it and every later one).
    replaced: int | None = None
    #: The documents the reply may search; None: plain chat (documents off, or none to see).
    scope: search.Scope | None = None


def _pk(value: str) -> int:
    # Only an id as the server writes it: int() also takes " 5", "05", "+5", "5_0" and other scripts'
    # digits, and a resend naming its conversation so was taken for a new send there (IntegrityError).
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and value == str(int(value))):
        raise ProtocolError(protocol.NOT_FOUND, "No such conversation or message.")
    return int(value)


def get_conversation(user, conversation_id: str) -> Conversation:
    try:
        return Conversation.objects.get(pk=_pk(conversation_id), owner=user)
    except Conversation.DoesNotExist:
        raise ProtocolError(protocol.NOT_FOUND, "No such conversation.") from None


def get_message(user, message_id: str) -> Message:
    try:
        return Message.objects.select_related("conversation").get(pk=_pk(message_id), conversation__owner=user)
    except Message.DoesNotExist:
        raise ProtocolError(protocol.NOT_FOUND, "No such message.") from None


INTERRUPTED = {
    "status": Message.Status.INTERRUPTED,
    "error_code": "interrupted",
    "error_message": "The server stopped while this reply was being written.",
    "control_channel": "",
}


class Busy(ProtocolError):
    """The conversation has a `streaming` reply (``reply``, its row): one reply at a time."""

    def __init__(self, reply: Message | None, client_id: str | None = None) -> None:
        super().__init__(protocol.BUSY, "A reply is still being written in this conversation.", client_id)
        self.reply = reply


def recover_stale(conversation_id: int | None = None) -> int:
    """Mark replies left `streaming` by a dead process as `interrupted`.

    Only rows not flushed for CHAT_STALE_SECONDS: a live process flushes every
    CHAT_FLUSH_SECONDS, so its replies are never touched. (A reply whose
    process is known not to answer is recovered sooner: ``interrupt_if_dead``.)
    """
    cutoff = timezone.now() - timedelta(seconds=settings.CHAT_STALE_SECONDS)
    rows = Message.objects.filter(status=Message.Status.STREAMING, updated_at__lt=cutoff)
    if conversation_id is not None:
        rows = rows.filter(conversation_id=conversation_id)
    return rows.update(**INTERRUPTED)


def interrupt_if_dead(reply_id: int) -> Message | None:
    """Mark a `streaming` reply `interrupted` (its text so far kept); returns the row if it was.

    For a reply whose process did not answer for it (chat/replies/control.py
    ``is_running``), and only if the row has not been flushed for three beats:
    a live process flushes every CHAT_FLUSH_SECONDS however busy it is, so a
    slow answer never ends a live reply.
    """
    cutoff = timezone.now() - timedelta(seconds=3 * settings.CHAT_FLUSH_SECONDS)
    rows = Message.objects.filter(pk=reply_id, status=Message.Status.STREAMING, updated_at__lt=cutoff)
    if not rows.update(**INTERRUPTED, updated_at=timezone.now()):
        return None
    return Message.objects.get(pk=reply_id)


def _page(user, conversation: Conversation, before: Message | None = None) -> tuple[list[Message], bool]:
    """The newest CHAT_HISTORY_PAGE shown messages (before ``before``, if given), oldest first, and
    whether earlier ones remain: one query, LIMIT page + 1, on the (conversation, created_at, id) index."""
    size = settings.CHAT_HISTORY_PAGE
    rows = conversation.messages.shown()
    if before is not None:
        rows = rows.filter(Q(created_at__lt=before.created_at) | Q(created_at=before.created_at, id__lt=before.pk))
    # With the user's own rating of each reply (thumbs up or down), in the same query.
    rating = Feedback.objects.filter(message=OuterRef("pk"), user=user).values("rating")[:1]
    page = list(rows.annotate(my_rating=Subquery(rating)).order_by("-created_at", "-id")[: size + 1])
    more = len(page) > size
    return page[:size][::-1], more


def open_conversation(user, conversation_id: str) -> tuple[Conversation, list[Message], bool]:
    """The user's conversation, its newest messages (replies left by a dead process marked
    `interrupted` first) and whether earlier ones remain (``history_page``)."""
    conversation = get_conversation(user, conversation_id)
    recover_stale(conversation.pk)
    return conversation, *_page(user, conversation)


def history_page(user, conversation_id: str, before_id: str) -> tuple[Conversation, list[Message], bool]:
    """The page of messages before message ``before_id`` of the user's conversation, and whether
    earlier ones remain."""
    conversation = get_conversation(user, conversation_id)
    before = Message.objects.filter(pk=_pk(before_id), conversation=conversation).first()
    if before is None:
        raise ProtocolError(protocol.NOT_FOUND, "No such message in this conversation.")
    return conversation, *_page(user, conversation, before)


def _scope(conversation: Conversation) -> search.Scope | None:
    """What the turn's answer may search, read in the turn's own transaction (if it fails, nothing
    of the turn is saved): a query of its own, on the thread pool, would wait behind every turn that
    starts meanwhile (docs/performance.md)."""
    if not conversation.use_documents:
        return None  # not even "are there any?"
    return search.scope(conversation.owner_id) or None


def _replay(user_message: Message) -> Turn:
    reply = user_message.replies.order_by("-created_at", "-id").first()
    return Turn(user_message.conversation, user_message, reply, replayed=True)


def _new_reply(
    conversation: Conversation, user_message: Message, model_name: str, control_channel: str, *, new: bool = False
) -> Message:
    def create() -> Message:
        return Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            reply_to=user_message,
            model=model_name,
            control_channel=control_channel,
        )

    if new:
        return create()  # nothing can be streaming in a conversation made in this transaction
    # The partial unique index allows one `streaming` reply per conversation:
    # the database, not this process, decides who is busy.
    try:
        with transaction.atomic():
            return create()
    except IntegrityError:
        raise Busy(conversation.messages.filter(status=Message.Status.STREAMING).first()) from None


def _lock_send(client_id: str) -> None:
    """Serialise the sends of one client_id until the transaction ends, across processes.

    A resend that races the first send then finds its rows instead of making
    a second conversation (no unique constraint can catch that: the two sends
    would make two conversations). Only sends of the same client_id wait on
    each other: a lock per user made a user's tabs queue behind each other,
    each holding a database thread while it waited (docs/performance.md).
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [SEND_LOCK, client_id])


def _replace_from(conversation: Conversation, message_id: str) -> int:
    """Take user message ``message_id`` and every later message out of the conversation (an edit)."""
    target = conversation.messages.shown().filter(pk=_pk(message_id), role=Message.Role.USER).first()
    if target is None:
        raise ProtocolError(protocol.NOT_FOUND, "No such message in this conversation.")
    conversation.messages.shown().filter(id__gte=target.pk).update(replaced_at=timezone.now())
    return target.pk


def _sent_before(user, conversation_id: str | None, client_id: str):
    """The user's earlier send of ``client_id``: to this conversation, or to any when it makes a new one (a
    client_id sent to several is not the first of them: that one was taken, and the turn's insert broke
    the unique constraint)."""
    known = Message.objects.filter(client_id=client_id, conversation__owner=user)
    if conversation_id is not None:
        known = known.filter(conversation_id=_pk(conversation_id))
    return known


def begin_turn(
    user,
    conversation_id: str | None,
    client_id: str,
    content: str,
    use_documents: bool | None,
    model_name: str,
    control_channel: str,
    replaces: str | None = None,
) -> Turn:
    """Save the user's message and an empty `streaming` reply, or find the earlier send with this client_id.

    With ``replaces`` (an edit), that user message and everything after it leave the conversation first.
    The per-minute limit is read before the transaction and counted after it (chat/limits.py): no lock
    is held while Redis answers.
    """
    refused = limits.messages_refusal(user, client_id)
    # A resend of a known message is answered whatever the count: it makes nothing new. (The same
    # lookup as the replay's: a client_id known in another conversation would make a new turn here.)
    if refused is not None and not _sent_before(user, conversation_id, client_id).exists():
        raise refused
    with transaction.atomic():
        _lock_send(client_id)
        known = _sent_before(user, conversation_id, client_id).select_related("conversation").first()
        if known:
            return _replay(known)
        created = conversation_id is None
        if created:
            limits.check_turn(user, client_id, new_conversation=True)
            conversation = Conversation.objects.create(
                owner=user, title=titles.fallback(content), use_documents=use_documents is not False
            )
        else:
            conversation = get_conversation(user, conversation_id)
            # Serialise sends to one conversation.
            Conversation.objects.select_for_update().filter(pk=conversation.pk).first()
            recover_stale(conversation.pk)
            streaming = conversation.messages.filter(status=Message.Status.STREAMING).first()
            if streaming is not None:
                raise Busy(streaming, client_id)
            limits.check_turn(user, client_id, new_conversation=False)
        replaced = _replace_from(conversation, replaces) if replaces is not None else None
        user_message = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=content, client_id=client_id
        )
        reply = _new_reply(conversation, user_message, model_name, control_channel, new=created)
        if not created:
            changed = ["updated_at"]  # "newest first" means most recently active
            if use_documents is not None and use_documents != conversation.use_documents:
                conversation.use_documents = use_documents
                changed.append("use_documents")
            conversation.save(update_fields=changed)
        scope = _scope(conversation)
        _unless_abandoned()
    limits.count_message(user)  # a replay (returned above) made nothing new to count
    return Turn(conversation, user_message, reply, created_conversation=created, replaced=replaced, scope=scope)


def begin_regenerate(user, message_id: str, model_name: str, control_channel: str) -> Turn:
    """A new `streaming` reply to the user message that ``message_id`` is, or answers (counted as begin_turn's)."""
    refused = limits.messages_refusal(user, None)
    if refused is not None:
        raise refused
    with transaction.atomic():
        target = get_message(user, message_id)
        user_message = target if target.role == Message.Role.USER else target.reply_to
        if user_message is None:
            raise ProtocolError(protocol.BAD_REQUEST, "This message has nothing to regenerate.")
        conversation = target.conversation
        # Serialise regenerates and sends to one conversation.
        Conversation.objects.select_for_update().filter(pk=conversation.pk).first()
        recover_stale(conversation.pk)
        limits.check_turn(user, None, new_conversation=False)
        reply = _new_reply(conversation, user_message, model_name, control_channel)
        conversation.save(update_fields=["updated_at"])
        scope = _scope(conversation)
        _unless_abandoned()
    limits.count_message(user)
    return Turn(conversation, user_message, reply, scope=scope)


def request_stop(user, message_id: str) -> Message | None:
    """Flag a streaming reply to stop; None if it already finished (then `stop` is ignored)."""
    message = get_message(user, message_id)
    if message.role != Message.Role.ASSISTANT:
        raise ProtocolError(protocol.NOT_FOUND, "No such reply.")
    flagged = Message.objects.filter(pk=message.pk, status=Message.Status.STREAMING).update(stop_requested=True)
    return message if flagged else None


def prompt_history(conversation_id: int, user_message_id: int) -> list[dict[str, str]]:
    """The turns before ``user_message_id``, oldest first, as chat messages: at most the last
    CHAT_PROMPT_HISTORY_MESSAGES rows, in one query (the prompt's token budget then keeps what fits).

    Of several replies to one user message (regenerated) only the newest with text counts; a reply
    whose user message fell outside the window is left out.
    """
    rows = (
        Message.objects.shown()
        .filter(conversation_id=conversation_id, id__lt=user_message_id)
        .order_by("-created_at", "-id")[: settings.CHAT_PROMPT_HISTORY_MESSAGES]
    )
    latest_reply: dict[int, Message] = {}
    users: list[Message] = []
    for row in reversed(list(rows)):
        if row.role == Message.Role.USER:
            users.append(row)
        elif row.content and row.reply_to_id:
            latest_reply[row.reply_to_id] = row
    turns: list[dict[str, str]] = []
    for user_row in users:
        turns.append({"role": "user", "content": user_row.content})
        if user_row.pk in latest_reply:
            turns.append({"role": "assistant", "content": latest_reply[user_row.pk].content})
    return turns
