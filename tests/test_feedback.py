"""Thumbs up or down on a reply: saved per user, private, shown again in history and in admin."""

import json

import pytest

from chat.models import Feedback, Message
from chat.services import db
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)


def exchange(user, content="hello"):
    conversation = user.conversations.create(title=content)
    question = Message.objects.create(conversation=conversation, role="user", content=content)
    reply = Message.objects.create(
        conversation=conversation, role="assistant", content="Hi!", reply_to=question, model="test-model"
    )
    return question, reply


def rate(client, message_id, body):
    return client.post(f"/feedback/{message_id}/", json.dumps(body), content_type="application/json")


def test_a_rating_and_comment_are_saved_and_a_second_replaces_the_first(client, alice):
    _, reply = exchange(alice)
    client.force_login(alice)
    response = rate(client, reply.pk, {"rating": 1, "comment": " Clear and short "})
    assert response.status_code == 200
    assert response.json() == {"message_id": str(reply.pk), "rating": 1, "comment": "Clear and short"}
    assert rate(client, reply.pk, {"rating": -1}).status_code == 200
    feedback = Feedback.objects.get()
    assert (feedback.message_id, feedback.user_id, feedback.rating, feedback.comment) == (reply.pk, alice.pk, -1, "")


def test_bad_feedback_is_refused_with_a_reason(client, alice):
    question, reply = exchange(alice)
    client.force_login(alice)
    assert rate(client, reply.pk, {"rating": 5}).json() == {"error": "`rating` must be 1 (good) or -1 (bad)."}
    assert rate(client, reply.pk, {"comment": "no rating"}).status_code == 400
    assert client.post(f"/feedback/{reply.pk}/", "{not json", content_type="application/json").status_code == 400
    assert rate(client, reply.pk, {"rating": 1, "comment": "x" * 2001}).status_code == 400
    assert rate(client, question.pk, {"rating": 1}).status_code == 404  # a user message is not rated
    assert client.get(f"/feedback/{reply.pk}/").status_code == 405
    assert not Feedback.objects.exists()


def test_someone_elses_reply_cannot_be_rated(client, alice, bob):
    _, reply = exchange(alice)
    client.force_login(bob)
    assert rate(client, reply.pk, {"rating": -1}).status_code == 404
    client.logout()
    assert rate(client, reply.pk, {"rating": -1}).status_code == 302  # to the login page
    assert not Feedback.objects.exists()


async def test_history_shows_each_users_own_rating(alice):
    _, reply = await db(exchange)(alice)
    await Feedback.objects.acreate(message=reply, user=alice, rating=1)
    async with Client(alice) as client:
        await client.send({"type": "open", "conversation_id": str(reply.conversation_id)})
        history = await client.recv()
    assert [m["feedback"] for m in history["messages"]] == [None, 1]


def test_admin_lists_feedback_with_filters_and_counts_per_model(admin_client, alice):
    _, reply = exchange(alice)
    Feedback.objects.create(message=reply, user=alice, rating=-1, comment="Wrong year")
    html = admin_client.get("/admin/chat/feedback/").content.decode()
    assert "Wrong year" in html
    assert "By rating" in html and "By model" in html
    assert "<tr><td>test-model</td><td>0</td><td>1</td></tr>" in html
