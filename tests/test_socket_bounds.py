"""What one socket may cost, and a socket that cannot silently stop receiving.

- A failing channel layer is the real one (channels_redis's pub/sub layer, the project's pipelined
  subclass) connected to the real Valkey as a user of its own, which the test disables and whose
  connections it kills (``RefusingRedis``): every command of the socket's layer then fails as it
  does when Redis is unreachable, while the test's own connections keep working.
- Sockets per user, `open` frames per minute, history pages and the prompt's window.
"""

import asyncio
import contextlib
import json
import time
from datetime import timedelta

import pytest
import redis
import redis.asyncio as aioredis
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from django.contrib.sessions.models import Session
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from websockets.exceptions import ConnectionClosed

from chat import protocol, services, sockets
from chat.models import Conversation, Message
from chat.replies import events
from chatsite.channel_layer import PipelinedPubSubChannelLayer
from tests.conftest import Client
from tests.servers import login
from tests.test_resilience import socket

pytestmark = pytest.mark.django_db(transaction=True)

USER = "socket-layer"


class RefusingRedis:
    """The sockets' channel layer connects as ``USER``; ``refuse()`` makes every command of it fail."""

    def __init__(self) -> None:
        self.admin = redis.Redis.from_url(django_settings.REDIS_URL)
        self.admin.execute_command("ACL", "SETUSER", USER, "reset", "on", ">pw", "~*", "&*", "+@all")
        # The test's own layer: the real Valkey as the default user, unaffected by refuse().
        self.tester = PipelinedPubSubChannelLayer(hosts=[{"address": django_settings.REDIS_URL}])

    def layers(self) -> dict:
        host = {"address": django_settings.REDIS_URL, "username": USER, "password": "pw", "socket_timeout": 2}
        return {
            "default": {"BACKEND": "chatsite.channel_layer.PipelinedPubSubChannelLayer", "CONFIG": {"hosts": [host]}}
        }

    async def refuse(self, client: Client) -> None:
        # A frame answered first: the socket's connect (its subscriptions) is over before Redis fails.
        await client.send_raw("{}")
        assert (await client.recv())["code"] == "bad_request"
        self.admin.execute_command("ACL", "SETUSER", USER, "off")
        assert self.admin.execute_command("CLIENT", "KILL", "USER", USER) >= 1
        await asyncio.sleep(0.5)  # the layer's receiver has read the EOF: its next command reconnects, and fails

    def restore(self) -> None:
        self.admin.execute_command("ACL", "SETUSER", USER, "on")

    def close(self) -> None:
        self.restore()
        self.admin.execute_command("ACL", "DELUSER", USER)
        self.admin.close()

    async def subscribed(self, conversation_id: int) -> None:
        """Wait until the server has a subscriber for the conversation's group."""
        name = self.tester._get_layer()._get_group_channel_name(events.group_name(conversation_id))
        for _ in range(100):
            if self.admin.pubsub_numsub(name)[0][1]:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("nobody subscribed to the conversation")

    async def publish(self, conversation_id: int, *frames: dict) -> None:
        """As a generating process does: frames to every socket of the conversation."""
        await self.subscribed(conversation_id)
        await self.tester.group_send(events.group_name(conversation_id), events.frames(*frames))


@pytest.fixture
def refusing(settings):
    layer = RefusingRedis()
    settings.CHANNEL_LAYERS = layer.layers()  # the consumers' layer (channels drops its cached one)
    yield layer
    layer.close()


async def conversation_with_reply(user, control_channel: str, content: str = "saved") -> tuple:
    conversation = await Conversation.objects.acreate(owner=user)
    question = await Message.objects.acreate(conversation=conversation, role="user", content="q")
    reply = await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", content=content, reply_to=question,
        control_channel=control_channel,
    )  # fmt: skip
    return conversation, reply


def opening(conversation) -> dict:
    return {"type": "open", "conversation_id": str(conversation.pk)}


# --- a socket that cannot silently stop receiving -----------------------------------------------------


