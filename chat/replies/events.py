"""Every message that crosses the channel layer, built here and nowhere else.

Two kinds travel: events for the sockets of a conversation (handled by
``ChatConsumer``: ``chat.frame`` carries protocol frames, ``chat.snapshot``
answers a joining socket), and requests to a running reply (handled by the
``ControlDispatcher`` of the process that runs it: ``reply.stop``,
``reply.snapshot``).
"""

from __future__ import annotations

from typing import Any

# Socket-bound events (ChatConsumer.chat_frame / chat_snapshot).
FRAMES = "chat.frames"
SNAPSHOT = "chat.snapshot"
# Reply-bound requests (ControlDispatcher).
STOP = "reply.stop"
SNAPSHOT_REQUEST = "reply.snapshot"


def group_name(conversation_id: int | str) -> str:
    """The group every socket showing a conversation is in."""
    return f"chat.conversation.{conversation_id}"


def user_group(user_id: int | str) -> str:
    """The group every socket of one user is in, whatever conversation it shows, on any process:
    their documents' progress and their conversations' new titles go there, and only there."""
    return f"chat.user.{user_id}"


def frames(*items: dict[str, Any], exclude: str | None = None) -> dict[str, Any]:
    """Protocol frames for every socket of a group, in order, except the socket ``exclude``."""
    return {"type": FRAMES, "frames": list(items), "exclude": exclude}


def snapshot(message_id: int | str, content: str | None) -> dict[str, Any]:
    """The text so far of a streaming reply, for a joining socket; ``None``: ask the database."""
    return {"type": SNAPSHOT, "message_id": str(message_id), "content": content}


def stop_request(reply_id: int) -> dict[str, Any]:
    return {"type": STOP, "reply_id": reply_id}


def snapshot_request(reply_id: int, reply_channel: str) -> dict[str, Any]:
    return {"type": SNAPSHOT_REQUEST, "reply_id": reply_id, "reply_channel": reply_channel}
