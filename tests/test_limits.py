"""Limits per user and per address (chat/limits.py): each refuses with `rate_limited` and `retry_after`
(HTTP 429 and Retry-After on pages), writes nothing, and is counted where every process sees it."""

import asyncio
import json
import threading
import time
import uuid

import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction

from chat.models import Conversation, Message
from tests.conftest import Client
from tests.servers import login
from tests.test_resilience import frames_until, send, socket

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_fourth_reply_at_once_is_refused(alice):
    async with Client(alice) as a, Client(alice) as b, Client(alice) as c, Client(alice) as d:
        for tab in (a, b, c):  # three slow replies at once, from three tabs
            assert (await tab.say("[tokens=3][first_delay=3]"))["type"] == "ack"
        refused = await d.say("one more")
        assert refused["code"] == "rate_limited" and refused["retry_after"] > 0
        assert await Message.objects.filter(content="one more").acount() == 0
        for tab in (a, b, c):
            await tab.recv_until("done")
        assert (await d.say("now there is room"))["type"] == "ack"
        await d.recv_until("done")


async def test_messages_per_minute(alice, settings):
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 3
    if 60 - time.time() % 60 < 10:  # the window is a clock minute: do not straddle two
        await asyncio.sleep(60 - time.time() % 60)
    async with Client(alice) as client:
        for i in range(3):
            assert (await client.say(f"message {i}"))["type"] == "ack"
            await client.recv_until("done")
        refused = await client.say("message 3")
    assert refused["code"] == "rate_limited" and 0 < refused["retry_after"] <= 60
    assert "3 messages this minute" in refused["message"]
    assert await Message.objects.filter(content="message 3").acount() == 0


async def same_minute() -> None:
    """The per-minute window is a clock minute: a test that counts in it must not straddle two."""
    if 60 - time.time() % 60 < 15:
        await asyncio.sleep(60 - time.time() % 60)


async def test_a_send_over_the_minute_limit_is_refused_without_taking_the_conversation_lock(alice, settings):
    """The count is read before the turn's transaction: a refused send never waits on the lock."""
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 1
    await same_minute()
    async with Client(alice) as client:
        first = await client.say("one")
        await client.recv_until("done")
        locked, release = threading.Event(), threading.Event()

        def hold_the_conversation() -> None:
            try:
                with transaction.atomic():
                    Conversation.objects.select_for_update().get(pk=first["conversation_id"])
                    locked.set()
                    release.wait(15)
            finally:
                connection.close()

        holder = threading.Thread(target=hold_the_conversation)
        holder.start()
        try:
            assert await asyncio.to_thread(locked.wait, 5)
            started = time.monotonic()
            refused = await client.say("two", first["conversation_id"])
            waited = time.monotonic() - started
            assert holder.is_alive()  # the lock was held all along
        finally:
            release.set()
            await asyncio.to_thread(holder.join, 5)
    assert refused["code"] == "rate_limited" and "1 messages this minute" in refused["message"]
    assert waited < settings.DATABASE_LOCK_TIMEOUT / 2  # it did not wait for the lock (nor time out on it)


async def test_a_send_that_makes_nothing_is_not_counted(alice, settings):
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 2
    await same_minute()
    async with Client(alice) as client:
        first = await client.say("[tokens=3][first_delay=2]")  # counted: 1
        for _ in range(3):  # refused as busy: their transactions made nothing, and nothing is counted
            assert (await client.say("meanwhile", first["conversation_id"]))["code"] == "busy"
        await client.recv_until("done")
        assert (await client.say("two", first["conversation_id"]))["type"] == "ack"  # counted: 2
        await client.recv_until("done")
        refused = await client.say("three", first["conversation_id"])
    assert refused["code"] == "rate_limited"


async def test_a_resend_over_the_minute_limit_still_gets_its_ack(alice, settings):
    """A resend of a known client_id makes nothing new: the limit does not stand between it and its ack."""
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 1
    await same_minute()
    async with Client(alice) as client:
        ack = await client.say("one", client_id=(client_id := str(uuid.uuid4())))
        await client.recv_until("done")
        assert (await client.say("two"))["code"] == "rate_limited"
        again = await client.say("one", client_id=client_id)
    assert again == ack


