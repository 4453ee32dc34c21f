"""End to end: an upload over HTTP to a real daphne process, ingested by real `manage.py worker` processes,
its progress followed over the real WebSocket; a worker killed mid-document; a broken new version."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import psycopg
import pytest
from websockets.asyncio.client import connect

from tests.servers import ROOT, USERNAME, login

pytestmark = pytest.mark.e2e

# A document of a few hundred 200-token chunks' worth of sentences, all different.
BIG = "\n\n".join(
    f"Section {i}. " + " ".join(f"Fact {i}-{j}: the valve number {i * 37 + j} opens at {j} bar." for j in range(20))
    for i in range(120)
).encode()  # ~240 chunks: the kill, at the first progress report (16 chunks), lands long before Store


def upload(port: int, cookie: str, name: str, data: bytes) -> dict:
    """POST one file as the documents page does (multipart/form-data, CSRF header)."""
    csrf = dict(part.split("=", 1) for part in cookie.split("; "))["csrftoken"]
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/documents/upload/",
        data=body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Cookie": cookie,
            "X-CSRFToken": csrf,
            "Referer": f"http://127.0.0.1:{port}/documents/",
        },
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())["documents"][0]["document"]


def database(site) -> psycopg.Connection:
    return psycopg.connect(site.env["DATABASE_URL"].replace("postgres://", "postgresql://"), autocommit=True)


def test_a_worker_killed_mid_document_leaves_it_invisible_then_another_worker_finishes_it(site):
    port = site.ports[0]
    cookie = login(port)
    # Small batches: progress is reported every 16 chunks, so the kill lands mid-way.
    fast_recovery = {"EMBEDDING_BATCH": "4", "WORKER_STALLED_SECONDS": "3", "WORKER_HEARTBEAT_SECONDS": "1"}

    async def scenario() -> tuple[list[dict], int]:
        async with connect(
            f"ws://127.0.0.1:{port}/ws/chat/", additional_headers={"Cookie": cookie}, origin=f"http://127.0.0.1:{port}"
        ) as ws:
            document = await asyncio.to_thread(upload, port, cookie, "valves.txt", BIG)
            assert document["status"] == "queued"
            first = site.start_worker(**fast_recovery)
            frames = []
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                frames.append(frame)
                if frame["stage"] == "embedding" and 0 < frame["done"] < frame["total"]:
                    break
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            with database(site) as db:
                status, chunks, visible = db.execute(
                    "SELECT status, chunk_count, (SELECT count(*) FROM documents_chunk WHERE document_id = d.id) "
                    "FROM documents_document d WHERE id = %s",
                    [int(document["id"])],
                ).fetchone()
            assert (status, chunks, visible) == ("processing", 0, 0)  # nothing half-visible
            killed_at = time.monotonic()
            site.start_worker(**fast_recovery)
            while frames[-1]["stage"] not in ("ready", "failed"):
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
            assert time.monotonic() - killed_at < 90
            return frames, int(document["id"])

    try:
        frames, document_id = asyncio.run(scenario())
    finally:
        site.stop_workers()
    assert frames[0]["stage"] == "processing" and frames[0]["document"]["id"] == str(document_id)
    assert "parsed" in [f["stage"] for f in frames]
    final = frames[-1]
    assert final["stage"] == "ready", site.logs()
    total = max(f["total"] for f in frames)
    assert final["document"]["chunk_count"] == total > 32
    with database(site) as db:
        ordinals = [row[0] for row in db.execute(
            "SELECT ordinal FROM documents_chunk WHERE document_id = %s ORDER BY ordinal", [document_id]
        )]  # fmt: skip
        attempts = db.execute("SELECT attempts FROM documents_document WHERE id = %s", [document_id]).fetchone()[0]
    assert ordinals == list(range(total))  # one whole copy: no chunk lost or stored twice
    assert attempts == 2


MANUAL = b"# Pump manual\n\n## Seals\n\nWhen the pump leaks at the front, replace the seal with part A-17.\n"


def test_a_broken_upload_over_a_working_one_leaves_the_working_one_searched_and_cited(site):
    port = site.ports[0]
    cookie = login(port)

    async def until_ended(ws) -> dict:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame["type"] == "document" and frame["stage"] in ("ready", "failed"):
                return frame

    async def scenario() -> tuple[dict, dict]:
        async with connect(
            f"ws://127.0.0.1:{port}/ws/chat/", additional_headers={"Cookie": cookie}, origin=f"http://127.0.0.1:{port}"
        ) as ws:
            await asyncio.to_thread(upload, port, cookie, "manual.md", MANUAL)
            working = await until_ended(ws)
            await asyncio.to_thread(upload, port, cookie, "manual.md", bytes(range(256)) * 10)
            return working, await until_ended(ws)

    site.start_worker()
    try:
        working, broken = asyncio.run(scenario())
    finally:
        site.stop_workers()
    assert working["stage"] == "ready", site.logs()
    # The worker's run of the new version failed, and said that the previous version is still used.
    assert broken["stage"] == "failed" and "binary" in broken["document"]["error"]
    assert broken["document"]["live"] is True and broken["document"]["id"] == working["document"]["id"]
    assert broken["document"]["chunk_count"] == working["document"]["chunk_count"] > 0
    # `manage.py retrieve` on the site's database finds the working version...
    printed = subprocess.run(
        [sys.executable, "manage.py", "retrieve", "which part replaces the pump seal?", "--user", USERNAME, "--json"],
        env=site.env, cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    seal = next(hit for hit in json.loads(printed) if "A-17" in hit["text"])
    with database(site) as db:
        start, end = db.execute(
            "SELECT char_start, char_end FROM documents_chunk WHERE id = %s", [seal["chunk_id"]]
        ).fetchone()
    # ...its passage opens in its own text, and the page shows the failure beside it.
    passage = get(port, cookie, f"/documents/{seal['document_id']}/passage/?start={start}&end={end}")
    assert json.loads(passage)["passage"] == seal["text"]
    page = get(port, cookie, "/documents/")
    assert "The new version failed: " in page and "The previous version is still used." in page


def get(port: int, cookie: str, path: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Cookie": cookie})
    with urllib.request.urlopen(request) as response:
        return response.read().decode()
