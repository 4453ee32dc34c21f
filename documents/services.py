"""What the entry points (upload view, ``manage.py ingest``, the worker's task) do with documents.

A document is named by its owner and source (the upload's file name, or the
path given to ``ingest``); its content hash decides whether a new file with
the same name needs ingesting again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import PurePath

from django.conf import settings
from django.db import transaction

from documents import parsing
from documents.embedding import configured_model_name
from documents.flows import Progress, fail, ingestion_flow, new_store, no_progress
from documents.models import Document, DocumentFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registered:
    document: Document
    # Nothing to do: the same bytes are already ingested (or on their way) with the current embedder.
    unchanged: bool

    @property
    def queued(self) -> bool:
        """A new version waits for its ingestion run (its job is to be deferred)."""
        return not self.unchanged and self.document.status == Document.Status.QUEUED


def register(owner, source: str, data: bytes, *, size: int | None = None, force: bool = False) -> Registered:
    """Record ``data`` as the latest upload of the document ``source`` of ``owner`` (None: shared).

    The live version, if there is one, stays searched as it is until the new one is stored (its
    chunks, its text and its title are not touched here). A file that cannot be ingested at all
    (too big, a type we do not read) is recorded as failed at once, without its bytes; anything
    else is queued. ``size`` is the file's size when ``data`` was not read because the file is
    too big. Call it in a transaction with the job's enqueueing, so the job exists if and only if
    the new version waits for it.
    """
    size = len(data) if size is None else size
    refused = _refusal(source, size)
    content_hash = "" if refused else hashlib.sha256(data).hexdigest()
    with transaction.atomic():
        # Locked, as Store and Fail lock it: a version stored meanwhile is not overwritten by this save.
        existing = Document.objects.select_for_update().filter(owner=owner, source=source).first()
        if existing is not None and not force and content_hash:
            current_model = existing.embedding_model == configured_model_name()
            on_its_way = existing.status in (Document.Status.QUEUED, Document.Status.PROCESSING)
            if existing.content_hash == content_hash and (
                on_its_way or (existing.status == Document.Status.READY and current_model)
            ):
                return Registered(existing, unchanged=True)
            if existing.live_hash == content_hash and current_model:
                # The live version's bytes again: whatever came after it (queued, failed) is dropped.
                existing.content_hash = existing.live_hash
                existing.status, existing.error, existing.attempts = Document.Status.READY, "", 0
                existing.save(update_fields=["content_hash", "status", "error", "attempts", "updated_at"])
                DocumentFile.objects.filter(document=existing).update(data=data)
                return Registered(existing, unchanged=True)
        document = existing or Document(owner=owner, source=source)
        if not document.live_hash:  # the first version: the page shows the upload until it is parsed
            document.title = PurePath(source).name
            document.size = size
            document.mime_type = parsing.mime_type_for(source) or "application/octet-stream"
        # A run still busy with an older upload sees the hash change and stores nothing (flows.Store).
        document.content_hash = content_hash
        document.status, document.error, document.attempts = Document.Status.QUEUED, "", 0
        if refused:
            document.status, document.error = Document.Status.FAILED, refused
        if refused and not document.live_hash:
            document.chunk_count = 0
            document.save()
            document.chunks.all().delete()
            DocumentFile.objects.filter(document=document).delete()
        else:
            document.save()
            if not refused:
                # Only the bytes: the text is the live version's, which citations point into.
                DocumentFile.objects.update_or_create(document=document, defaults={"data": data})
    return Registered(document, unchanged=False)


def _refusal(source: str, size: int) -> str:
    """Why a file is refused before anything is stored, or ""."""
    if size > settings.DOCUMENTS_MAX_UPLOAD_BYTES:
        return f"The file is {size / 1e6:.1f} MB; the limit is {settings.DOCUMENTS_MAX_UPLOAD_BYTES / 1e6:.0f} MB."
    if parsing.mime_type_for(source) is None:
        suffix = PurePath(source).suffix or PurePath(source).name
        return f"“{suffix}” files are not supported: upload {parsing.SUPPORTED}."
    return ""


def ingest(document_id: int, progress: Progress = no_progress, timings: dict | None = None) -> Document | None:
    """Run the ingestion flow for a queued document; returns it as it ended (None: it was deleted).

    Each run counts as an attempt. A document whose runs keep dying (a worker
    killed mid-way, see documents/tasks.py) fails after DOCUMENTS_MAX_ATTEMPTS.
    """
    with transaction.atomic():
        document = Document.objects.select_for_update().filter(pk=document_id).first()
        if document is None or document.status not in (Document.Status.QUEUED, Document.Status.PROCESSING):
            return document
        if document.attempts >= settings.DOCUMENTS_MAX_ATTEMPTS:
            give_up = True
        else:
            give_up = False
            document.attempts += 1
            document.status = Document.Status.PROCESSING
            document.save(update_fields=["attempts", "status", "updated_at"])
    if give_up:
        logger.error("document %s: its ingestion stopped %s times; giving up", document.pk, document.attempts)
        ended = fail(document, f"Ingesting stopped {document.attempts} times before it finished; try again.")
        if ended is not None:
            progress(ended, "failed", 0, 0)
        return ended
    progress(document, "processing", 0, 0)
    shared = new_store(document, progress, timings)
    try:
        ingestion_flow().run(shared)
    except Exception:
        # The steps turn their own errors into Fail; this is the flow's plumbing failing (the
        # database gone mid-run, say). End the document now if the database lets us; if it does not,
        # the error goes up and the job is retried (documents/tasks.py), counting an attempt.
        logger.exception("document %s: ingestion failed outside its steps", document.pk)
        ended = fail(document, "Ingesting failed unexpectedly; try again or report it.")
        if ended is not None:
            progress(ended, "failed", 0, 0)
        return ended
    return shared["document"]
