"""Ingestion into PostgreSQL: chunks with vectors and searchable text, re-ingestion, atomic replacement,
the commands, and who may see, upload, delete and follow which document."""

import contextlib
import hashlib
import html
import io
import json
import threading
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.postgres.search import SearchQuery
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from documents import flows, progress, quota, search, services
from documents.embedding import LOCAL_MODEL_NAME
from documents.models import EMBEDDING_DIMENSIONS, Chunk, Document, DocumentFile, Upload
from tests import document_files
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)

GUIDE = (
    b"# Pump manual\n\nThe pump moves water from the tank to the garden.\n\n"
    b"## Cleaning\n\nRinse the filter under warm water every week. Dry it before refitting.\n"
)


def ingest(owner, source: str, data: bytes, **kwargs) -> Document:
    with transaction.atomic():
        registered = services.register(owner, source, data, **kwargs)
    return services.ingest(registered.document.pk) if not registered.unchanged else registered.document


def test_a_document_is_stored_as_chunks_with_vectors_and_searchable_text(alice):
    document = ingest(alice, "pump.md", GUIDE)
    assert document.status == Document.Status.READY and document.error == ""
    assert document.title == "Pump manual"  # the document's own title, once parsed
    assert document.embedding_model == LOCAL_MODEL_NAME and document.embedding_dimensions == EMBEDDING_DIMENSIONS
    chunks = list(document.chunks.order_by("ordinal"))
    assert document.chunk_count == len(chunks) == 2
    assert chunks[1].heading == "Pump manual › Cleaning"
    assert all(len(c.embedding) == EMBEDDING_DIMENSIONS for c in chunks)
    assert chunks[1].token_count > 10
    text = document.file.text
    assert all(text[c.char_start : c.char_end] == c.text for c in chunks)
    # The tsvector is stemmed English: "rinsing filters" finds "Rinse the filter".
    found = Chunk.objects.filter(search=SearchQuery("rinsing filters", config="english"))
    assert list(found) == [chunks[1]]
    # The vector is the text's: the cleaning chunk is the nearer one to a cleaning question.
    from pgvector.django import CosineDistance

    from documents.embedding import get_embedder

    (question,) = get_embedder().embed(["how do I wash the filter?"])
    nearest = Chunk.objects.order_by(CosineDistance("embedding", question)).first()
    assert nearest == chunks[1]


def test_a_pdf_keeps_its_pages(alice):
    data = document_files.pdf([["Chapter one text about pumps."], ["Chapter two text about filters."]])
    document = ingest(alice, "manual.pdf", data)
    assert [(c.page, "filters" in c.text) for c in document.chunks.order_by("ordinal")] == [(1, False), (2, True)]


def test_reingesting_an_unchanged_file_does_nothing(alice):
    first = ingest(alice, "pump.md", GUIDE)
    ids = sorted(first.chunks.values_list("id", flat=True))
    with transaction.atomic():
        again = services.register(alice, "pump.md", GUIDE)
    assert again.unchanged and again.document.pk == first.pk
    assert sorted(Chunk.objects.filter(document=first).values_list("id", flat=True)) == ids
    assert Document.objects.count() == 1


# --- versions: the live one is searched and cited, whole, until a new one is stored -----------------

MANUAL = b"# Pump manual\n\n## Seals\n\nWhen the pump leaks at the front, replace the seal with part A-17.\n"
SECOND_EDITION = (
    b"# Pump manual, second edition\n\n## Seals\n\nWhen the pump leaks at the front, fit the new seal C-55.\n"
)
SEAL_QUESTION = "which part replaces the leaking pump seal?"


def found(user, question: str = SEAL_QUESTION) -> list[search.Hit]:
    """What a turn of ``user`` retrieves: the real scope, embedding, retrieval and rerank."""
    return search.pipeline(search.scope(user.pk), question, search.Query(), 10)


def retrieved(user, question: str = SEAL_QUESTION) -> list[dict]:
    """What ``manage.py retrieve --user`` prints for ``question``."""
    out = io.StringIO()
    call_command("retrieve", question, "--user", user.username, "--json", "-k", "10", stdout=out, stderr=io.StringIO())
    return json.loads(out.getvalue())


def cited(client, user, hit: search.Hit) -> dict:
    """The passage view for a hit, as the page opens a citation."""
    client.force_login(user)
    response = client.get(f"/documents/{hit.document_id}/passage/?start={hit.char_start}&end={hit.char_end}")
    assert response.status_code == 200
    return response.json()


