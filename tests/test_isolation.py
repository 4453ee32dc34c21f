"""One table over every HTTP view and every frame type: user B and an anonymous visitor are refused every
one of user A's ids, and the refusal is the same as for an id that does not exist (it reveals nothing).
An anonymous socket never gets to send a frame: it is closed with 4401 at once (tests/test_sessions.py)."""

import pytest

from chat.models import Conversation, Message
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)

MISSING = 10**9  # no row has this id

# Every view that takes an id (the admin's included); {id} is a conversation's or a message's.
HTTP = [
    ("conversation", "/c/{id}/"),
    ("conversation", "/admin/chat/conversation/{id}/change/"),
    ("conversation", "/admin/chat/conversation/{id}/delete/"),
    ("conversation", "/admin/chat/conversation/{id}/history/"),
    ("message", "/admin/chat/message/{id}/change/"),
    ("message", "/admin/chat/message/{id}/delete/"),
    ("message", "/admin/chat/message/{id}/history/"),
]


@pytest.fixture
def alices(alice):
    conversation = Conversation.objects.create(owner=alice, title="alice's secret plans")
    question = Message.objects.create(conversation=conversation, role="user", content="the secret question")
    reply = Message.objects.create(conversation=conversation, role="assistant", content="the secret answer",
                                   reply_to=question)  # fmt: skip
    return {"conversation": conversation.pk, "message": reply.pk, "question": question.pk}


def fetch(client, template: str, object_id: int):
    response = client.get(template.format(id=object_id))
    body = response.content.decode()
    # The id itself may be echoed (a login redirect's ?next=): compare with it masked.
    return response.status_code, response.get("Location", "").replace(str(object_id), "ID"), body


@pytest.mark.parametrize("kind,template", HTTP)
@pytest.mark.parametrize("visitor", ["anonymous", "bob"])
def test_http_views_refuse_someone_elses_ids_as_if_they_did_not_exist(client, bob, alices, visitor, kind, template):
    if visitor == "bob":
        client.force_login(bob)
    status, location, body = fetch(client, template, alices[kind])
    assert status in (302, 404), status
    assert "secret" not in body
    missing_status, missing_location, _ = fetch(client, template, MISSING)
    assert (status, location) == (missing_status, missing_location)


def frames_against(ids: dict[str, int], client_id: str) -> list[dict]:
    conversation, reply, question = str(ids["conversation"]), str(ids["message"]), str(ids["question"])
    return [
        {"type": "open", "conversation_id": conversation},
        {"type": "send", "conversation_id": conversation, "client_id": client_id, "content": "let me in"},
        {"type": "send", "conversation_id": conversation, "client_id": client_id, "content": "x", "replaces": question},
        {"type": "stop", "message_id": reply},
        {"type": "regenerate", "message_id": reply},
        {"type": "regenerate", "message_id": question},
    ]


async def test_every_frame_type_refuses_someone_elses_ids_as_if_they_did_not_exist(bob, alices):
    missing = {"conversation": MISSING, "message": MISSING, "question": MISSING}
    client_id = "5d1f2a77-1d0e-4a8f-9a53-3f6d1c1f0a0b"
    async with Client(bob) as b:
        for real, fake in zip(frames_against(alices, client_id), frames_against(missing, client_id), strict=True):
            await b.send(real)
            refused = await b.recv()
            await b.send(fake)
            assert refused == await b.recv(), real  # word for word the same answer
            assert refused["type"] == "error" and refused["code"] == "not_found"
    assert await Message.objects.acount() == 2  # nothing written to alice's conversation, nothing stopped
    assert await Message.objects.filter(status="complete").acount() == 2
