"""The WebSocket protocol, v1 (docs/protocol.md): parsing client frames and building server frames.

Everything that crosses the socket is built here, so the consumer, the
generation and the tests agree on one shape.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings

# Error codes (docs/protocol.md).
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
NOT_FOUND = "not_found"
BUSY = "busy"
PROVIDER_ERROR = "provider_error"
CONTEXT_TOO_LONG = "context_too_long"
NOT_CONFIGURED = "not_configured"
INTERNAL_ERROR = "internal_error"
# A reply whose frames the channel layer would not take (in `done`): the text so far is saved.
DELIVERY_FAILED = "delivery_failed"
# A reply whose final write failed (in `done`): the database keeps its last flush.
SAVE_FAILED = "save_failed"
# The socket could not keep a conversation live (chat/replies/join.py): the client re-sends `open`.
OUT_OF_SYNC = "out_of_sync"

# Close codes.
CLOSE_TOO_BIG = 1009
CLOSE_UNAUTHENTICATED = 4401
# The user has CHAT_MAX_SOCKETS_PER_USER sockets open already (chat/sockets.py).
CLOSE_TOO_MANY_SOCKETS = 4429


class ProtocolError(Exception):
    """A client frame that gets an `error` frame back; the socket stays open."""

    def __init__(self, code: str, message: str, client_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_id = client_id

    def frame(self) -> dict[str, Any]:
        return error(self.code, self.message, self.client_id)


@dataclass(frozen=True)
class Open:
    conversation_id: str
    # A page of earlier messages: those before this one (nothing is subscribed or joined).
    before: str | None = None


@dataclass(frozen=True)
class Send:
    conversation_id: str | None
    client_id: str
    content: str
    # Switches the conversation's documents on or off from this turn; None leaves it as it is.
    use_documents: bool | None = None
    # An edit: this user message and every later message leave the conversation, replaced by this one.
    replaces: str | None = None


@dataclass(frozen=True)
class Stop:
    message_id: str


@dataclass(frozen=True)
class Regenerate:
    message_id: str


ClientFrame = Open | Send | Stop | Regenerate


def _id(frame: dict[str, Any], field: str, *, nullable: bool = False) -> str | None:
    value = frame.get(field)
    if value is None and nullable and field in frame:
        return None
    if not isinstance(value, str) or not value:
        kind = "a string id or null" if nullable else "a string id"
        raise ProtocolError(BAD_REQUEST, f"`{field}` must be {kind}.", _client_id(frame))
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> bool:
    """Text PostgreSQL and UTF-8 can hold: no NUL, no lone surrogate (JSON's ``"\\ud800"`` makes one)."""
    return "\x00" not in text and not _SURROGATE.search(text)


def clean(text: str) -> str:
    """``text`` made storable: NUL dropped, each lone surrogate replaced with U+FFFD (for model output)."""
    return text if storable(text) else _SURROGATE.sub("\ufffd", text.replace("\x00", ""))


def _client_id(frame: dict[str, Any]) -> str | None:
    value = frame.get("client_id")
    return value if isinstance(value, str) else None


def parse(text: str | None, size: int) -> ClientFrame:
    """Parse and validate one client frame of ``size`` bytes, or raise ProtocolError."""
    if text is None:
        raise ProtocolError(BAD_REQUEST, "Frames must be JSON text, not binary.")
    if size > settings.CHAT_MAX_FRAME_BYTES:
        raise ProtocolError(TOO_LARGE, f"Frame larger than {settings.CHAT_MAX_FRAME_BYTES} bytes.")
    try:
        frame = json.loads(text)
    except ValueError:
        raise ProtocolError(BAD_REQUEST, "Frame is not valid JSON.") from None
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, "Frame is nested too deeply.") from None
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_REQUEST, "Frame must be a JSON object.")
    kind = frame.get("type")
    if kind == "open":
        before = _id(frame, "before", nullable=True) if "before" in frame else None
        return Open(_id(frame, "conversation_id"), before)
    if kind == "send":
        client_id = frame.get("client_id")
        try:
            client_id = str(uuid.UUID(client_id))
        except (TypeError, ValueError, AttributeError):
            raise ProtocolError(BAD_REQUEST, "`client_id` must be a UUID string.") from None
        frame = {**frame, "client_id": client_id}  # errors name it as an ack would
        content = frame.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ProtocolError(BAD_REQUEST, "`content` must be a non-empty string.", client_id)
        if not storable(content):
            raise ProtocolError(
                BAD_REQUEST, "`content` must be text without NUL characters or lone surrogates.", client_id
            )
        if len(content) > settings.CHAT_MAX_MESSAGE_CHARS:
            raise ProtocolError(
                TOO_LARGE, f"Message longer than {settings.CHAT_MAX_MESSAGE_CHARS} characters.", client_id
            )
        use_documents = frame.get("use_documents")
        if use_documents is not None and not isinstance(use_documents, bool):
            raise ProtocolError(BAD_REQUEST, "`use_documents` must be true, false or absent.", client_id)
        conversation_id = _id(frame, "conversation_id", nullable=True)
        replaces = _id(frame, "replaces", nullable=True) if "replaces" in frame else None
        if replaces is not None and conversation_id is None:
            raise ProtocolError(BAD_REQUEST, "An edit (`replaces`) needs its `conversation_id`.", client_id)
        return Send(conversation_id, client_id, content, use_documents, replaces)
    if kind == "stop":
        return Stop(_id(frame, "message_id"))
    if kind == "regenerate":
        return Regenerate(_id(frame, "message_id"))
    if not isinstance(kind, str):
        raise ProtocolError(BAD_REQUEST, "Frame needs a string `type`.", _client_id(frame))
    raise ProtocolError(BAD_REQUEST, f"Unknown frame type {kind!r}.", _client_id(frame))


