"""System checks: vectors made by another embedding model than the configured one."""

from django.core import checks
from django.db import DatabaseError


@checks.register(checks.Tags.database)
def embedding_model_matches(app_configs, **kwargs) -> list[checks.CheckMessage]:
    from documents.embedding import configured_model_name
    from documents.models import Document

    try:
        stale = Document.objects.waiting_for_reembed().count()
    except DatabaseError:
        return []  # not migrated yet
    if not stale:
        return []
    return [
        checks.Warning(
            f"{stale} document(s) were embedded with another model than {configured_model_name()!r}: "
            "they are left out of search until re-embedded.",
            hint="Run `python manage.py reembed`.",
            id="documents.W001",
        )
    ]
