"""Answering from documents: what a turn retrieves, for whom, and what it tells the page and the model."""

import io
import json
import re

import pytest
from django.core.management import call_command
from django.db import DatabaseError
from django.db.backends.utils import CursorWrapper

from chat.llm.context import Source, select_sources
from chat.models import Message
from chat.services import db
from documents import search
from documents.embedding import LocalEmbedder
from tests.conftest import Client
from tests.llm_server import CITED_REPLY
from tests.test_documents import ingest

pytestmark = pytest.mark.django_db(transaction=True)

# Two users' notes that look alike: only the part numbers tell them apart.
ALICE_PUMP = (
    b"# Garden pump\n\n## Seals\n\nWhen the pump leaks at the front, replace the seal with part A-17.\n\n"
    b"## Filter\n\nRinse the filter under warm water every week.\n"
)
BOB_PUMP = ALICE_PUMP.replace(b"A-17", b"B-99")
HANDBOOK = b"# Pump handbook\n\n## Priming\n\nFill the pump housing with water before the first start.\n"


def record_sql(monkeypatch) -> list[str]:
    """Every SQL statement run from now on, from any thread (the flow queries from a thread pool)."""
    seen: list[str] = []
    real = CursorWrapper._execute

    def spy(self, sql, params, *rest):
        seen.append(sql)
        return real(self, sql, params, *rest)

    monkeypatch.setattr(CursorWrapper, "_execute", spy)
    return seen