def assert_old_version_in_use(client, user, document_id: int, title: str = "Pump manual") -> None:
    """Search, ``retrieve`` and the passage view all see the first edition, and only it."""
    hits = found(user)
    assert hits and {h.document_id for h in hits} == {document_id}
    texts = " ".join(h.text for h in hits)
    assert "A-17" in texts and "C-55" not in texts
    assert {h.title for h in hits} == {title}
    printed = retrieved(user)
    assert any("A-17" in row["text"] for row in printed) and not any("C-55" in row["text"] for row in printed)
    seal = next(h for h in hits if "A-17" in h.text)
    passage = cited(client, user, seal)
    assert passage["passage"] == seal.text and passage["title"] == title


def test_while_a_new_version_is_queued_or_processing_the_old_one_is_searched_and_cited(client, alice, monkeypatch):
    first = ingest(alice, "manual.md", MANUAL)
    old_ids = sorted(first.chunks.values_list("id", flat=True))
    with transaction.atomic():
        registered = services.register(alice, "manual.md", SECOND_EDITION)
    assert registered.queued and registered.document.status == Document.Status.QUEUED
    assert_old_version_in_use(client, alice, first.pk)
    page = client.get("/documents/").content.decode()
    assert "The previous version is used until this one is ready." in page

    # While the new version is being embedded, the old one is still whole, searched and cited.
    embedding, release = threading.Event(), threading.Event()
    real_exec = flows.Embed.exec

    def slow_exec(self, prep_res):
        embedding.set()
        release.wait(30)
        return real_exec(self, prep_res)

    monkeypatch.setattr(flows.Embed, "exec", slow_exec)
    runner = threading.Thread(target=services.ingest, args=(first.pk,))
    runner.start()
    try:
        assert embedding.wait(10)
        assert Document.objects.get(pk=first.pk).status == Document.Status.PROCESSING
        assert_old_version_in_use(client, alice, first.pk)
        assert sorted(Chunk.objects.filter(document=first).values_list("id", flat=True)) == old_ids
    finally:
        release.set()
        runner.join(30)

    # Stored: only the new version is found, cited in its own text, under its own title.
    document = Document.objects.get(pk=first.pk)
    assert document.status == Document.Status.READY and document.live_hash == document.content_hash
    assert document.title == "Pump manual, second edition"
    hits = found(alice)
    texts = " ".join(h.text for h in hits)
    assert "C-55" in texts and "A-17" not in texts
    printed = retrieved(alice)
    assert any("C-55" in row["text"] for row in printed) and not any("A-17" in row["text"] for row in printed)
    seal = next(h for h in hits if "C-55" in h.text)
    passage = cited(client, alice, seal)
    assert passage["passage"] == seal.text and passage["title"] == "Pump manual, second edition"
    assert "A-17" not in passage["before"] + passage["passage"] + passage["after"]
    assert not Chunk.objects.filter(id__in=old_ids).exists()


def _broken_file(alice, client, settings) -> None:
    with transaction.atomic():
        services.register(alice, "manual.pdf", b"%PDF-1.4 broken over a working one")
    services.ingest(Document.objects.get(source="manual.pdf").pk)


def _too_large(alice, client, settings) -> None:
    # Sent past the page's own check: the server refuses it without storing it.
    settings.DOCUMENTS_MAX_UPLOAD_BYTES = 5_000
    client.force_login(alice)
    response = client.post("/documents/upload/", {"files": [SimpleUploadedFile("manual.pdf", b"%PDF" + b"x" * 6_000)]})
    assert response.status_code == 200 and response.json()["documents"][0]["document"]["live"] is True


def _gave_up(alice, client, settings) -> None:
    second = document_files.pdf([["When the pump leaks at the front, fit the new seal C-55."]])
    with transaction.atomic():
        document = services.register(alice, "manual.pdf", second).document
    # Its runs died (workers killed) DOCUMENTS_MAX_ATTEMPTS times.
    Document.objects.filter(pk=document.pk).update(
        status=Document.Status.PROCESSING, attempts=settings.DOCUMENTS_MAX_ATTEMPTS
    )
    services.ingest(document.pk)


