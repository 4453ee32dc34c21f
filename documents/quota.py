"""The daily upload quota: files and bytes a user may have ingested per 24 hours
(``DOCUMENTS_QUOTA_FILES_PER_DAY``, ``DOCUMENTS_QUOTA_BYTES_PER_DAY``; 0: no limit).

Counted in PostgreSQL, from the ``Upload`` rows of the last 24 hours, in the transaction that
stores the upload and under a per-user advisory lock: every process sees the same count, two
uploads of one user at once are counted one after the other, and an upload that is rolled back
(refused, or failing to store) is not counted. A sliding window, so no burst passes around a
clock edge. Only new versions count: unchanged bytes and files refused unread cost no work.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from documents.models import Upload

WINDOW = timedelta(days=1)
# The first key of this project's advisory locks on a user's upload quota (the second is the user's id).
QUOTA_LOCK = 0x444F4353  # "DOCS"


class Exceeded(Exception):
    """The upload would pass its owner's quota; the message says so and when there is room."""

    def __init__(self, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        #: Seconds until the upload fits (None: it never does, it is bigger than the quota).
        self.retry_after = retry_after


def charge(owner, size: int) -> None:
    """Count an upload of ``size`` bytes against ``owner``'s quota, or raise ``Exceeded``.

    Call it inside the transaction that stores the upload, so both commit or neither does.
    """
    files_limit = settings.DOCUMENTS_QUOTA_FILES_PER_DAY
    bytes_limit = settings.DOCUMENTS_QUOTA_BYTES_PER_DAY
    if not files_limit and not bytes_limit:
        return
    now = timezone.now()
    with connection.cursor() as cursor:
        # int4 keys: a user id past 2^31 shares its lock with another (they only wait for each other).
        cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [QUOTA_LOCK, owner.pk % 2**31])
    Upload.objects.filter(owner=owner, created_at__lte=now - WINDOW).delete()
    recent = list(Upload.objects.filter(owner=owner).order_by("created_at").values_list("created_at", "size"))

    def fits(files: int, used: int) -> bool:
        return (not files_limit or files + 1 <= files_limit) and (not bytes_limit or used + size <= bytes_limit)

    files, used = len(recent), sum(n for _, n in recent)
    if fits(files, used):
        Upload.objects.create(owner=owner, size=size, created_at=now)
        return
    room_at: datetime | None = None
    for created_at, n in recent:  # oldest first: each leaves the window in turn
        files, used = files - 1, used - n
        if fits(files, used):
            room_at = created_at + WINDOW
            break
    raise Exceeded(_message(files_limit, bytes_limit, room_at), _seconds(room_at, now))


def _message(files_limit: int, bytes_limit: int, room_at: datetime | None) -> str:
    limits = " and ".join(
        part
        for part in (
            f"{files_limit} files" if files_limit else "",
            filesizeformat(bytes_limit) if bytes_limit else "",
        )
        if part
    )
    if room_at is None:
        return f"This file is bigger than your upload quota ({limits} a day)."
    return (
        f"You have reached your upload quota ({limits} a day). "
        f"There is room for this file again at {room_at:%H:%M} UTC."
    )


def _seconds(room_at: datetime | None, now: datetime) -> int | None:
    return None if room_at is None else max(1, math.ceil((room_at - now).total_seconds()))
