"""Editing a sent message: it and every later message leave the conversation, and the new text is answered."""

import pytest
from asgiref.sync import sync_to_async

from chat import sidebar
from chat.models import Message
from tests.conftest import Client, reply_text

pytestmark = pytest.mark.django_db(transaction=True)


async def three_turns(client: Client) -> list[dict]:
    acks = [await client.say("first question")]
    await client.recv_until("done")
    conversation = acks[0]["conversation_id"]
    for content in ("second question", "third question"):
        acks.append(await client.say(content, conversation))
        await client.recv_until("done")
    return acks


async def test_edit_replaces_the_message_and_everything_after_it(alice, llm_server):
    async with Client(alice) as client, Client(alice) as other:
        acks = await three_turns(client)
        conversation = acks[0]["conversation_id"]
        await other.send({"type": "open", "conversation_id": conversation})
        await other.recv_until("history")

        ack = await client.say("second question, edited", conversation, replaces=acks[1]["user_message_id"])
        assert ack["type"] == "ack"
        frames = await client.recv_until("done")
        assert reply_text(frames, ack["assistant_message_id"]) == "You said: second question, edited"
        # The model saw the turns before the edited message, and not the replaced ones.
        prompt = llm_server.requests[-1]["messages"]
        assert [m["content"] for m in prompt[1:]] == [
            "first question",
            "You said: first question",
            "second question, edited",
        ]

        # Another tab learns what went, then what came, before the reply's text.
        seen = await other.recv_until("done")
        assert seen[0] == {
            "type": "replaced",
            "conversation_id": conversation,
            "message_id": acks[1]["user_message_id"],
        }
        assert [f["message"]["id"] for f in seen[1:3]] == [ack["user_message_id"], ack["assistant_message_id"]]

        await client.send({"type": "open", "conversation_id": conversation})
        history = (await client.recv())["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "first question"),
        ("assistant", "You said: first question"),
        ("user", "second question, edited"),
        ("assistant", "You said: second question, edited"),
    ]
    # The replaced messages are kept, marked, for admins.
    replaced = [m async for m in Message.objects.filter(replaced_at__isnull=False).order_by("id")]
    assert [m.content for m in replaced] == [
        "second question",
        "You said: second question",
        "third question",
        "You said: third question",
    ]


async def test_an_edit_resent_with_its_client_id_is_not_applied_twice(alice):
    async with Client(alice) as client:
        acks = await three_turns(client)
        conversation = acks[0]["conversation_id"]
        edit = {"replaces": acks[2]["user_message_id"], "client_id": "0b6a3c5e-5f7b-4e0a-9d1e-2c3b4a5d6e7f"}
        ack = await client.say("third, edited", conversation, **edit)
        await client.recv_until("done")
        again = await client.say("third, edited", conversation, **edit)
        assert again == ack
        await client.recv_until("done")
    assert await Message.objects.filter(replaced_at__isnull=True).acount() == 6
    assert await Message.objects.filter(replaced_at__isnull=False).acount() == 2


async def test_edits_that_cannot_apply_are_refused_and_replace_nothing(alice, bob):
    async with Client(alice) as client, Client(bob) as b:
        acks = await three_turns(client)
        conversation = acks[0]["conversation_id"]
        bobs = await b.say("bob's question")
        await b.recv_until("done")

        refused = await client.say("x", None, replaces=acks[1]["user_message_id"])
        assert refused["code"] == "bad_request"
        # A reply is not a message one can edit; nor is someone else's message, even in one's own conversation.
        for target in (acks[1]["assistant_message_id"], bobs["user_message_id"]):
            refused = await client.say("x", conversation, replaces=target)
            assert refused["code"] == "not_found", target
        # Bob cannot edit alice's message from his own conversation either.
        refused = await b.say("x", bobs["conversation_id"], replaces=acks[0]["user_message_id"])
        assert refused["code"] == "not_found"

        # While a reply streams, an edit waits like any send: busy.
        await client.say("[tokens=50][delay=0.02]", conversation)
        await client.recv_until("chunk")
        refused = await client.say("x", conversation, replaces=acks[0]["user_message_id"])
        assert refused["code"] == "busy"
        await client.recv_until("done")
    assert not await Message.objects.filter(replaced_at__isnull=False).aexists()


async def test_a_replaced_message_is_not_edited_again_nor_found_by_search(alice):
    async with Client(alice) as client:
        acks = await three_turns(client)
        conversation = acks[0]["conversation_id"]
        await client.say("a brand new second", conversation, replaces=acks[1]["user_message_id"])
        await client.recv_until("done")
        refused = await client.say("x", conversation, replaces=acks[2]["user_message_id"])
        assert refused["code"] == "not_found"
    gone, _ = await sync_to_async(sidebar.page)(alice, "third")
    assert gone == []
    found, _ = await sync_to_async(sidebar.page)(alice, "brand")
    assert [c.pk for c in found] == [int(conversation)]
