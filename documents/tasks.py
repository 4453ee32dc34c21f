"""Ingestion jobs: procrastinate tasks, stored in PostgreSQL, run by ``manage.py worker``.

Why procrastinate (over the django-tasks backport): it is a maintained queue
built on PostgreSQL alone (LISTEN/NOTIFY, so a job starts the moment it is
queued), and its workers send heartbeats, so a job whose worker died is found
(``get_stalled_jobs``) and run again; documents/services.ingest counts the
runs and fails a document whose runs keep dying.
"""

from __future__ import annotations

import logging

from django.db import transaction
from procrastinate import RetryStrategy
from procrastinate.contrib.django import app
from procrastinate.exceptions import AlreadyEnqueued

from documents import progress, services
from documents.models import Document

logger = logging.getLogger(__name__)
QUEUE = "documents"


# A run that raises (the database unreachable, so not even `failed` could be written) is tried again
# later; services.ingest counts the runs and ends the document after DOCUMENTS_MAX_ATTEMPTS.
@app.task(queue=QUEUE, name="documents.ingest", retry=RetryStrategy(max_attempts=5, wait=10))
def ingest_document(document_id: int) -> None:
    services.ingest(document_id, progress.publish)


def enqueue(document: Document) -> None:
    """Queue ``document``'s ingestion (in the caller's transaction). One job per document at a time:
    a document queued again before its job started keeps that one job, which reads the newest file.

    A fair share of the workers: the job's priority is minus the number of its owner's documents
    already queued, and workers take the highest priority first (then the oldest). So each user's
    first queued document comes before anyone's second, and one user's backlog of hundreds does
    not make the next user's upload wait behind it.
    """
    ahead = Document.objects.filter(owner_id=document.owner_id, status=Document.Status.QUEUED).exclude(pk=document.pk)
    try:
        # A savepoint: the refused insert of a second job must not abort the caller's transaction (which
        # then silently rolled back the new file it had registered).
        with transaction.atomic():
            ingest_document.configure(
                lock=f"document:{document.pk}", queueing_lock=f"document:{document.pk}", priority=-ahead.count()
            ).defer(document_id=document.pk)
    except AlreadyEnqueued:
        pass


async def retry_stalled_jobs(seconds_since_heartbeat: float) -> int:
    """Jobs whose worker stopped sending heartbeats (killed, machine gone) are queued again."""
    jobs = await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=seconds_since_heartbeat)
    for job in jobs:
        logger.warning("job %s (%s) lost its worker: queued again", job.id, job.task_kwargs)
        await app.job_manager.retry_job(job)
    return len(list(jobs))
