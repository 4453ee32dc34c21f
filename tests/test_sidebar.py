"""The sidebar's list over HTTP: newest first, paged, searched, renamed, deleted; only one's own."""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from chat import sidebar
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


def conversation(user, title, *texts, minutes_ago=0):
    made = user.conversations.create(title=title)
    for text in texts:
        Message.objects.create(conversation=made, role="user", content=text)
    Conversation.objects.filter(pk=made.pk).update(updated_at=timezone.now() - timedelta(minutes=minutes_ago))
    return made


def titles(response):
    return [c["title"] for c in response.json()["conversations"]]


def test_the_list_is_newest_first_paged_without_repeats_and_private(client, alice, bob, monkeypatch):
    monkeypatch.setattr(sidebar, "PAGE_SIZE", 2)
    for i in range(5):
        conversation(alice, f"alice {i}", minutes_ago=i)
    conversation(bob, "bob's")
    client.force_login(alice)
    first = client.get("/conversations/").json()
    assert [c["title"] for c in first["conversations"]] == ["alice 0", "alice 1"]
    second = client.get("/conversations/", {"before": first["next"]}).json()
    third = client.get("/conversations/", {"before": second["next"]}).json()
    assert [c["title"] for c in second["conversations"] + third["conversations"]] == ["alice 2", "alice 3", "alice 4"]
    assert third["next"] is None
    assert client.get("/conversations/", {"before": "yesterday"}).status_code == 400


def test_search_finds_words_in_titles_and_message_text_by_prefix(client, alice, bob):
    conversation(alice, "Trip to Lisbon", "book the train")
    conversation(alice, "Groceries", "buy Tomatoes and bread", minutes_ago=5)
    conversation(alice, "Taxes", "the deadline is in May", minutes_ago=10)
    conversation(bob, "Bob's tomatoes", "tomatoes everywhere")
    client.force_login(alice)
    assert titles(client.get("/conversations/", {"q": "lisb"})) == ["Trip to Lisbon"]
    assert titles(client.get("/conversations/", {"q": "TOMATO"})) == ["Groceries"]  # not bob's
    assert titles(client.get("/conversations/", {"q": "buy bread"})) == ["Groceries"]  # every word
    assert titles(client.get("/conversations/", {"q": "buy taxes"})) == []
    assert titles(client.get("/conversations/", {"q": "  ?! "})) == ["Trip to Lisbon", "Groceries", "Taxes"]


def test_search_uses_the_indexes():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a tiny table: ask whether the index can serve at all
        cursor.execute(
            "EXPLAIN SELECT id FROM chat_message WHERE to_tsvector('simple'::regconfig, COALESCE(content, '')) "
            "@@ to_tsquery('simple', 'tomato:*')"
        )
        plan = " ".join(row[0] for row in cursor.fetchall())
    assert "message_content_search" in plan


def rename(client, pk, title):
    return client.post(f"/conversations/{pk}/rename/", json.dumps({"title": title}), content_type="application/json")


def test_rename_and_delete_only_ones_own(client, alice, bob):
    mine = conversation(alice, "Old name", "hello")
    client.force_login(bob)
    assert rename(client, mine.pk, "Mine now").status_code == 404
    assert client.post(f"/conversations/{mine.pk}/delete/").status_code == 404
    client.force_login(alice)
    before = Conversation.objects.get(pk=mine.pk).updated_at
    assert rename(client, mine.pk, "  New   name ").json()["title"] == "New name"
    after = Conversation.objects.get(pk=mine.pk)
    assert after.title == "New name" and after.updated_at == before  # renaming does not move it up the list
    assert rename(client, mine.pk, " ").status_code == 400
    assert client.post(f"/conversations/{mine.pk}/delete/").json() == {"deleted": str(mine.pk)}
    assert not Conversation.objects.filter(pk=mine.pk).exists()
    assert not Message.objects.filter(conversation_id=mine.pk).exists()


@pytest.mark.django_db(transaction=True)
async def test_a_rename_or_delete_reaches_every_tab_of_the_owner_and_nobody_elses(alice, bob):
    from asgiref.sync import sync_to_async
    from django.test import Client as HttpClient

    from tests.conftest import Client

    made = await sync_to_async(conversation)(alice, "Old name", "hello")
    browser = HttpClient()
    await sync_to_async(browser.force_login)(alice)
    async with Client(alice) as tab, Client(bob) as theirs:
        await sync_to_async(rename)(browser, made.pk, "New name")
        frame = await tab.recv()
        assert frame["type"] == "conversation" and frame["deleted"] is False
        assert frame["conversation"]["id"] == str(made.pk) and frame["conversation"]["title"] == "New name"
        await sync_to_async(browser.post)(f"/conversations/{made.pk}/delete/")
        frame = await tab.recv()
        assert frame["type"] == "conversation" and frame["deleted"] is True
        assert frame["conversation"]["id"] == str(made.pk)
        assert await theirs.nothing_more(0.5)
