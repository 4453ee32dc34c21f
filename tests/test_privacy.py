"""Nobody sees or touches another user's conversations, over WebSocket or HTTP."""

import json

import pytest
from channels.testing import WebsocketCommunicator

from chat.models import Conversation, Message
from chatsite.asgi import application
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)


async def test_logged_in_socket_over_the_full_stack(alice, client):
    """Session cookie -> AuthMiddlewareStack -> consumer, as in the browser."""
    from asgiref.sync import sync_to_async

    await sync_to_async(client.force_login)(alice)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    communicator = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1"), (b"cookie", cookie)]
    )
    connected, _ = await communicator.connect()
    assert connected
    await communicator.send_to(text_data=json.dumps({"type": "open", "conversation_id": "999999"}))
    assert json.loads(await communicator.receive_from())["code"] == "not_found"
    await communicator.disconnect()


async def test_socket_closes_with_4401_after_logout(alice, client):
    from asgiref.sync import sync_to_async

    await sync_to_async(client.force_login)(alice)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    communicator = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1"), (b"cookie", cookie)]
    )
    assert (await communicator.connect())[0]
    await sync_to_async(client.logout)()  # e.g. in another tab
    await communicator.send_to(text_data=json.dumps({"type": "open", "conversation_id": "1"}))
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_other_user_cannot_open_stop_or_regenerate(alice, bob):
    async with Client(alice) as a:
        ack = await a.say("[tokens=50][delay=0.02]")
        async with Client(bob) as b:
            for frame in (
                {"type": "open", "conversation_id": ack["conversation_id"]},
                {"type": "stop", "message_id": ack["assistant_message_id"]},
                {"type": "regenerate", "message_id": ack["assistant_message_id"]},
                {"type": "regenerate", "message_id": ack["user_message_id"]},
            ):
                await b.send(frame)
                answer = await b.recv()
                # The same answer as for an id that does not exist: no hint that it does.
                assert answer["type"] == "error" and answer["code"] == "not_found", frame
            await b.send(
                {
                    "type": "send",
                    "conversation_id": ack["conversation_id"],
                    "client_id": "0b6b7a4e-7a0e-4c1e-9d0e-1a2b3c4d5e6f",
                    "content": "hi",
                }
            )
            assert (await b.recv())["code"] == "not_found"
            # Bob's socket gets nothing of Alice's stream.
            assert await b.nothing_more(0.3)
        frames = await a.recv_until("done")
    assert frames[-1]["status"] == "complete"
    assert await Message.objects.filter(conversation__owner=bob).acount() == 0
    assert await Conversation.objects.filter(owner=bob).acount() == 0


def test_chat_pages_need_login_and_ownership(client, alice, bob):
    assert client.get("/").status_code == 302
    conversation = Conversation.objects.create(owner=alice, title="alice's secret plans")
    client.force_login(bob)
    response = client.get("/")
    assert response.status_code == 200
    assert b"alice&#x27;s secret plans" not in response.content
    assert client.get(f"/c/{conversation.pk}/").status_code == 404
    client.force_login(alice)
    page = client.get(f"/c/{conversation.pk}/")
    assert page.status_code == 200
    assert b"alice&#x27;s secret plans" in page.content


def test_signup_logs_in_and_login_page_has_csrf(client, django_user_model):
    page = client.get("/accounts/signup/")
    assert b"csrfmiddlewaretoken" in page.content
    response = client.post(
        "/accounts/signup/", {"username": "carol", "password1": "a-long-pass-123", "password2": "a-long-pass-123"}
    )
    assert response.status_code == 302
    assert django_user_model.objects.filter(username="carol").exists()
    assert client.get("/").status_code == 200
    assert b"csrfmiddlewaretoken" in client.get("/accounts/login/").content