async def test_a_subscription_that_fails_is_told_and_the_next_open_subscribes(alice, refusing):
    conversation = await Conversation.objects.acreate(owner=alice)
    async with Client(alice) as client:
        await refusing.refuse(client)
        await client.send(opening(conversation))
        told = await client.recv(timeout=15)
        assert (told["type"], told["code"]) == ("error", "internal_error")
        refusing.restore()
        await client.send(opening(conversation))
        assert (await client.recv())["type"] == "history"
        # The socket is subscribed now: it was not recorded as subscribed when the first attempt failed.
        live = protocol.chunk(1, 0, "live")
        await refusing.publish(conversation.pk, live)
        assert await client.recv() == live


async def test_a_snapshot_request_that_cannot_be_sent_joins_from_the_database(alice, refusing):
    generator = await refusing.tester.new_channel()
    conversation, reply = await conversation_with_reply(alice, control_channel=generator, content="saved so far")
    async with Client(alice) as client:
        await client.send(opening(conversation))
        request = await asyncio.wait_for(refusing.tester.receive(generator), 10)
        await refusing.tester.send(request["reply_channel"], events.snapshot(reply.pk, "live text"))
        assert (await client.recv())["messages"][-1]["content"] == "live text"
        # The page re-opens the conversation (a gap, a silent reply) while Redis is unreachable:
        # the request cannot be sent, so the text comes from the database at once.
        await refusing.refuse(client)
        await client.send(opening(conversation))
        history = await client.recv(timeout=5)
        assert history["type"] == "history" and history["messages"][-1]["content"] == "saved so far"
        refusing.restore()
        # Nothing is held: the reply's next frames reach the socket.
        live = protocol.chunk(reply.pk, 12, ", and on")
        await refusing.publish(conversation.pk, live)
        assert await client.recv() == live


async def test_the_join_deadline_needs_no_channel_layer(alice, refusing, monkeypatch):
    monkeypatch.setattr("chat.replies.join.SNAPSHOT_TIMEOUT", 0.5)
    generator = await refusing.tester.new_channel()
    conversation, reply = await conversation_with_reply(alice, control_channel=generator, content="saved so far")
    async with Client(alice) as client:
        await client.send(opening(conversation))
        await asyncio.wait_for(refusing.tester.receive(generator), 10)  # the socket is joining, and waits
        # No answer comes, and the layer fails: the deadline must not need the layer to fire.
        await refusing.refuse(client)
        history = await client.recv(timeout=5)
        assert history["type"] == "history" and history["messages"][-1]["content"] == "saved so far"
        refusing.restore()
        live = protocol.chunk(reply.pk, 12, ", and on")
        await refusing.publish(conversation.pk, live)
        assert await client.recv() == live


async def test_a_join_holding_too_many_frames_gives_up_and_the_client_resyncs(alice, refusing, settings):
    settings.CHAT_JOIN_MAX_HELD_FRAMES = 5
    generator = await refusing.tester.new_channel()
    conversation, reply = await conversation_with_reply(alice, control_channel=generator, content="")
    async with Client(alice) as client:
        await client.send(opening(conversation))
        await asyncio.wait_for(refusing.tester.receive(generator), 10)  # the join waits for an answer
        text = "".join(f"t{i} " for i in range(6))
        chunks = [protocol.chunk(reply.pk, len("".join(f"t{j} " for j in range(i))), f"t{i} ") for i in range(6)]
        await refusing.publish(conversation.pk, *chunks)  # six frames held: one over the bound
        told = await client.recv()
        assert (
            told["type"] == "error"
            and told["code"] == "out_of_sync"
            and told["conversation_id"] == str(conversation.pk)
        )
        assert await client.nothing_more()  # the held frames were dropped, not sent after all
        # The client re-sends `open`, as the protocol says: a new join, answered this time.
        await client.send(opening(conversation))
        request = await asyncio.wait_for(refusing.tester.receive(generator), 10)
        await refusing.tester.send(request["reply_channel"], events.snapshot(reply.pk, text))
        history = await client.recv()
        assert history["type"] == "history" and history["messages"][-1]["content"] == text
        live = protocol.chunk(reply.pk, len(text), "end")
        await refusing.publish(conversation.pk, live)
        assert await client.recv() == live