async def test_a_client_id_known_in_another_conversation_does_not_pass_the_minute_limit(alice, settings):
    """Only a resend to the conversation it was sent to makes nothing new; the same client_id sent to
    another conversation is a new turn, so the limit applies to it (else any old client_id was a pass)."""
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 2
    await same_minute()
    async with Client(alice) as client:
        await client.say("one", client_id=(client_id := str(uuid.uuid4())))
        await client.recv_until("done")
        other = await client.say("two")
        await client.recv_until("done")
        refused = await client.say("one again", other["conversation_id"], client_id=client_id)
    assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
    assert await Message.objects.filter(conversation__owner=alice, role="user").acount() == 2


async def test_conversations_per_user(alice, settings):
    settings.CHAT_LIMIT_CONVERSATIONS = 2
    async with Client(alice) as client:
        first = await client.say("one")
        await client.recv_until("done")
        await client.say("two")
        await client.recv_until("done")
        refused = await client.say("three")
        assert refused["code"] == "rate_limited" and refused["retry_after"] is None
        # The conversations there are still take messages.
        assert (await client.say("more", first["conversation_id"]))["type"] == "ack"
        await client.recv_until("done")
    assert await Conversation.objects.acount() == 2


def test_signups_per_address(client, settings):
    settings.SIGNUP_LIMIT_PER_HOUR = 2
    for name in ("ann", "ben"):
        form = {"username": name, "password1": "a-Long-pass-123", "password2": "a-Long-pass-123"}
        assert client.post("/accounts/signup/", form).status_code == 302
        client.logout()
    form = {"username": "cat", "password1": "a-Long-pass-123", "password2": "a-Long-pass-123"}
    refused = client.post("/accounts/signup/", form)
    assert refused.status_code == 429 and 0 < int(refused["Retry-After"]) <= 3600
    assert b"Too many accounts" in refused.content
    assert not User.objects.filter(username="cat").exists()


def test_failed_logins_per_username(client, settings, django_user_model):
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    django_user_model.objects.create_user("dora", password="right-pass-123")
    django_user_model.objects.create_user("eve", password="right-pass-456")
    for _ in range(3):
        assert client.post("/accounts/login/", {"username": "dora", "password": "wrong"}).status_code == 200
    # Now even the right password waits: guessing cannot go on.
    refused = client.post("/accounts/login/", {"username": "dora", "password": "right-pass-123"})
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert b"Too many failed attempts" in refused.content
    assert "_auth_user_id" not in client.session
    # Another username from the same address is not blocked by dora's failures.
    assert client.post("/accounts/login/", {"username": "eve", "password": "right-pass-456"}).status_code == 302


def test_failed_logins_per_address(client, settings, django_user_model):
    settings.LOGIN_FAILURES_PER_ADDRESS = 4
    django_user_model.objects.create_user("fred", password="right-pass-123")
    for name in ("u1", "u2", "u3", "u4"):  # a different username each time
        client.post("/accounts/login/", {"username": name, "password": "wrong"})
    refused = client.post("/accounts/login/", {"username": "fred", "password": "right-pass-123"})
    assert refused.status_code == 429


@pytest.mark.e2e
def test_the_message_count_is_shared_by_processes(site):
    """20 messages a minute per user: 10 through each process, and the 21st is refused."""
    name = f"limits{time.time_ns()}"  # a user of its own: other tests' messages do not count
    make_user = f"from django.contrib.auth.models import User; User.objects.create_user('{name}', password='pw-{name}')"
    site.manage("shell", "-c", make_user)
    cookie = login(site.ports[0], name, f"pw-{name}")
    if 60 - time.time() % 60 < 20:  # the window is a clock minute: do not straddle two
        time.sleep(60 - time.time() % 60)

    async def scenario() -> dict:
        for port in site.ports:
            async with socket(port, cookie) as ws:
                for _ in range(10):
                    await ws.send(send(None, "[tokens=1]"))
                    assert (await frames_until(ws, "done"))[0]["type"] == "ack"
        async with socket(site.ports[0], cookie) as ws:
            await ws.send(send(None, "[tokens=1]"))
            return json.loads(await ws.recv())

    refused = asyncio.run(scenario())
    assert refused["code"] == "rate_limited" and refused["retry_after"] > 0