def count_embeddings(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = LocalEmbedder.embed

    def spy(self, texts):
        calls.append(len(texts))
        return real(self, texts)

    monkeypatch.setattr(LocalEmbedder, "embed", spy)
    return calls


@pytest.mark.parametrize("vector_path", ["exact scan", "HNSW index"])
def test_a_users_retrieval_sees_only_their_own_and_shared_chunks(alice, bob, monkeypatch, vector_path):
    if vector_path == "HNSW index":  # as for a user who sees many chunks (documents.search.exact_scan)
        monkeypatch.setattr(search, "EXACT_SCAN_CHUNKS", 0)
        monkeypatch.setattr(search, "EXACT_SCAN_SHARE", 0)
    ingest(alice, "pump.md", ALICE_PUMP)
    ingest(bob, "pump.md", BOB_PUMP)
    ingest(None, "handbook.md", HANDBOOK)
    for user, own, others in ((alice, "A-17", "B-99"), (bob, "B-99", "A-17")):
        where = search.scope(user.pk)
        for mode in search.MODES:
            hits = search.pipeline(where, "which part fixes a leaking pump seal?", search.Query(mode=mode), 50)
            texts = " ".join(hit.text for hit in hits)
            assert own in texts, mode
            assert others not in texts, mode
            assert {hit.source for hit in hits} <= {"pump.md", "handbook.md"}
        # The shared handbook is found too, by each of them.
        hits = search.pipeline(where, "how do I prime the pump before starting", search.Query(), 3)
        assert hits[0].title == "Pump handbook"


async def test_the_sources_frame_the_saved_sources_and_the_prompt_agree(alice, bob, llm_server):
    await db(ingest)(alice, "pump.md", ALICE_PUMP)
    await db(ingest)(bob, "pump.md", BOB_PUMP)
    async with Client(alice) as client:
        ack = await client.say("my pump leaks at the front: which seal part do I need? [cite]")
        frames = await client.recv_until("done")
        kinds = [frame["type"] for frame in frames]
        assert "sources" in kinds and kinds.index("sources") < kinds.index("chunk")  # before the first chunk
        sources = frames[kinds.index("sources")]["sources"]
        assert frames[kinds.index("sources")]["message_id"] == ack["assistant_message_id"]
        assert [s["n"] for s in sources] == list(range(1, len(sources) + 1))
        assert sources[0]["title"] == "Garden pump" and sources[0]["heading"] == "Garden pump › Seals"

        # The prompt holds exactly these passages, numbered the same, with the instruction to cite them.
        system = llm_server.requests[-1]["messages"][0]["content"]
        assert "[1], [2]" in system or "[1] or [2]" in system
        numbered = re.findall(r"^\[(\d+)\] (.*)$", system, re.MULTILINE)
        assert [(int(n), where) for n, where in numbered] == [
            (s["n"], f"Garden pump › {s['heading']}") for s in sources
        ]
        assert "A-17" in system and "B-99" not in system

        reply = await Message.objects.aget(pk=ack["assistant_message_id"])
        assert reply.sources == sources
        assert reply.content == CITED_REPLY

        # History shows them again.
        await client.send({"type": "open", "conversation_id": ack["conversation_id"]})
        history = await client.recv()
        assert history["messages"][1]["sources"] == sources


async def test_plain_chat_without_documents_runs_no_retrieval_query_and_no_embedding(alice, monkeypatch):
    sql = record_sql(monkeypatch)
    embedded = count_embeddings(monkeypatch)
    async with Client(alice) as client:
        await client.say("hello")
        frames = await client.recv_until("done")
    assert "sources" not in [frame["type"] for frame in frames]
    assert not [statement for statement in sql if "documents_chunk" in statement]
    # One question about documents (are there any?), over the documents table alone.
    assert len([statement for statement in sql if "documents_document" in statement]) == 1
    assert embedded == []


async def test_a_turn_whose_documents_cannot_be_looked_up_saves_nothing(alice, monkeypatch):
    """The scope is read in the turn's own transaction: if that fails, no half-made turn (a
    `streaming` reply nobody writes) is left behind, and the same client_id can be sent again."""

    def broken(user_id):
        raise DatabaseError("connection lost")

    monkeypatch.setattr(search, "scope", broken)
    async with Client(alice) as client:
        refused = await client.say("hello", client_id="6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f")
        assert refused["type"] == "error" and refused["code"] == "internal_error"
        assert refused["client_id"] == "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"
        assert not await Message.objects.aexists()
        monkeypatch.undo()
        ack = await client.say("hello", client_id="6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f")
        assert ack["type"] == "ack"
        assert (await client.recv_until("done"))[-1]["status"] == "complete"


async def test_a_conversation_can_switch_its_documents_off_and_on(alice, monkeypatch, llm_server):
    await db(ingest)(alice, "pump.md", ALICE_PUMP)
    sql = record_sql(monkeypatch)
    async with Client(alice) as client:
        ack = await client.say("which seal part fixes the leak?", use_documents=False)
        frames = await client.recv_until("done")
        assert "sources" not in [frame["type"] for frame in frames]
        assert not [statement for statement in sql if "documents_" in statement]  # not even "are there any?"
        assert "A-17" not in llm_server.requests[-1]["messages"][0]["content"]
        await client.send({"type": "open", "conversation_id": ack["conversation_id"]})
        assert (await client.recv())["use_documents"] is False

        # Off stays off for the next send that says nothing; on again when a send says so.
        await client.say("and the filter?", ack["conversation_id"])
        assert "sources" not in [frame["type"] for frame in await client.recv_until("done")]
        await client.say("which seal part fixes the leak?", ack["conversation_id"], use_documents=True)
        assert "sources" in [frame["type"] for frame in await client.recv_until("done")]
        assert "A-17" in llm_server.requests[-1]["messages"][0]["content"]


async def test_a_follow_up_question_retrieves_with_the_previous_turn(alice, settings, llm_server):
    await db(ingest)(alice, "seals.md", b"# Seals\n\nTo replace the pump seal, unscrew the front cover first.\n")
    await db(ingest)(
        alice, "filter.md", b"# Filter\n\nHow often? Rinse the filter every week, and more often in summer.\n"
    )
    follow_up = "and how often should I do that?"

    async def first_source_of_follow_up() -> str:
        async with Client(alice) as client:
            ack = await client.say("how do I replace the pump seal?")
            await client.recv_until("done")
            await client.say(follow_up, ack["conversation_id"])
            frames = await client.recv_until("done")
        return next(frame for frame in frames if frame["type"] == "sources")["sources"][0]["title"]

    assert await first_source_of_follow_up() == "Seals"
    # Without the previous turn, the follow-up's own words lead elsewhere: the rewrite is what found it.
    settings.RETRIEVAL_REWRITE = "none"
    assert await first_source_of_follow_up() == "Filter"


def test_retrieve_command_prints_the_ranking_as_json_and_in_batches(alice, tmp_path, capsys):
    ingest(alice, "pump.md", ALICE_PUMP)
    ingest(None, "handbook.md", HANDBOOK)
    call_command("retrieve", "which part fixes a leaking seal", "--user", alice.username, "--json", "-k", "2")
    hits = json.loads(capsys.readouterr().out)
    assert [hit["rank"] for hit in hits] == [1, 2]
    assert {"rank", "document", "source", "chunk_id", "score", "text"} <= hits[0].keys()
    assert hits[0]["source"] == "pump.md" and "A-17" in hits[0]["text"]
    assert hits[0]["score"] >= hits[1]["score"]

    batch = tmp_path / "questions.jsonl"
    history = [{"role": "user", "content": "how do I prime the pump?"}, {"role": "assistant", "content": "Fill it."}]
    batch.write_text(
        json.dumps({"question": "which part fixes a leaking seal"})
        + "\n"
        + json.dumps({"question": "and before the first start?", "history": history})
        + "\n"
    )
    call_command("retrieve", "--batch", str(batch), "--user", alice.username, "-k", "1")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first[0]["source"] == "pump.md"
    assert second[0]["source"] == "handbook.md"
    assert second[0]["query"] == "how do I prime the pump?\nand before the first start?"
    # The single question and its batch line rank the same.
    assert first[0]["chunk_id"] == hits[0]["chunk_id"]


class Counter:
    """Counts tokens as one per word, so budgets in a test are easy to reason about."""

    context_tokens = 1000
    max_tokens = 100
    system_prompt = "Be brief."

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) for m in messages)