def rename_messages(old: str, new: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def test_a_join_whose_database_read_fails_tells_the_client(alice, monkeypatch):
    monkeypatch.setattr("chat.replies.join.SNAPSHOT_TIMEOUT", 0.5)
    layer = get_channel_layer()
    generator = await layer.new_channel()
    conversation, reply = await conversation_with_reply(alice, control_channel=generator, content="saved so far")
    async with Client(alice) as client:
        await client.send(opening(conversation))
        await asyncio.wait_for(layer.receive(generator), 10)  # joining; no answer will come
        # The deadline's read of the reply fails (its table is gone for the moment).
        await services.db(rename_messages)("chat_message", "chat_message_away")
        try:
            told = await client.recv()
        finally:
            await services.db(rename_messages)("chat_message_away", "chat_message")
        assert (told["type"], told["code"], told["conversation_id"]) == ("error", "out_of_sync", str(conversation.pk))
        # Nothing is left held: a new `open` joins and the reply's frames arrive.
        await client.send(opening(conversation))
        request = await asyncio.wait_for(layer.receive(generator), 10)
        await layer.send(request["reply_channel"], events.snapshot(reply.pk, "live"))
        assert (await client.recv())["messages"][-1]["content"] == "live"
        live = protocol.chunk(reply.pk, 4, " on")
        await layer.group_send(events.group_name(conversation.pk), events.frames(live))
        assert await client.recv() == live


async def test_an_open_of_the_same_conversation_starts_its_join_anew(alice, refusing, monkeypatch):
    monkeypatch.setattr("chat.replies.join.SNAPSHOT_TIMEOUT", 60)
    generator = await refusing.tester.new_channel()
    conversation, reply = await conversation_with_reply(alice, control_channel=generator, content="")
    async with Client(alice) as client:
        await client.send(opening(conversation))
        await asyncio.wait_for(refusing.tester.receive(generator), 10)  # joining; no answer will come
        # The reply ends and its `done` is lost; the page re-opens the conversation after 20 s of silence.
        await Message.objects.filter(pk=reply.pk).aupdate(status="complete", content="all of it")
        await client.send(opening(conversation))
        history = await client.recv()
        assert history["messages"][-1]["status"] == "complete"
        # The join waiting since the first `open` is over: frames are not held for it.
        new = protocol.message_frame(await Message.objects.acreate(conversation=conversation, role="user"))
        await refusing.publish(conversation.pk, new)
        assert await client.recv() == new


# --- sockets per user, opens per minute ---------------------------------------------------------------


async def closed_with(client: Client) -> int | None:
    output = await client.communicator.receive_output(timeout=5)
    return output.get("code") if output["type"] == "websocket.close" else None


async def test_the_socket_over_the_cap_is_closed_with_4429(alice, bob, settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 2
    async with Client(alice) as first, Client(alice), Client(bob):
        async with Client(alice) as third:
            assert await closed_with(third) == protocol.CLOSE_TOO_MANY_SOCKETS
        await first.close()
        async with Client(alice) as again:  # a closed socket no longer counts
            assert (await again.say("[tokens=1]"))["type"] == "ack"
            await again.recv_until("done")


async def test_sockets_of_other_processes_count_until_they_lapse(alice, settings):
    """The count is in Redis: another process's socket (an entry it refreshes) counts; one whose
    process stopped refreshing it lapses."""
    settings.CHAT_MAX_SOCKETS_PER_USER = 1
    client = aioredis.Redis.from_url(django_settings.REDIS_URL)
    try:
        key = sockets.sockets_key(alice.pk)
        await client.zadd(key, {"asgispecific.elsewhere": time.time() + 60})
        async with Client(alice) as refused:
            assert await closed_with(refused) == protocol.CLOSE_TOO_MANY_SOCKETS
        await client.zadd(key, {"asgispecific.elsewhere": time.time() - 1})  # its process died a while ago
        async with Client(alice) as admitted:
            assert await admitted.nothing_more()
            assert await client.zcard(key) == 1  # the lapsed entry went when this one came
    finally:
        await client.aclose()


async def test_an_open_socket_keeps_its_place_by_refreshing_it(alice, settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 1
    settings.CHAT_SOCKET_TTL_SECONDS = 0.6
    async with Client(alice) as first:
        await asyncio.sleep(1.5)  # more than twice its ttl: only the refreshes keep it counted
        async with Client(alice) as second:
            assert await closed_with(second) == protocol.CLOSE_TOO_MANY_SOCKETS
        assert await first.nothing_more()


async def wait_for_a_fresh_minute(seconds_needed: int) -> None:
    if 60 - time.time() % 60 < seconds_needed:  # the window is a clock minute: do not straddle two
        await asyncio.sleep(60 - time.time() % 60)


async def test_opens_per_minute(alice, settings):
    settings.CHAT_LIMIT_OPENS_PER_MINUTE = 3
    await wait_for_a_fresh_minute(10)
    conversation = await Conversation.objects.acreate(owner=alice)
    async with Client(alice) as client:
        for _ in range(3):
            await client.send(opening(conversation))
            assert (await client.recv())["type"] == "history"
        await client.send(opening(conversation))
        refused = await client.recv()
    assert refused["code"] == "rate_limited" and 0 < refused["retry_after"] <= 60
    assert refused["conversation_id"] == str(conversation.pk)


async def test_a_logged_out_socket_over_the_open_limit_is_closed_not_told_to_wait(alice, settings):
    settings.CHAT_LIMIT_OPENS_PER_MINUTE = 1
    await wait_for_a_fresh_minute(10)
    conversation = await Conversation.objects.acreate(owner=alice)
    async with Client(alice) as client:
        await client.send(opening(conversation))
        assert (await client.recv())["type"] == "history"
        await Session.objects.filter(session_key=client.communicator.scope["session"].session_key).adelete()
        await client.send(opening(conversation))
        assert await closed_with(client) == protocol.CLOSE_UNAUTHENTICATED


# --- history pages and the prompt's window ------------------------------------------------------------

LONG = 3000


def long_conversation(user) -> tuple[Conversation, list[int]]:
    """LONG messages (user, reply, ...), in runs of three that share a created_at (ties are ordered by id)."""
    conversation = Conversation.objects.create(owner=user)
    roles = ["user", "assistant"]
    rows = [Message(conversation=conversation, role=roles[i % 2], content=f"message {i}") for i in range(LONG)]
    Message.objects.bulk_create(rows)
    start = timezone.now() - timedelta(days=1)
    rows = list(Message.objects.filter(conversation=conversation).order_by("id"))
    for i, row in enumerate(rows):
        row.created_at = start + timedelta(seconds=i // 3)  # created_at is auto_now_add: set here
        row.reply_to_id = rows[i - 1].pk if row.role == "assistant" else None
    Message.objects.bulk_update(rows, ["created_at", "reply_to"], batch_size=500)
    return conversation, [row.pk for row in rows]


async def test_history_is_one_page_and_earlier_pages_give_the_rest(alice, settings):
    settings.CHAT_LIMIT_OPENS_PER_MINUTE = 0
    conversation, ids = await services.db(long_conversation)(alice)
    page = django_settings.CHAT_HISTORY_PAGE
    async with Client(alice) as client:
        await client.send(opening(conversation))
        history = await client.recv()
        assert history["more"] is True and "before" not in history
        assert [int(m["id"]) for m in history["messages"]] == ids[-page:]
        assert len(json.dumps(history)) < 400 * page  # bounded by the page: all 3000 would take ~600 KB
        seen = [int(m["id"]) for m in history["messages"]]
        while history["more"]:
            oldest = history["messages"][0]["id"]
            await client.send({**opening(conversation), "before": oldest})
            history = await client.recv()
            assert history["before"] == oldest and len(history["messages"]) <= page
            seen = [int(m["id"]) for m in history["messages"]] + seen
        assert seen == ids  # every message once, in order
        # A page is only a read: the socket still follows the conversation.
        ack = await client.say("[tokens=2]", str(conversation.pk))
        assert (await client.recv_until("done"))[-1]["status"] == "complete"
        assert ack["type"] == "ack"


async def test_a_page_before_a_message_of_another_conversation_is_not_found(alice, bob):
    mine = await Conversation.objects.acreate(owner=alice)
    theirs = await Conversation.objects.acreate(owner=bob)
    message = await Message.objects.acreate(conversation=theirs, role="user", content="secret")
    async with Client(alice) as client:
        await client.send({**opening(mine), "before": str(message.pk)})
        assert (await client.recv())["code"] == "not_found"
        await client.send({**opening(mine), "before": 7})
        assert (await client.recv())["code"] == "bad_request"


def test_the_prompt_history_is_one_bounded_query(alice, settings):
    settings.CHAT_PROMPT_HISTORY_MESSAGES = 50
    conversation, ids = long_conversation(alice)
    question = Message.objects.create(conversation=conversation, role="user", content="and now?")
    with CaptureQueriesContext(connection) as queries:
        turns = services.prompt_history(conversation.pk, question.pk)
    assert len(queries) == 1 and "LIMIT 50" in queries[0]["sql"]
    # The latest 50 rows: 25 whole turns, oldest first, ending with the last reply.
    assert len(turns) == 50
    assert turns[0] == {"role": "user", "content": f"message {LONG - 50}"}
    assert turns[-1] == {"role": "assistant", "content": f"message {LONG - 1}"}


def test_a_reply_whose_question_fell_out_of_the_window_is_left_out(alice, settings):
    settings.CHAT_PROMPT_HISTORY_MESSAGES = 3
    conversation, _ = long_conversation(alice)
    question = Message.objects.create(conversation=conversation, role="user", content="and now?")
    turns = services.prompt_history(conversation.pk, question.pk)
    # The window holds reply LONG-3, question LONG-2 and reply LONG-1: the first reply's question is outside.
    assert turns == [{"role": "user", "content": f"message {LONG - 2}"},
                     {"role": "assistant", "content": f"message {LONG - 1}"}]  # fmt: skip


async def test_a_turn_in_a_long_conversation_sends_the_latest_turns(alice, settings, llm_server):
    settings.CHAT_PROMPT_HISTORY_MESSAGES = 20
    conversation, _ = await services.db(long_conversation)(alice)
    async with Client(alice) as client:
        assert (await client.say("and now?", str(conversation.pk)))["type"] == "ack"
        await client.recv_until("done")
    prompt = llm_server.requests[-1]["messages"]
    assert [m["content"] for m in prompt[1:]] == [f"message {i}" for i in range(LONG - 20, LONG)] + ["and now?"]


def test_a_history_page_is_one_query(alice, settings):
    conversation, ids = long_conversation(alice)
    with CaptureQueriesContext(connection) as queries:
        _, rows, more = services.history_page(alice, str(conversation.pk), str(ids[1000]))
    assert [row.pk for row in rows] == ids[1000 - django_settings.CHAT_HISTORY_PAGE : 1000] and more
    assert len(queries) == 3  # the conversation, the cursor's row, the page (LIMIT page + 1)
    assert f"LIMIT {django_settings.CHAT_HISTORY_PAGE + 1}" in queries[-1]["sql"]


@pytest.mark.e2e
def test_the_socket_cap_is_shared_by_processes(site):
    """CHAT_MAX_SOCKETS_PER_USER (20): ten sockets on each of two processes, and the 21st is closed with 4429."""
    name = f"sockets{time.time_ns()}"  # a user of its own
    make_user = f"from django.contrib.auth.models import User; User.objects.create_user('{name}', password='pw-{name}')"
    site.manage("shell", "-c", make_user)
    cookie = login(site.ports[0], name, f"pw-{name}")

    async def scenario() -> int:
        async with contextlib.AsyncExitStack() as stack:
            for port in site.ports:
                for _ in range(10):
                    ws = await stack.enter_async_context(socket(port, cookie))
                    await ws.send("{}")  # answered once the socket is counted and set up
                    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["code"] == "bad_request"
            async with socket(site.ports[1], cookie) as extra:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(extra.recv(), 10)
                return closed.value.rcvd.code

    assert asyncio.run(scenario()) == protocol.CLOSE_TOO_MANY_SOCKETS
