"""Races found by reading the code, each forced to happen (not hoped for)."""

import asyncio
import threading
import time
import uuid

import pytest
from channels.layers import get_channel_layer
from django.db import connection, transaction

from chat import protocol, services
from chat.consumers import ChatConsumer
from chat.models import Conversation, Message
from chat.replies import events, row
from chat.replies.row import Outcome
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)


def in_thread(fn, *args):
    """Run ``fn`` in a thread of its own (its own database connection); returns (thread, results)."""
    results: list = []

    def run() -> None:
        try:
            results.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, results


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def wait_until_blocked(holder: int, query_start: str, wait_event: str) -> int:
    """The pid of the backend whose query starts with ``query_start``, once pg_stat_activity shows it
    waiting on a lock (of kind ``wait_event``: "transactionid", "advisory", ...) that ``holder`` holds."""
    with connection.cursor() as cursor:
        for _ in range(200):
            cursor.execute(
                "SELECT pid, wait_event FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE %s AND %s = ANY(pg_blocking_pids(pid))",
                [query_start + "%", holder],
            )
            found = cursor.fetchone()
            if found is not None:
                assert found[1] == wait_event, found
                return found[0]
            time.sleep(0.05)
    raise AssertionError(f"no backend ran {query_start!r} waiting on a lock of backend {holder}")


def test_a_flush_that_waits_on_the_final_write_does_not_overwrite_it(alice):
    conversation = Conversation.objects.create(owner=alice)
    question = Message.objects.create(conversation=conversation, role="user", content="q")
    reply = Message.objects.create(conversation=conversation, role="assistant", status="streaming",
                                   content="partial", reply_to=question)  # fmt: skip
    finishing, release = threading.Event(), threading.Event()
    finisher_pid: list[int] = []

    def final_write() -> None:
        with transaction.atomic():
            row.finish(reply.pk, Outcome("complete", 3, 5), "the whole answer", 10)
            finisher_pid.append(backend_pid())
            finishing.set()
            release.wait(10)  # the final write holds the row, uncommitted

    finisher, _ = in_thread(final_write)
    assert finishing.wait(5)
    flusher, flushed = in_thread(row.flush, {reply.pk: "partial, and a bit more"})
    # The heartbeat's flush is seen waiting on the final write's row lock before that write commits.
    try:
        wait_until_blocked(finisher_pid[0], f"UPDATE {Message._meta.db_table} AS m SET content", "transactionid")
        assert flusher.is_alive()
    finally:
        release.set()
    finisher.join(5)
    flusher.join(5)
    assert flushed == [set()]  # re-checked after the commit: no longer streaming, not written
    reply.refresh_from_db()
    assert (reply.status, reply.content) == ("complete", "the whole answer")


def test_two_resends_of_one_client_id_racing_make_one_conversation(alice, monkeypatch):
    client_id = str(uuid.uuid4())
    create = Conversation.objects.create
    inside, release = threading.Event(), threading.Event()
    first_pid: list[int] = []

    def paused_create(**fields):
        if not inside.is_set():  # the first send, holding its client_id's advisory lock
            first_pid.append(backend_pid())
            inside.set()
            release.wait(10)
        return create(**fields)

    monkeypatch.setattr(Conversation.objects, "create", paused_create)
    a, a_turn = in_thread(services.begin_turn, alice, None, client_id, "hello", None, "m", "")
    assert inside.wait(5)
    b, b_turn = in_thread(services.begin_turn, alice, None, client_id, "hello", None, "m", "")
    # The second send waits on the advisory lock the first holds, inside its transaction.
    try:
        wait_until_blocked(first_pid[0], "SELECT pg_advisory_xact_lock", "advisory")
        assert b.is_alive()
    finally:
        release.set()
    a.join(5)
    b.join(5)
    assert Conversation.objects.count() == 1
    assert a_turn[0].user_message.pk == b_turn[0].user_message.pk
    assert (a_turn[0].replayed, b_turn[0].replayed) == (False, True)


async def test_a_channel_layer_failure_after_the_commit_leaves_no_orphan_streaming_row(alice, monkeypatch):
    subscribe = ChatConsumer._subscribe
    calls = 0

    async def failing_once(self, conversation_id):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("Redis went away")
        await subscribe(self, conversation_id)

    monkeypatch.setattr(ChatConsumer, "_subscribe", failing_once)
    client_id = str(uuid.uuid4())
    async with Client(alice) as client:
        answer = await client.say("[tokens=5]", client_id=client_id)
        assert answer["code"] == "internal_error" and answer["client_id"] == client_id
        # The reply was started before anything could fail: it ends and is saved, not left `streaming`.
        reply = await Message.objects.aget(role="assistant")
        for _ in range(50):
            await reply.arefresh_from_db()
            if reply.status != "streaming":
                break
            await asyncio.sleep(0.1)
        assert (reply.status, reply.content) == ("complete", "t0 t1 t2 t3 t4 ")
        # The page's resend (same client_id) gets the reply, and the conversation takes a new message.
        ack = await client.say("[tokens=5]", client_id=client_id)
        assert ack["type"] == "ack" and ack["assistant_message_id"] == str(reply.pk)
        frames = await client.recv_until("done")
        assert frames[0] == {"type": "chunk", "message_id": str(reply.pk), "offset": 0, "delta": "t0 t1 t2 t3 t4 "}
        assert (await client.say("more", ack["conversation_id"]))["type"] == "ack"
        await client.recv_until("done")


async def test_a_reply_deleted_while_a_socket_joins_it_is_left_out_of_history(alice):
    layer = get_channel_layer()
    generator = await layer.new_channel()  # the reply's process: this test answers for it
    conversation = await Conversation.objects.acreate(owner=alice)
    question = await Message.objects.acreate(conversation=conversation, role="user", content="q")
    reply = await Message.objects.acreate(conversation=conversation, role="assistant", status="streaming",
                                          reply_to=question, control_channel=generator)  # fmt: skip
    async with Client(alice) as client:
        await client.send({"type": "open", "conversation_id": str(conversation.pk)})
        # The socket read the reply as streaming and is joining it: its snapshot request came.
        request = await asyncio.wait_for(layer.receive(generator), 10)
        assert request == events.snapshot_request(reply.pk, request["reply_channel"])
        # A chunk of the reply reaches the socket while it waits (held), then an admin deletes the reply.
        await layer.group_send(events.group_name(conversation.pk), events.frames(protocol.chunk(reply.pk, 0, "par")))
        await Message.objects.filter(pk=reply.pk).adelete()
        # Its process answers as for a reply it no longer runs: the socket asks the database.
        await layer.send(request["reply_channel"], events.snapshot(reply.pk, None))
        history = await client.recv()
        assert history["type"] == "history"
        assert [m["id"] for m in history["messages"]] == [str(question.pk)]
        assert await client.nothing_more()  # the held chunk of the deleted reply is not released
        assert (await client.say("still works?", str(conversation.pk)))["type"] == "ack"
        await client.recv_until("done")