@pytest.mark.parametrize(
    ("new_version", "reason"),
    [(_broken_file, "damaged"), (_too_large, "the limit is"), (_gave_up, "stopped 3 times")],
    ids=["broken file", "too large", "gave up after its attempts"],
)
def test_a_new_version_that_fails_leaves_the_old_one_as_it_was(client, alice, settings, new_version, reason):
    from procrastinate.contrib.django.models import ProcrastinateJob

    settings.DOCUMENTS_MAX_ATTEMPTS = 3
    good = document_files.pdf([["Pump manual"], ["When the pump leaks at the front, replace the seal with part A-17."]])
    first = ingest(alice, "manual.pdf", good)
    assert first.title == "manual"  # a PDF without a title of its own: its name
    before = Document.objects.get(pk=first.pk)
    chunks = list(Chunk.objects.filter(document=first).order_by("ordinal").values_list("id", "text", "embedding"))
    text = DocumentFile.objects.get(pk=first.pk).text

    new_version(alice, client, settings)

    document = Document.objects.get(pk=first.pk)
    assert document.status == Document.Status.FAILED and reason in document.error
    # The live version exactly as it was: its chunks (ids, text, vectors), text, title, counts.
    assert document.live_hash == before.live_hash != ""
    after = list(Chunk.objects.filter(document=first).order_by("ordinal").values_list("id", "text", "embedding"))
    assert [(i, t, list(v)) for i, t, v in after] == [(i, t, list(v)) for i, t, v in chunks]
    assert DocumentFile.objects.get(pk=first.pk).text == text
    assert (document.title, document.chunk_count, document.embedding_model, document.size) == (
        before.title,
        before.chunk_count,
        before.embedding_model,
        before.size,
    )
    assert_old_version_in_use(client, alice, first.pk, title="manual")
    # The page shows the failure beside the version still in use.
    page = client.get("/documents/").content.decode()
    assert "New version failed" in page
    assert f"The new version failed: {html.escape(document.error)} The previous version is still used." in page

    # The working file again: back to it at once, no job, nothing to ingest.
    jobs = ProcrastinateJob.objects.filter(task_name="documents.ingest").count()
    with transaction.atomic():
        again = services.register(alice, "manual.pdf", good)
    assert again.unchanged and not again.queued
    document.refresh_from_db()
    assert (document.status, document.error, document.content_hash) == (Document.Status.READY, "", before.live_hash)
    assert ProcrastinateJob.objects.filter(task_name="documents.ingest").count() == jobs


