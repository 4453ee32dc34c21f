"""Live progress of a document's ingestion, to its owner's open sockets (the chat socket, any process)."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chat import protocol
from chat.replies import events
from documents.models import Document

logger = logging.getLogger(__name__)


def publish(document: Document, stage: str, done: int = 0, total: int = 0) -> None:
    """Tell the owner's sockets (synchronous: called from the ingestion flow's thread).

    Best effort: progress that cannot be sent is logged, never a reason to fail the document.
    Shared documents have no owner to tell.
    """
    if document.owner_id is None:
        return
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(
            events.user_group(document.owner_id), events.frames(protocol.document(document, stage, done, total))
        )
    except Exception:  # noqa: BLE001
        logger.warning("could not send progress of document %s", document.pk, exc_info=True)
