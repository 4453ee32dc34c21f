"""Titles of new conversations: the first message at once, then one written by the model, live in every tab."""

import pytest
from asgiref.sync import sync_to_async

from chat import titles
from chat.models import Conversation
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    "answer,title",
    [
        ("Garden party plans", "Garden party plans"),
        ('Title: "Garden party plans."', "Garden party plans"),
        ("**Trip to Rome**\n\nThis conversation is about...", "Trip to Rome"),
        ("\n\n  # Fixing brakes  \n", "Fixing brakes"),
        ("« Voyage à Rome »", "Voyage à Rome"),
        ("x" * 200, "x" * 79 + "…"),
        ("  \n '' \n", ""),
    ],
)
def test_the_models_answer_is_cleaned_into_one_short_line(answer, title):
    assert titles.cleaned(answer) == title


async def test_the_model_titles_a_new_conversation_after_its_first_reply(alice, llm_server):
    async with Client(alice) as client, Client(alice) as elsewhere:
        ack = await client.say("We need to plan the garden party for June [title=Garden_party_in_June]")
        frames = await client.recv_until("conversation")
        assert [f["type"] for f in frames][-2:] == ["done", "conversation"]  # after the reply, never before
        assert frames[-1]["conversation"]["title"] == "Garden party in June"
        assert frames[-1]["conversation"]["id"] == ack["conversation_id"]
        # Another tab of the same user, showing no conversation, hears it too.
        heard = await elsewhere.recv_until("conversation")
        assert heard[-1] == frames[-1]
        await client.say("and the guests?", ack["conversation_id"])
        await client.recv_until("done")
        assert await client.nothing_more()
    conversation = await Conversation.objects.aget(pk=ack["conversation_id"])
    assert conversation.title == "Garden party in June"
    # One title request, quoting the first exchange; the second turn asked for none.
    (request,) = llm_server.title_requests
    assert "plan the garden party for June" in request["messages"][-1]["content"]
    assert "You said: We need to plan" in request["messages"][-1]["content"]


async def test_a_failed_first_reply_or_titles_switched_off_keep_the_first_message(alice, llm_server, settings):
    async with Client(alice) as client:
        await client.say("This fails [status=500] [title=Never]")
        assert (await client.recv_until("done"))[-1]["status"] == "error"
        settings.CHAT_TITLES = "first_message"
        ack = await client.say("No model title here [title=Never]")
        await client.recv_until("done")
        assert await client.nothing_more()
    assert llm_server.title_requests == []
    assert (await Conversation.objects.aget(pk=ack["conversation_id"])).title == "No model title here [title=Never]"


def test_by_default_remote_models_write_titles_and_the_offline_model_does_not(settings):
    settings.CHAT_TITLES = "auto"
    settings.LLM_PROVIDER = "openai"
    assert titles.by_model()
    settings.LLM_PROVIDER = "local"
    assert not titles.by_model()
    settings.CHAT_TITLES = "model"
    assert titles.by_model()


def test_a_title_never_overwrites_a_rename(alice):
    conversation = Conversation.objects.create(owner=alice, title="first message")
    Conversation.objects.filter(pk=conversation.pk).update(title="Renamed by the user")
    assert titles.save(conversation.pk, "first message", "Model title") is None
    conversation.refresh_from_db()
    assert conversation.title == "Renamed by the user"
    assert titles.save(conversation.pk + 1000, "first message", "Model title") is None  # deleted meanwhile
    unchanged = Conversation.objects.create(owner=alice, title="first message")
    saved = titles.save(unchanged.pk, "first message", "Model title")
    assert saved.title == "Model title"
    assert saved.updated_at == unchanged.updated_at  # a title does not move it up the sidebar


async def test_a_provider_that_fails_on_the_title_keeps_the_first_message(alice, llm_server, monkeypatch):
    async def broken(*args):
        raise titles_error

    from chat.llm import ProviderError

    titles_error = ProviderError("provider_error", "down")
    monkeypatch.setattr(titles, "ask", broken)
    async with Client(alice) as client:
        ack = await client.say("Still titled by its message [title=Never]")
        assert (await client.recv_until("done"))[-1]["status"] == "complete"
        assert await client.nothing_more()
    title = await sync_to_async(lambda: Conversation.objects.get(pk=ack["conversation_id"]).title)()
    assert title == "Still titled by its message [title=Never]"
