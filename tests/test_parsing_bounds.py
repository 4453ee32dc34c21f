"""The bounds on parsing a user's file, each alone: a zip bomb refused before anything is inflated,
the memory and the time bounds of the child process that parses, a PDF's page cap before its pages
load; and a worker that meets them and goes on with the next document."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command

from documents import sandbox
from documents.parsing import Limits, Unreadable, parse, parse_here
from tests import document_files
from tests.servers import login
from tests.test_documents_e2e import database, upload

BOMB_MB = 300  # of blank space in the body: 315 MB unpacked, ~340 KB packed


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return document_files.docx_bomb(BOMB_MB)


def without_archive_checks(settings) -> None:
    settings.DOCUMENTS_MAX_UNPACKED_BYTES = 10**13
    settings.DOCUMENTS_MAX_COMPRESSION_RATIO = 10**9


def long_pdf() -> bytes:
    """1,500 pages of text: legal, under the page cap, and ~15 s of pypdf's extract_text here."""
    lines = [f"Line {line} of the page, and a few more words." for line in range(40)]
    return document_files.pdf([[f"Page {page}.", *lines] for page in range(1500)])


def parsed_in_a_child(data: bytes, name: str) -> sandbox.Outcome:
    """The parse with memory and time to spare (4 GB, 2 min): only the archive checks can refuse a bomb."""
    return sandbox.run(parse_here, data, name, Limits.from_settings(), memory_mb=4096, seconds=120)


def test_a_zip_bomb_docx_is_refused_by_its_unpacked_size_before_anything_is_inflated(bomb, settings):
    settings.DOCUMENTS_MAX_COMPRESSION_RATIO = 10**9  # the total alone
    assert len(bomb) < 1_000_000
    outcome = parsed_in_a_child(bomb, "bomb.docx")
    reason = "The DOCX file unpacks to 315 MB; at most 100 MB are read: split it into smaller files."
    assert isinstance(outcome.error, Unreadable) and str(outcome.error) == reason
    assert outcome.peak_mb < 150  # inflating the body alone takes 315 MB (and python-docx ~640 MB)
    settings.DOCUMENTS_PARSE_MEMORY_MB = 4096
    with pytest.raises(Unreadable) as refused:
        parse(bomb, "bomb.docx")
    assert str(refused.value) == reason  # what the owner reads


def test_a_zip_bomb_docx_is_refused_by_its_compression_ratio_before_anything_is_inflated(settings):
    settings.DOCUMENTS_MAX_UNPACKED_BYTES = 10**13  # the ratio alone
    outcome = parsed_in_a_child(document_files.docx_bomb(BOMB_MB), "bomb.docx")
    assert isinstance(outcome.error, Unreadable)
    assert str(outcome.error).startswith("A part of the DOCX file (word/document.xml) is compressed ")
    assert "more than the 100 times allowed" in str(outcome.error)
    assert outcome.peak_mb < 150


def test_a_zip_whose_directory_understates_a_part_is_refused_without_inflating_it(bomb):
    # The directory says 2 kB (with a matching CRC): by its sizes the archive passes both checks,
    # and zipfile would inflate the whole 315 MB part before cutting it to 2 kB.
    forged = document_files.understated(bomb, "word/document.xml", 2000)
    outcome = parsed_in_a_child(forged, "forged.docx")
    reason = "The DOCX file is damaged: a part of it is not the size its archive says."
    assert isinstance(outcome.error, Unreadable) and str(outcome.error) == reason
    assert outcome.peak_mb < 150


def test_a_parse_that_needs_more_memory_than_its_bound_fails_with_that_reason(bomb, settings):
    without_archive_checks(settings)
    settings.DOCUMENTS_PARSE_MEMORY_MB = 300
    with pytest.raises(Unreadable) as refused:
        parse(bomb, "bomb.docx")
    assert str(refused.value) == "Reading the file needed more than 300 MB of memory: split it into smaller files."
    # This process is alive and well, and the next file parses.
    assert parse(b"The next file.", "next.txt").sections[0].text == "The next file."


def test_a_parse_slower_than_its_bound_is_stopped_at_its_deadline_with_that_reason(settings):
    data = long_pdf()
    settings.DOCUMENTS_PARSE_SECONDS = 3  # the child's CPU limit (its other bound) is 8 s: never first here
    parse(b"Started.", "warm.txt")  # the fork server is up: what follows is the parse's own time
    started = time.monotonic()
    with pytest.raises(Unreadable) as refused:
        parse(data, "long.pdf")
    assert str(refused.value) == "Reading the file took longer than 3 s: split it into smaller files."
    assert time.monotonic() - started < 7  # stopped at its deadline, not when the extraction ended (15 s+)
    assert parse(b"The next file.", "next.txt").sections[0].text == "The next file."


