"""Ingestion into PostgreSQL: chunks with vectors and searchable text, re-ingestion, atomic replacement,
the commands, and who may see, upload, delete and follow which document."""

import io
import threading

import pytest
from asgiref.sync import sync_to_async
from django.contrib.postgres.search import SearchQuery
from django.core.management import call_command
from django.db import connection, transaction

from documents import flows, progress, services
from documents.embedding import LOCAL_MODEL_NAME
from documents.models import EMBEDDING_DIMENSIONS, Chunk, Document
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


def test_a_changed_file_replaces_its_chunks_all_at_once(alice, monkeypatch):
    first = ingest(alice, "pump.md", GUIDE)
    old = set(first.chunks.values_list("text", flat=True))
    new_text = b"# Pump manual\n\nThe new pump is solar powered.\n"
    with transaction.atomic():
        services.register(alice, "pump.md", new_text)

    # While the new version is being embedded, the old one is still whole and searchable.
    embedding, release = threading.Event(), threading.Event()
    real_exec = flows.Embed.exec

    def slow_exec(self, prep_res):
        embedding.set()
        release.wait(10)
        return real_exec(self, prep_res)

    monkeypatch.setattr(flows.Embed, "exec", slow_exec)
    runner = threading.Thread(target=services.ingest, args=(first.pk,))
    runner.start()
    assert embedding.wait(10)
    assert set(Chunk.objects.filter(document=first).values_list("text", flat=True)) == old
    release.set()
    runner.join(20)
    texts = list(Chunk.objects.filter(document=first).values_list("text", flat=True))
    assert texts == ["The new pump is solar powered."]
    assert Document.objects.get(pk=first.pk).status == Document.Status.READY


def test_a_store_that_fails_half_way_leaves_no_half_document(alice, monkeypatch):
    first = ingest(alice, "pump.md", GUIDE)
    with transaction.atomic():
        services.register(alice, "pump.md", GUIDE + b"\n\nMore text here.\n", force=True)
    real_bulk_create = Chunk.objects.bulk_create

    def half_then_crash(objs, **kwargs):
        objs = list(objs)
        real_bulk_create(objs[:1], **kwargs)  # one chunk written...
        raise RuntimeError("disk full")  # ...then the database fails

    monkeypatch.setattr(Chunk.objects, "bulk_create", half_then_crash)
    document = services.ingest(first.pk)
    assert document.status == Document.Status.FAILED
    assert "unexpectedly" in document.error
    assert Chunk.objects.filter(document=first).count() == 0  # neither the half nor the old version
    assert document.chunk_count == 0


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
    from documents.models import DocumentFile

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
    from django.core.files.uploadedfile import SimpleUploadedFile

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
