"""A socket's login is checked as an HTTP request's is: expiry, password change and deactivation close it
with 4401, at its next frame and, for a socket that only receives, within CHAT_SESSION_CHECK_SECONDS."""

import asyncio
import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.models import Session
from django.utils import timezone

from chatsite.asgi import application
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)

CLOSED = {"type": "websocket.close", "code": 4401}


async def expire(client: Client) -> None:
    key = client.communicator.scope["session"].session_key
    await Session.objects.filter(session_key=key).aupdate(expire_date=timezone.now() - timedelta(seconds=1))


async def change_password(user) -> None:
    user.set_password("a-new-password-456")
    await user.asave()


async def deactivate(user) -> None:
    user.is_active = False
    await user.asave(update_fields=["is_active"])


@pytest.mark.parametrize("end_login", ["expire", "change_password", "deactivate"])
async def test_next_frame_after_the_login_ends_closes_the_socket(alice, end_login):
    async with Client(alice) as client:
        ack = await client.say("[tokens=3]")
        await client.recv_until("done")
        if end_login == "expire":
            await expire(client)  # the row is still there: only its expiry date says it is over
        elif end_login == "change_password":
            await change_password(alice)
        else:
            await deactivate(alice)
        await client.send({"type": "open", "conversation_id": ack["conversation_id"]})
        assert await client.communicator.receive_output(timeout=5) == CLOSED


MALFORMED = {
    "not JSON": {"text_data": "{not json"},
    "unknown type": {"text_data": '{"type": "teleport"}'},
    "missing field": {"text_data": '{"type": "open"}'},
    "bad send": {"text_data": '{"type": "send", "conversation_id": null, "content": "hi"}'},
    "binary": {"bytes_data": b"\x00\x01"},
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_frame_after_the_login_ends_closes_the_socket(alice, frame):
    """Not `bad_request`: a logged-out socket is told nothing but that its login is over."""
    async with Client(alice) as client:
        await client.communicator.send_to(**frame)
        assert (await client.recv())["code"] == "bad_request"  # logged in: told what was wrong
        await expire(client)
        await client.communicator.send_to(**frame)
        assert await client.communicator.receive_output(timeout=5) == CLOSED


async def test_a_socket_that_only_receives_is_closed_soon_after_its_session_expires(alice, settings):
    settings.CHAT_SESSION_CHECK_SECONDS = 0.5
    async with Client(alice) as writer, Client(alice) as reader:
        first = await writer.say("[tokens=3]")
        await writer.recv_until("done")
        await reader.send({"type": "open", "conversation_id": first["conversation_id"]})
        assert (await reader.recv())["type"] == "history"
        await expire(reader)
        # The reader sends nothing; the writer's long reply is pushed to it.
        await writer.say("[tokens=1000][delay=0.01]", first["conversation_id"])  # 10 s of reply
        received = []
        started = asyncio.get_running_loop().time()
        while True:
            output = await reader.communicator.receive_output(timeout=5)
            if output["type"] == "websocket.close":
                break
            received.append(json.loads(output["text"]))
        assert output == CLOSED
        assert asyncio.get_running_loop().time() - started < 5  # checks every 0.5 s; slack for a busy machine
        # It saw the start of the reply, never its end.
        assert received and all(frame["type"] != "done" for frame in received)
        await writer.recv_until("done")  # the writer's own session is untouched


async def test_a_socket_with_no_login_is_closed_with_4401_not_refused():
    """A refused handshake reaches the page as 1006, which looks like a network failure to retry."""
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1")])
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_output(timeout=5) == CLOSED


async def test_a_foreign_origin_is_refused_even_with_a_valid_session(alice, client):
    await sync_to_async(client.force_login)(alice)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    headers = [(b"cookie", cookie)]
    same_origin = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1"), *headers])
    assert (await same_origin.connect())[0]  # the session alone would get in
    await same_origin.disconnect()
    foreign = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://evil.example"), *headers])
    connected, _ = await foreign.connect()
    assert not connected