# --- Server -> client frames ----------------------------------------------------------


def error(code: str, message: str, client_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


def ack(client_id: str, conversation_id: int, user_message_id: int, assistant_message_id: int) -> dict[str, Any]:
    return {
        "type": "ack",
        "client_id": client_id,
        "conversation_id": str(conversation_id),
        "user_message_id": str(user_message_id),
        "assistant_message_id": str(assistant_message_id),
    }


# The frames that tell how a reply is being written, each about one reply (``message_id``).
REPLY_FRAMES = frozenset({"chunk", "sources", "status", "done"})


def chunk(message_id: int, offset: int, delta: str) -> dict[str, Any]:
    return {"type": "chunk", "message_id": str(message_id), "offset": offset, "delta": delta}


def sources(message_id: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "sources", "message_id": str(message_id), "sources": items}


def status(message_id: int, state: str, **detail: Any) -> dict[str, Any]:
    """Progress before the first chunk (queued, warming up): an addition to v1."""
    return {"type": "status", "message_id": str(message_id), "state": state, **detail}


def done(
    message_id: int,
    status: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    error_code: str = "",
    error_message: str = "",
) -> dict[str, Any]:
    return {
        "type": "done",
        "message_id": str(message_id),
        "status": status,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "error": {"code": error_code, "message": error_message} if error_code else None,
    }


def done_for(msg: Any) -> dict[str, Any]:
    """The `done` frame of a finished Message row."""
    return done(msg.pk, msg.status, msg.prompt_tokens, msg.completion_tokens, msg.error_code, msg.error_message)


def message(msg: Any) -> dict[str, Any]:
    """A Message row as the protocol shows it (in `history` and `message` frames)."""
    return {
        "id": str(msg.pk),
        "role": msg.role,
        "content": msg.content,
        "status": msg.status,
        "created_at": msg.created_at.isoformat().replace("+00:00", "Z"),
        "sources": msg.sources or [],
        "reply_to": str(msg.reply_to_id) if msg.reply_to_id else None,
        # The user's own thumbs up (1) or down (-1), when the row was read with it (history).
        "feedback": getattr(msg, "my_rating", None),
        "model": msg.model,
        "error": {"code": msg.error_code, "message": msg.error_message} if msg.error_code else None,
    }


def message_frame(msg: Any) -> dict[str, Any]:
    """Tells the other sockets of a conversation about a new message (user message, or a reply just begun)."""
    return {"type": "message", "message": message(msg)}


def replaced(conversation_id: int, message_id: int) -> dict[str, Any]:
    """Tells the other sockets of a conversation that an edit took out this message and every later one."""
    return {"type": "replaced", "conversation_id": str(conversation_id), "message_id": str(message_id)}


def history(
    conversation: Any, messages: list[dict[str, Any]], more: bool = False, before: str | None = None
) -> dict[str, Any]:
    """The newest CHAT_HISTORY_PAGE messages (or, with ``before``, the page before that message);
    ``more``: earlier messages remain."""
    frame = {
        "type": "history",
        "conversation_id": str(conversation.pk),
        "title": conversation.title,
        "use_documents": conversation.use_documents,
        "messages": messages,
        "more": more,
    }
    if before is not None:
        frame["before"] = before
    return frame


def out_of_sync(conversation_id: int | None) -> dict[str, Any]:
    """The socket dropped frames of this conversation: the client re-sends `open` to re-sync."""
    frame = error(OUT_OF_SYNC, "Live updates of this conversation were interrupted; reloading it.")
    frame["conversation_id"] = str(conversation_id) if conversation_id is not None else None
    return frame


def conversation(conv: Any, deleted: bool = False) -> dict[str, Any]:
    """A conversation renamed or deleted, to every socket of its owner (an addition to v1)."""
    listed = {
        "id": str(conv.pk),
        "title": conv.title,
        "updated_at": conv.updated_at.isoformat().replace("+00:00", "Z"),
    }
    return {"type": "conversation", "conversation": listed, "deleted": deleted}


def document(doc: Any, stage: str = "", done: int = 0, total: int = 0) -> dict[str, Any]:
    """A document's state, pushed to its owner's sockets while it is ingested (an addition to v1).

    ``stage``: "queued", "processing", "parsed", "embedding" (``done`` of ``total`` chunks), "ready"
    or "failed"; ``document.status`` is the stored status of its latest upload; ``document.live``:
    a version of it is searched (the previous one while a new one is on its way, or failed).
    """
    return {
        "type": "document",
        "document": {
            "id": str(doc.pk),
            "title": doc.title,
            "status": doc.status,
            "live": bool(doc.live_hash),
            "chunk_count": doc.chunk_count,
            "error": doc.error or None,
        },
        "stage": stage or doc.status,
        "done": done,
        "total": total,
    }