def spin(pid_file: str) -> None:
    """Busy for ever (run in a sandbox child): says where it is first."""
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_whose_caller_died_ends_at_its_cpu_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    # A caller that dies (SIGKILL) before its 3 s deadline: nobody is left to end its child at the deadline.
    caller = subprocess.Popen(
        [sys.executable, "-c", f"from documents import sandbox; from tests.test_parsing_bounds import spin; "
         f"sandbox.run(spin, {str(pid_file)!r}, memory_mb=512, seconds=3)"],
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and caller.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
        caller.kill()
        caller.wait()
        killed = time.monotonic()
        time.sleep(4)
        assert running(child)  # past the dead caller's deadline, still busy
        while running(child) and time.monotonic() - killed < 120:
            time.sleep(0.2)
        assert not running(child)  # its CPU limit (8 s of CPU for a 3 s deadline) ended it
    finally:
        caller.kill()
        if pid_file.exists() and pid_file.read_text() and running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


def test_a_child_that_dies_without_an_answer_is_a_crash_and_parsing_goes_on():
    with pytest.raises(sandbox.Crashed, match=r"^stopped unexpectedly \(signal SIGKILL\)$"):
        sandbox.run(die, memory_mb=512, seconds=30)
    assert parse(b"The next file.", "next.txt").sections[0].text == "The next file."


def test_a_pdf_declaring_more_pages_than_the_cap_is_refused_before_its_pages_load(settings):
    settings.DOCUMENTS_MAX_PDF_PAGES = 10
    data = document_files.pdf([["The only page."]], declared_pages=5000)  # its page tree holds one page
    with pytest.raises(Unreadable) as refused:
        parse(data, "huge.pdf")
    assert str(refused.value) == "The PDF has 5000 pages; at most 10 are read: split it."


def test_a_pdf_whose_page_tree_holds_more_pages_than_it_declares_is_refused_once_loaded(settings):
    settings.DOCUMENTS_MAX_PDF_PAGES = 10
    data = document_files.pdf([[f"Page {number}."] for number in range(30)], declared_pages=1)
    with pytest.raises(Unreadable) as refused:
        parse(data, "huge.pdf")
    assert str(refused.value) == "The PDF has 30 pages; at most 10 are read: split it."


@pytest.mark.django_db(transaction=True)
def test_manage_py_ingest_parses_within_the_bounds_and_goes_on_with_the_next_file(bomb, settings, tmp_path):
    from documents.models import Document  # here: `spin`'s children import this module without Django set up

    without_archive_checks(settings)
    settings.DOCUMENTS_PARSE_MEMORY_MB = 300
    (tmp_path / "bomb.docx").write_bytes(bomb)
    (tmp_path / "notes.txt").write_bytes(b"The pump runs at 3 bar.")
    out, err = io.StringIO(), io.StringIO()
    call_command("ingest", str(tmp_path), "--shared", stdout=out, stderr=err)
    reason = "Reading the file needed more than 300 MB of memory: split it into smaller files."
    assert f"bomb.docx: {reason}" in err.getvalue()
    assert "2 files: 1 ingested" in out.getvalue()
    assert Document.objects.get(source__endswith="notes.txt").status == Document.Status.READY


def wait_for_end(site, document_id: int, timeout: float = 120) -> tuple[str, str, int]:
    deadline = time.monotonic() + timeout
    with database(site) as db:
        while True:
            status, error, attempts = db.execute(
                "SELECT status, error, attempts FROM documents_document WHERE id = %s", [document_id]
            ).fetchone()
            if status in ("ready", "failed") or time.monotonic() > deadline:
                return status, error, attempts
            time.sleep(0.2)


# No archive checks for the bomb: it meets the memory bound itself, in the worker's real flow.
MEMORY_BOUND = {
    "DOCUMENTS_PARSE_MEMORY_MB": "300",
    "DOCUMENTS_MAX_UNPACKED_BYTES": str(10**13),
    "DOCUMENTS_MAX_COMPRESSION_RATIO": str(10**9),
}
TIME_BOUND = {"DOCUMENTS_PARSE_SECONDS": "2"}


@pytest.mark.e2e
@pytest.mark.parametrize("bound", ["memory", "time"])
def test_a_worker_whose_parse_meets_a_bound_fails_that_document_and_ingests_the_next(site, bomb, bound):
    cookie = login(site.ports[0])
    if bound == "memory":
        worker, name, data = site.start_worker(**MEMORY_BOUND), "bomb.docx", bomb
        reason = "Reading the file needed more than 300 MB of memory: split it into smaller files."
    else:
        worker, name, data = site.start_worker(**TIME_BOUND), "long.pdf", long_pdf()
        reason = "Reading the file took longer than 2 s: split it into smaller files."
    try:
        ended = []
        for upload_name, upload_data in ((name, data), ("notes.txt", b"The pump runs at 3 bar.")):
            document = upload(site.ports[0], cookie, upload_name, upload_data)
            ended.append(wait_for_end(site, int(document["id"])))
        alive = worker.poll() is None
    finally:
        site.stop_workers()
    assert alive, site.logs()  # the same worker took the next document
    assert ended == [("failed", reason, 1), ("ready", "", 1)], site.logs()  # one attempt: never run again