def hit(chunk_id, document_id, ordinal, text, start, heading="H", score=1.0):
    return search.Hit(
        chunk_id, document_id, "Doc", "doc.md", text, heading, None, ordinal, start, start + len(text), score
    )


def test_select_context_merges_neighbours_drops_copies_and_keeps_to_the_budget():
    text = "one two three four five six seven eight nine ten"
    first = hit(1, 7, 0, text[:29], 0)  # "one two three four five six s"
    second = hit(2, 7, 1, text[20:], 20)  # overlaps the first by 9 characters
    copy = hit(3, 8, 0, first.text, 0)  # the same passage in another document
    other = hit(4, 9, 5, "a different passage", 100, heading="Other")
    sources = select_sources(Counter(), [first, copy, second, other], budget=100, most=5)
    assert [s.n for s in sources] == [1, 2]
    assert sources[0].text == text  # merged, without the overlap twice
    assert (sources[0].char_start, sources[0].char_end) == (0, len(text))
    assert sources[1].document_id == 9

    # A budget that fits only the first passage keeps only it; `most` caps the count.
    assert [s.chunk_id for s in select_sources(Counter(), [first, other], budget=12, most=5)] == [1]
    assert len(select_sources(Counter(), [first, other], budget=100, most=1)) == 1
    assert isinstance(sources[0], Source)


def test_admin_shows_a_replys_sources_linked_to_their_chunks(admin_client, alice):
    document = ingest(alice, "pump.md", ALICE_PUMP)
    chunk = document.chunks.first()
    conversation = alice.conversations.create(title="Pump")
    source = {"n": 1, "document_id": str(document.pk), "title": "Garden pump", "chunk_id": str(chunk.pk),
              "snippet": chunk.text, "heading": "Garden pump › Seals", "page": None, "start": 0, "end": 10}  # fmt: skip
    reply = Message.objects.create(
        conversation=conversation, role="assistant", content="Use A-17 [1].", sources=[source]
    )
    chunk_url = f"/admin/documents/chunk/{chunk.pk}/change/"
    for page in (f"/admin/chat/message/{reply.pk}/change/", f"/admin/chat/conversation/{conversation.pk}/change/"):
        html = admin_client.get(page).content.decode()
        assert f"<li value='1'><a href='{chunk_url}'>Garden pump</a> <small>Garden pump › Seals</small></li>" in html