@contextlib.contextmanager
def failing_trigger(table: str, event: str, condition: str):
    """Make the real statement on ``table`` fail inside Store's transaction, as a full disk would;
    the error says how many chunks the document had at that moment (in that transaction)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'disk full after % chunks', "
            "(SELECT count(*) FROM documents_chunk WHERE document_id = NEW.document_id); END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER test_disk_full BEFORE {event} ON {table} FOR EACH ROW "
            f"WHEN ({condition}) EXECUTE FUNCTION test_disk_full()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER test_disk_full ON {table}")
            cursor.execute("DROP FUNCTION test_disk_full()")


@pytest.mark.parametrize(
    ("table", "event", "condition", "chunks_then"),
    [
        ("documents_chunk", "INSERT", "NEW.ordinal = 1", 1),  # the second batch of inserts
        ("documents_documentfile", "UPDATE", "NEW.text IS DISTINCT FROM OLD.text", 3),  # every chunk written
    ],
    ids=["second insert batch", "extracted text"],
)
def test_a_store_that_fails_half_way_leaves_the_live_version_whole(
    client, alice, monkeypatch, caplog, table, event, condition, chunks_then
):
    first = ingest(alice, "pump.md", GUIDE)
    old = list(Chunk.objects.filter(document=first).order_by("ordinal").values_list("id", "text"))
    old_text = DocumentFile.objects.get(pk=first.pk).text
    with transaction.atomic():
        services.register(alice, "pump.md", GUIDE + b"\n## Storage\n\nKeep the pump dry over winter.\n")
    monkeypatch.setattr(flows, "STORE_BATCH", 1)  # one chunk per INSERT: the failure lands between batches
    with failing_trigger(table, event, condition):
        document = services.ingest(first.pk)
    # Store had deleted the old chunks and written some new ones when the database failed...
    assert f"disk full after {chunks_then} chunks" in caplog.text
    # ...and its transaction took all of it back: the live version is the same rows, still searched.
    assert document.status == Document.Status.FAILED and "unexpectedly" in document.error
    assert list(Chunk.objects.filter(document=first).order_by("ordinal").values_list("id", "text")) == old
    assert DocumentFile.objects.get(pk=first.pk).text == old_text
    assert document.chunk_count == 2 and document.live_hash != document.content_hash
    hits = found(alice, "how do I clean the filter?")
    assert "Rinse the filter" in hits[0].text and not any("winter" in h.text for h in hits)
    assert cited(client, alice, hits[0])["passage"] == hits[0].text


def wait_for_lock_wait(sql_start: str) -> None:
    """Until a backend whose statement matches ``sql_start`` (a regex) waits on a lock (the race is forced)."""
    for _ in range(400):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ~ %s",
                ["^" + sql_start],
            )
            if cursor.fetchone()[0]:
                return
        time.sleep(0.05)
    raise AssertionError(f"no backend waited on a lock in {sql_start!r}")


def test_an_upload_during_a_store_waits_for_it_and_keeps_the_version_it_stored(alice):
    ingest(alice, "manual.md", MANUAL)
    with transaction.atomic():
        document = services.register(alice, "manual.md", SECOND_EDITION).document
    third = SECOND_EDITION.replace(b"C-55", b"D-80")
    locked, release = threading.Event(), threading.Event()

    def hold_the_file_row() -> None:  # so Store stops half-way, holding the document's row
        try:
            with transaction.atomic():
                DocumentFile.objects.select_for_update().filter(pk=document.pk).get()
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    def run(target, *args) -> threading.Thread:
        def body() -> None:
            try:
                target(*args)
            finally:
                connection.close()

        thread = threading.Thread(target=body)
        thread.start()
        return thread

    def register_third() -> None:
        with transaction.atomic():
            services.register(alice, "manual.md", third)

    holder = run(hold_the_file_row)
    assert locked.wait(10)
    try:
        storing = run(services.ingest, document.pk)
        wait_for_lock_wait('UPDATE "documents_documentfile"')  # Store, inside its transaction
        uploading = run(register_third)
        wait_for_lock_wait('(SELECT|UPDATE) "documents_document"')  # the upload, waiting for Store's row lock
    finally:
        release.set()
        holder.join(30)
    storing.join(30)
    uploading.join(30)
    document.refresh_from_db()
    # The second edition was stored and is live; the third waits for its own run.
    assert document.live_hash == hashlib.sha256(SECOND_EDITION).hexdigest()
    assert document.content_hash == hashlib.sha256(third).hexdigest() and document.status == Document.Status.QUEUED
    assert document.title == "Pump manual, second edition" and document.chunk_count == document.chunks.count()
    texts = " ".join(h.text for h in found(alice))
    assert "C-55" in texts and "A-17" not in texts and "D-80" not in texts


def test_a_document_without_a_live_version_is_never_searched_even_with_chunk_rows(client, alice):
    with transaction.atomic():
        document = services.register(alice, "manual.md", MANUAL).document
    _stray_rows(document)  # as a run of older code could leave them: rows of no version
    assert not search.scope(alice.pk)
    assert found(alice) == []
    client.force_login(alice)
    assert client.get(f"/documents/{document.pk}/passage/?start=0&end=10").status_code == 404


def test_fail_removes_the_rows_of_a_first_version_that_fails(alice):
    with transaction.atomic():
        document = services.register(alice, "manual.pdf", b"%PDF-1.4 broken").document
    _stray_rows(document)
    ended = services.ingest(document.pk)
    assert ended.status == Document.Status.FAILED and "damaged" in ended.error
    assert Chunk.objects.filter(document=document).count() == 0 and ended.chunk_count == 0
    assert DocumentFile.objects.get(pk=document.pk).text == ""


def _stray_rows(document: Document) -> None:
    from documents.embedding import get_embedder

    text = "When the pump leaks at the front, replace the seal with part A-17."
    (vector,) = get_embedder().embed([text])
    Chunk.objects.create(
        document=document, ordinal=0, text=text, token_count=15, char_start=0, char_end=len(text), embedding=vector
    )
    DocumentFile.objects.filter(pk=document.pk).update(text=text)
    Document.objects.filter(pk=document.pk).update(chunk_count=1, embedding_model=LOCAL_MODEL_NAME)


def test_a_document_whose_runs_keep_dying_fails_instead_of_staying_processing(alice, settings):
    settings.DOCUMENTS_MAX_ATTEMPTS = 2
    with transaction.atomic():
        document = services.register(alice, "pump.md", GUIDE).document
    # Two runs began (a worker died in each) and never finished.
    Document.objects.filter(pk=document.pk).update(status=Document.Status.PROCESSING, attempts=2)
    ended = services.ingest(document.pk)
    assert ended.status == Document.Status.FAILED
    assert "stopped 2 times" in ended.error


def test_a_run_that_breaks_outside_its_steps_ends_failed_not_processing(alice):
    with transaction.atomic():
        document = services.register(alice, "pump.md", GUIDE).document
    DocumentFile.objects.filter(document=document).delete()  # Parse cannot even load its input
    ended = services.ingest(document.pk)
    assert ended.status == Document.Status.FAILED and "unexpectedly" in ended.error
    assert Document.objects.get(pk=document.pk).status == Document.Status.FAILED


def test_files_that_cannot_be_ingested_fail_with_a_reason_and_the_others_are_ingested(alice, tmp_path, settings):
    settings.DOCUMENTS_MAX_UPLOAD_BYTES = 50_000
    (tmp_path / "good.md").write_bytes(GUIDE)
    (tmp_path / "good.pdf").write_bytes(document_files.pdf([["A fine page of text."]]))
    (tmp_path / "corrupt.pdf").write_bytes(b"%PDF-1.4 broken")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "secret.pdf").write_bytes(document_files.pdf([["x"]], password="pw"))
    (tmp_path / "huge.txt").write_bytes(b"a" * 60_000)
    (tmp_path / "junk.html").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")  # not a supported type: skipped by the walk
    out, err = io.StringIO(), io.StringIO()
    call_command("ingest", str(tmp_path), "--user", "alice", stdout=out, stderr=err)
    by_name = {d.source.rsplit("/", 1)[1]: d for d in Document.objects.all()}
    assert set(by_name) == {"good.md", "good.pdf", "corrupt.pdf", "empty.txt", "secret.pdf", "huge.txt", "junk.html"}
    assert {n for n, d in by_name.items() if d.status == Document.Status.READY} == {"good.md", "good.pdf"}
    reasons = {n: d.error for n, d in by_name.items() if d.status == Document.Status.FAILED}
    assert "damaged" in reasons["corrupt.pdf"] and "empty" in reasons["empty.txt"]
    assert "password" in reasons["secret.pdf"] and "limit is" in reasons["huge.txt"]
    assert "binary" in reasons["junk.html"]
    assert all(d.chunks.count() == 0 for d in by_name.values() if d.status == Document.Status.FAILED)
    for name in reasons:
        assert f"{name}: " in err.getvalue()  # each failure reported with its reason
    assert "7 files: 2 ingested" in out.getvalue() and "5 failed" in out.getvalue()
    # Again: nothing changed, nothing done.
    out = io.StringIO()
    call_command("ingest", str(tmp_path / "good.md"), str(tmp_path / "good.pdf"), "--user", "alice", stdout=out)
    assert "2 unchanged" in out.getvalue()


def test_ingest_shared_makes_documents_without_owner(tmp_path):
    (tmp_path / "faq.txt").write_bytes(b"Opening hours are nine to five.")
    call_command("ingest", str(tmp_path), "--shared", stdout=io.StringIO(), stderr=io.StringIO())
    (document,) = Document.objects.all()
    assert document.owner is None and document.status == Document.Status.READY


def test_a_remote_embedding_endpoint_is_used_when_configured(alice, settings, llm_server):
    settings.EMBEDDING_BASE_URL = llm_server.base_url
    settings.EMBEDDING_MODEL = "test-embedder"
    document = ingest(alice, "pump.md", GUIDE)
    assert document.status == Document.Status.READY
    assert document.embedding_model == "test-embedder"
    asked = [r for r in llm_server.requests if r.get("model") == "test-embedder"][-1]
    assert asked["dimensions"] == EMBEDDING_DIMENSIONS and len(asked["input"]) == 2


def test_a_change_of_model_is_detected_and_reembed_fixes_it(alice, settings, llm_server):
    from django.core import checks

    document = ingest(alice, "pump.md", GUIDE)
    before = list(document.chunks.order_by("ordinal").values_list("embedding", flat=True))
    settings.EMBEDDING_BASE_URL, settings.EMBEDDING_MODEL = llm_server.base_url, "test-embedder"
    warnings = [m for m in checks.run_checks(databases=["default"]) if m.id == "documents.W001"]
    assert len(warnings) == 1 and "reembed" in warnings[0].hint
    # The same file is not "unchanged" under another model: registering it queues it again.
    with transaction.atomic():
        assert not services.register(alice, "pump.md", GUIDE).unchanged
    Document.objects.filter(pk=document.pk).update(status=Document.Status.READY)
    call_command("reembed", stdout=io.StringIO(), stderr=io.StringIO())
    document.refresh_from_db()
    assert document.embedding_model == "test-embedder"
    after = list(document.chunks.order_by("ordinal").values_list("embedding", flat=True))
    assert len(after) == len(before) and all(list(a) != list(b) for a, b in zip(after, before, strict=False))
    assert not [m for m in checks.run_checks(databases=["default"]) if m.id == "documents.W001"]


# --- HTTP: the documents page, upload and delete ------------------------------------------------


def test_upload_stores_and_queues_each_file_and_refuses_bad_ones_with_reasons(client, alice, settings):
    from procrastinate.contrib.django.models import ProcrastinateJob

    settings.DOCUMENTS_MAX_UPLOAD_BYTES = 10_000
    client.force_login(alice)
    files = [
        ("pump.md", GUIDE),
        ("notes.txt", b"Meeting at noon."),
        ("big.txt", b"x" * 20_000),
        ("tool.exe", b"MZ"),
    ]
    response = client.post("/documents/upload/", {"files": [SimpleUploadedFile(n, d) for n, d in files]})
    assert response.status_code == 200
    rows = {r["document"]["title"]: r for r in response.json()["documents"]}
    assert rows["pump.md"]["document"]["status"] == "queued"
    assert rows["notes.txt"]["document"]["status"] == "queued"
    assert rows["big.txt"]["document"]["status"] == "failed" and "limit" in rows["big.txt"]["document"]["error"]
    assert (
        rows["tool.exe"]["document"]["status"] == "failed" and "not supported" in rows["tool.exe"]["document"]["error"]
    )
    queued = Document.objects.filter(status=Document.Status.QUEUED)
    jobs = ProcrastinateJob.objects.filter(task_name="documents.ingest", status="todo")
    assert sorted(j.args["document_id"] for j in jobs) == sorted(d.pk for d in queued)
    # The same file again: unchanged, no second job.
    response = client.post("/documents/upload/", {"files": [SimpleUploadedFile("pump.md", GUIDE)]})
    assert response.json()["documents"][0]["unchanged"] is True
    assert jobs.count() == 2
    page = client.get("/documents/").content.decode()
    assert "pump.md" in page and "not supported" in page and "up to 9.8\xa0KB per file" in page


def upload(client, user, *files: tuple[str, bytes]):
    client.force_login(user)
    return client.post("/documents/upload/", {"files": [SimpleUploadedFile(n, d) for n, d in files]})


def test_the_daily_upload_quota_counts_new_files_and_says_when_there_is_room(client, alice, bob, settings):
    from procrastinate.contrib.django.models import ProcrastinateJob

    settings.DOCUMENTS_QUOTA_FILES_PER_DAY, settings.DOCUMENTS_QUOTA_BYTES_PER_DAY = 2, 0
    before = ProcrastinateJob.objects.aggregate(last=Max("id"))["last"] or 0
    response = upload(client, alice, ("a.txt", b"Note A."), ("b.txt", b"Note B."), ("c.txt", b"Note C."))
    assert response.status_code == 429
    answer = response.json()
    # The first two are stored and queued; the third is refused, and nothing of it is kept.
    assert [row["document"]["title"] for row in answer["documents"]] == ["a.txt", "b.txt"]
    assert "upload quota (2 files a day)" in answer["error"] and "UTC" in answer["error"]
    assert 86_000 < int(response.headers["Retry-After"]) <= 86_400 and answer["retry_after"] > 86_000
    assert sorted(Document.objects.values_list("source", flat=True)) == ["a.txt", "b.txt"]
    jobs = ProcrastinateJob.objects.filter(id__gt=before)  # the queue's tables outlive each test
    assert sorted(job.args["document_id"] for job in jobs) == sorted(Document.objects.values_list("pk", flat=True))
    # Unchanged bytes cost nothing, nor does a file refused unread; a changed one is refused.
    assert upload(client, alice, ("a.txt", b"Note A.")).json()["documents"][0]["unchanged"] is True
    assert upload(client, alice, ("tool.exe", b"MZ")).status_code == 200
    assert upload(client, alice, ("a.txt", b"Note A, changed.")).status_code == 429
    assert Document.objects.get(source="a.txt").content_hash == hashlib.sha256(b"Note A.").hexdigest()
    # Another user has a quota of their own.
    assert upload(client, bob, ("a.txt", b"Bob's note.")).status_code == 200
    # A day later, alice's first upload has left the window: room for one more.
    first = Upload.objects.filter(owner=alice).order_by("created_at").first()
    Upload.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(days=1, seconds=1))
    assert upload(client, alice, ("c.txt", b"Note C.")).status_code == 200
    assert upload(client, alice, ("d.txt", b"Note D.")).status_code == 429


def test_the_daily_upload_quota_counts_bytes(client, alice, settings):
    settings.DOCUMENTS_QUOTA_FILES_PER_DAY, settings.DOCUMENTS_QUOTA_BYTES_PER_DAY = 0, 100
    assert upload(client, alice, ("a.txt", b"a" * 60)).status_code == 200
    response = upload(client, alice, ("b.txt", b"b" * 60))
    assert response.status_code == 429 and "100\xa0bytes a day" in response.json()["error"]
    response = upload(client, alice, ("c.txt", b"c" * 101))
    assert response.status_code == 429 and "bigger than your upload quota" in response.json()["error"]
    assert "Retry-After" not in response.headers  # it never fits
    assert upload(client, alice, ("d.txt", b"d" * 40)).status_code == 200
    page = client.get("/documents/").content.decode()
    assert "You may upload up to 100\xa0bytes a day." in page


def test_two_uploads_of_one_user_at_once_are_counted_one_after_the_other(client, alice, settings):
    settings.DOCUMENTS_QUOTA_FILES_PER_DAY = 1
    counted, release = threading.Event(), threading.Event()

    def another_process_uploads() -> None:
        # Counts alice's upload and holds its transaction open, as a slow upload would.
        try:
            with transaction.atomic():
                quota.charge(alice, 10)
                counted.set()
                release.wait(20)
        finally:
            connection.close()

    other = threading.Thread(target=another_process_uploads)
    other.start()
    answers: list = []
    try:
        assert counted.wait(10)
        mine = threading.Thread(target=lambda: answers.append(upload(client, alice, ("a.txt", b"Note A."))))
        mine.start()
        # This upload's backend waits for the other's quota lock (so it cannot count past it).
        for _ in range(200):
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND wait_event = 'advisory' AND query LIKE %s",
                    ["%pg_advisory_xact_lock%"],
                )
                if cursor.fetchone()[0]:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the second upload never waited on the quota lock")
    finally:
        release.set()
        other.join(20)
    mine.join(20)
    assert answers[0].status_code == 429
    assert Upload.objects.filter(owner=alice).count() == 1 and not Document.objects.exists()


def test_a_second_users_document_is_taken_before_the_first_users_backlog(client, alice, bob):
    from procrastinate.contrib.django.models import ProcrastinateEvent

    backlog = [(f"note-{i}.txt", f"Note {i}: water the plants on day {i}.".encode()) for i in range(4)]
    assert upload(client, alice, *backlog).status_code == 200
    assert upload(client, bob, ("bob.txt", b"Bob waters the lawn.")).status_code == 200
    call_command("worker", "--once", stdout=io.StringIO(), stderr=io.StringIO())  # the real queue, one job at a time
    owner_of = dict(Document.objects.values_list("pk", "owner__username"))
    started = ProcrastinateEvent.objects.filter(type="started").order_by("at", "id").select_related("job")
    # (The queue's tables outlive each test: jobs of earlier tests' documents are left out.)
    owners = [owner_of[e.job.args["document_id"]] for e in started if e.job.args["document_id"] in owner_of]
    assert owners == ["alice", "bob", "alice", "alice", "alice"]
    assert set(Document.objects.values_list("status", flat=True)) == {Document.Status.READY}


def test_documents_are_private_over_http(client, alice, bob):
    mine = ingest(alice, "alice-secret.md", b"# Alice plans\n\nThe launch is in May.")
    client.force_login(bob)
    assert "alice-secret" not in client.get("/documents/").content.decode()
    assert client.post(f"/documents/{mine.pk}/delete/").status_code == 404
    assert Document.objects.filter(pk=mine.pk).exists()
    client.logout()
    assert client.get("/documents/").status_code == 302  # to the login page
    assert client.post("/documents/upload/").status_code == 302
    client.force_login(alice)
    assert client.post(f"/documents/{mine.pk}/delete/").status_code == 302
    assert not Document.objects.filter(pk=mine.pk).exists()
    assert Chunk.objects.count() == 0  # its chunks went with it


# --- WebSocket: live progress to the owner only ------------------------------------------------


async def test_progress_frames_reach_the_owners_sockets_and_nobody_elses(alice, bob):
    document = await sync_to_async(ingest)(alice, "pump.md", GUIDE)
    async with Client(alice) as mine, Client(bob) as theirs:
        await sync_to_async(progress.publish)(document, "embedding", 1, 2)
        frame = await mine.recv()
        assert frame == {
            "type": "document",
            "document": {
                "id": str(document.pk),
                "title": "Pump manual",
                "status": "ready",
                "live": True,
                "chunk_count": 2,
                "error": None,
            },
            "stage": "embedding",
            "done": 1,
            "total": 2,
        }
        assert await theirs.nothing_more(0.5)


async def test_a_whole_ingestion_reports_each_stage_to_the_owner(alice):
    registered = await sync_to_async(services.register)(alice, "pump.md", GUIDE)
    async with Client(alice) as mine:
        await sync_to_async(services.ingest)(registered.document.pk, progress.publish)
        stages = []
        while not stages or stages[-1] not in ("ready", "failed"):
            stages.append((await mine.recv())["stage"])
    assert stages == ["processing", "parsed", "embedding", "embedding", "ready"]


def test_admin_lists_documents_with_their_state_and_links_to_their_chunks(client, django_user_model, alice):
    document = ingest(alice, "pump.md", GUIDE)
    admin = django_user_model.objects.create_superuser("root", password="pw-root-123")
    client.force_login(admin)
    listing = client.get("/admin/documents/document/?status__exact=ready").content.decode()
    assert "Pump manual" in listing
    page = client.get(f"/admin/documents/document/{document.pk}/change/").content.decode()
    assert f"?document__id__exact={document.pk}" in page and "2 chunks" in page
    chunks = client.get(f"/admin/documents/chunk/?document__id__exact={document.pk}").content.decode()
    assert "Pump manual › Cleaning" in chunks


def test_the_versions_migration_keeps_what_was_searched_and_what_was_not(alice):
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("documents", "0001_initial")], [("documents", "0002_versions_and_upload_quota")]
    MigrationExecutor(connection).migrate(before)
    try:
        old = MigrationExecutor(connection).loader.project_state(before).apps
        OldDocument, OldFile, OldChunk = (old.get_model("documents", m) for m in ("Document", "DocumentFile", "Chunk"))  # noqa: N806

        def make(source: str, status: str, chunks: int):
            document = OldDocument.objects.create(
                owner_id=alice.pk, title=source, source=source, mime_type="text/plain", size=10,
                content_hash=hashlib.sha256(source.encode()).hexdigest(),
                status=status, chunk_count=chunks, embedding_model=LOCAL_MODEL_NAME,
            )  # fmt: skip
            OldFile.objects.create(document=document, data=b"x", text="" if status != "ready" else "Old text.")
            for ordinal in range(chunks):
                OldChunk.objects.create(
                    document=document, ordinal=ordinal, text="Old text.", token_count=2, char_start=0, char_end=9,
                    embedding=[0.1] * EMBEDDING_DIMENSIONS,
                )  # fmt: skip
            return document.pk

        ready = make("ready.txt", "ready", 1)
        # A re-upload under the old code: its old chunks hidden, its text already blanked.
        requeued = make("requeued.txt", "queued", 1)
        failed = make("failed.txt", "failed", 0)
    finally:
        MigrationExecutor(connection).migrate(after)
    live = dict(Document.objects.values_list("pk", "live_hash"))
    assert live == {ready: hashlib.sha256(b"ready.txt").hexdigest(), requeued: "", failed: ""}
    assert search.scope(alice.pk).document_ids == [ready]  # searched before, and only it


def test_a_file_uploaded_again_while_its_first_job_waits_is_saved(client, alice):
    """The second upload's job is refused (one job per document, which reads the newest file): that refusal
    must not roll back the new file with it (it did, and the page still said "queued")."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from procrastinate.contrib.django.models import ProcrastinateJob

    client.force_login(alice)
    for text in (GUIDE, GUIDE + b"\n## Winter\n\nEmpty the pump before the first frost.\n"):
        assert client.post("/documents/upload/", {"files": SimpleUploadedFile("pump.md", text)}).status_code == 200
    document = Document.objects.get(owner=alice)
    assert bytes(document.file.data) == text
    jobs = ProcrastinateJob.objects.filter(args__document_id=document.pk)
    assert jobs.count() == 1
    with connection.cursor() as cursor:  # procrastinate's tables are not flushed: no job left for later tests
        cursor.execute("DELETE FROM procrastinate_jobs WHERE id = %s", [jobs.get().id])
