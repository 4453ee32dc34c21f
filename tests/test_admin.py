"""Admins review conversations, usage and latency; message text is read-only."""

import pytest

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(alice):
    conversation = Conversation.objects.create(owner=alice, title="about penguins")
    question = Message.objects.create(conversation=conversation, role="user", content="do penguins fly?")
    Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="No, they swim.",
        reply_to=question,
        model="test-model",
        prompt_tokens=12,
        completion_tokens=5,
        first_token_ms=81,
        latency_ms=240,
    )
    return conversation


def test_conversation_list_search_and_filters(admin_client, conversation):
    page = admin_client.get("/admin/chat/conversation/")
    assert page.status_code == 200
    assert b"about penguins" in page.content
    assert b"17" in page.content  # tokens: 12 + 5
    assert b"about penguins" not in admin_client.get("/admin/chat/conversation/?q=kangaroo").content
    assert b"about penguins" in admin_client.get("/admin/chat/conversation/?q=swim").content
    filtered = admin_client.get(f"/admin/chat/conversation/?owner__id__exact={conversation.owner_id}")
    assert b"about penguins" in filtered.content
    assert b"about penguins" in admin_client.get("/admin/chat/conversation/?messages__status__exact=complete").content


def test_conversation_page_shows_messages_read_only_with_usage(admin_client, conversation):
    page = admin_client.get(f"/admin/chat/conversation/{conversation.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "No, they swim." in html and "do penguins fly?" in html
    assert "240" in html and "81" in html  # latency and time to first token
    # Message text is shown, not editable.
    assert 'name="messages-0-content"' not in html
    assert 'name="messages-1-content"' not in html


def test_message_admin_filters_and_read_only(admin_client, conversation):
    listing = admin_client.get("/admin/chat/message/?status__exact=complete&q=swim")
    assert listing.status_code == 200 and b"No, they swim." in listing.content
    message = Message.objects.get(role="assistant")
    change = admin_client.get(f"/admin/chat/message/{message.pk}/change/").content.decode()
    assert 'name="content"' not in change