async def test_a_search_that_fails_says_so_and_the_reply_goes_on_without_documents(alice, monkeypatch, llm_server):
    await db(ingest)(alice, "pump.md", ALICE_PUMP)

    def broken(*args, **kwargs):
        raise RuntimeError("the index is gone")

    monkeypatch.setattr(search, "retrieve", broken)
    async with Client(alice) as client:
        ack = await client.say("which seal part fixes the leak?")
        frames = await client.recv_until("done")
    statuses = [frame for frame in frames if frame["type"] == "status"]
    assert statuses == [{"type": "status", "message_id": ack["assistant_message_id"], "state": "search_failed"}]
    assert "sources" not in [frame["type"] for frame in frames]
    assert frames[-1]["status"] == "complete"
    assert "A-17" not in llm_server.requests[-1]["messages"][0]["content"]


def test_a_cited_passage_opens_with_its_context_for_those_who_may_search_it(client, alice, bob):
    mine = ingest(alice, "pump.md", ALICE_PUMP)
    shared = ingest(None, "handbook.md", HANDBOOK)
    seal = mine.chunks.get(heading="Garden pump › Seals")
    url = f"/documents/{mine.pk}/passage/?start={seal.char_start}&end={seal.char_end}"

    client.force_login(alice)
    passage = client.get(url).json()
    assert passage["passage"] == seal.text
    assert passage["title"] == "Garden pump"
    assert "Rinse the filter" in passage["after"]  # the text around it, for context
    shared_chunk = shared.chunks.first()
    assert client.get(f"/documents/{shared.pk}/passage/?start=0&end={shared_chunk.char_end}").status_code == 200
    assert client.get(f"/documents/{mine.pk}/passage/?start=9&end=2").status_code == 400
    assert client.get(f"/documents/{mine.pk}/passage/?start=x&end=2").status_code == 400

    # Someone else's document does not exist for bob; the shared one does.
    client.force_login(bob)
    assert client.get(url).status_code == 404
    assert client.get(f"/documents/{shared.pk}/passage/?start=0&end=5").status_code == 200
    client.logout()
    assert client.get(url).status_code == 302  # to the login page


def test_documents_of_another_embedding_model_are_not_searched_until_reembed(client, alice, settings, llm_server):
    mine = ingest(alice, "pump.md", ALICE_PUMP)
    shared = ingest(None, "handbook.md", HANDBOOK)
    assert set(search.scope(alice.pk).document_ids) == {mine.pk, shared.pk}
    # The configured embedder changes: the stored vectors cannot be compared with the query's.
    settings.EMBEDDING_BASE_URL, settings.EMBEDDING_MODEL = llm_server.base_url, "test-embedder"
    where = search.scope(alice.pk)
    assert not where and where.document_ids == []
    assert search.pipeline(where, "which part fixes a leaking pump seal?", search.Query(), 5) == []
    # The page says which documents wait, and for what.
    client.force_login(alice)
    page = client.get("/documents/").content.decode()
    row = re.search(rf'<tr data-id="{mine.pk}".*?</tr>', page, re.S).group(0)
    assert "Waiting for re-embedding" in row and "manage.py reembed" in row
    assert "1 shared document waits for re-embedding" in page
    assert "searched too" not in page

    call_command("reembed", stdout=io.StringIO(), stderr=io.StringIO())
    assert set(search.scope(alice.pk).document_ids) == {mine.pk, shared.pk}
    hits = search.pipeline(search.scope(alice.pk), "which part fixes a leaking pump seal?", search.Query(), 5)
    assert "A-17" in " ".join(hit.text for hit in hits)
    page = client.get("/documents/").content.decode()
    assert "Waiting for re-embedding" not in page and "1 shared document is searched too" in page
