"""Property-based fuzzing of client frames, as a hostile client would send them.

Malformed frames (wrong types, missing fields, not JSON, nested too deep, binary), and well-formed ones
with hostile values: unicode content; ids that are huge, negative, over 2^63, spelled oddly, or name
another user's real objects; edits (`replaces`) of someone else's messages; `use_documents` true, false
or garbage; client_ids reused, or another user's. Whatever is sent: the socket stays open, each frame
gets a well-formed answer (an error only with a documented code), and bob's data is neither changed
nor shown. Over the run, valid frames did reach the turn (acks, edits, regenerates): the test proves it
exercised that path, not only the parser.
"""

import asyncio
import json
import uuid
from collections import Counter

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import channel_layers
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from chat.models import Conversation, Message
from chat.replies import running
from chat.replies.control import ControlDispatcher
from tests.conftest import Client

pytestmark = pytest.mark.django_db(transaction=True)

DOCUMENTED_CODES = {"bad_request", "too_large", "not_found", "busy", "rate_limited"}
# Every server frame, with the fields it always has (docs/protocol.md).
SHAPES = {
    "error": {"code", "message"},
    "ack": {"client_id", "conversation_id", "user_message_id", "assistant_message_id"},
    "history": {"conversation_id", "title", "use_documents", "messages"},
    "message": {"message"},
    "replaced": {"conversation_id", "message_id"},
    "chunk": {"message_id", "offset", "delta"},
    "sources": {"message_id", "sources"},
    "status": {"message_id", "state"},
    "done": {"message_id", "status", "usage", "error"},
    "conversation": {"conversation", "deleted"},
    "document": {"document", "stage", "done", "total"},
}
# Pushed whenever they happen, not the answer to a frame.
PUSHED = {"chunk", "sources", "status", "done", "conversation", "document", "replaced"}
SENTINEL = '{"type": "fuzz-sentinel"}'  # answered with one error frame: everything before it answers the frame
SECRET = "bob-secret"


class Ref(str):
    """An id named by what it points at, resolved when the frame is sent (the objects change)."""


# --- strategies ----------------------------------------------------------------------------------

# Any JSON value, nested a little.
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
REFS = [
    "own_conversation",
    "own_user_message",
    "own_reply",
    "other_own_conversation",  # another of alice's conversations (made by an earlier send)
    "bob_conversation",
    "bob_question",
    "bob_reply",
    "bob_streaming",
    "missing",
    "over_bigint",  # 2^63 and more: no bigint holds it
    "negative",
    "zero",
    "own_conversation_spelled_oddly",  # " 5", "05", "+5", "٥": int() takes them, the protocol must not
    "bob_conversation_spelled_oddly",
]
ids = st.sampled_from(REFS).map(Ref) | values | st.text(max_size=30)
# Text with what PostgreSQL or UTF-8 cannot hold.
hostile_text = st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Lo", "So"]), max_size=40)
# Valid content: any storable text (no "[", which would script the test model).
contents = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00[]"), min_size=1, max_size=60
).filter(str.strip)
bad_content = st.one_of(
    values.filter(lambda v: not isinstance(v, str)),
    st.text(alphabet=" \t\n", max_size=5),
    st.tuples(st.text(max_size=20), st.sampled_from(["\x00", "\ud800", "\udfff"]), st.text(max_size=20)).map("".join),
    st.integers(16_001, 30_000).map(lambda n: "x" * n),  # longer than CHAT_MAX_MESSAGE_CHARS
)
client_ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.sampled_from([Ref("last_client_id"), Ref("bob_client_id")]),  # a resend, or bob's
    values,
    hostile_text,
)
use_documents = st.booleans() | values


def send_frames(conversation, **fields) -> st.SearchStrategy:
    optional = {"replaces": st.none() | ids, "use_documents": use_documents}
    return st.fixed_dictionaries(
        {"type": st.just("send"), "conversation_id": conversation, "client_id": client_ids, "content": contents}
        | fields,
        optional={name: value for name, value in optional.items() if name not in fields},
    )


valid_frames = st.one_of(
    send_frames(st.none() | st.just(Ref("own_conversation")) | ids),
    # An edit: of alice's own message, or of anything else, in her conversation.
    send_frames(st.just(Ref("own_conversation")), replaces=st.just(Ref("own_user_message")) | ids),
    st.fixed_dictionaries({"type": st.just("open"), "conversation_id": ids}),
    st.fixed_dictionaries({"type": st.just("regenerate"), "message_id": st.just(Ref("own_reply")) | ids}),
    st.fixed_dictionaries({"type": st.just("stop"), "message_id": ids}),
)
malformed_frames = st.one_of(
    # Known types with wrong, missing or dangling fields.
    st.fixed_dictionaries(
        {"type": st.sampled_from(["open", "stop", "regenerate"])},
        optional={"conversation_id": values, "message_id": values, "extra": values},
    ),
    st.fixed_dictionaries(
        {"type": st.just("send"), "content": bad_content},
        optional={"conversation_id": ids, "client_id": client_ids, "replaces": ids, "use_documents": use_documents},
    ),
    # Unknown or non-string types, and JSON that is not an object.
    st.fixed_dictionaries({"type": values.filter(lambda t: t not in ("open", "send", "stop", "regenerate"))}),
    values.filter(lambda v: not isinstance(v, dict)),
)
raw_frames = st.one_of(
    # Not JSON at all, invalid Unicode included.
    st.text(max_size=200) | hostile_text,
    # Nested deeper than the JSON parser's recursion limit.
    st.integers(900, 30_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(900, 10_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    # Binary frames.
    st.binary(max_size=100),
)
# Valid shapes weigh most: they are the ones that reach the turn.
frames = st.one_of(valid_frames, valid_frames, valid_frames, valid_frames, malformed_frames, raw_frames)


# --- the world: alice fuzzes, bob's objects must stay untouched and unseen -------------------------


@pytest.fixture
def world(alice, bob) -> dict:
    home = Conversation.objects.create(owner=alice, title="home")
    question = Message.objects.create(conversation=home, role="user", content="hello", client_id=uuid.uuid4())
    reply = Message.objects.create(conversation=home, role="assistant", content="You said: hello", reply_to=question)
    theirs = Conversation.objects.create(owner=bob, title=f"{SECRET} title")
    bob_question = Message.objects.create(conversation=theirs, role="user", content=f"{SECRET} question",
                                          client_id=uuid.uuid4())  # fmt: skip
    bob_reply = Message.objects.create(conversation=theirs, role="assistant", content=f"{SECRET} answer",
                                       reply_to=bob_question)  # fmt: skip
    elsewhere = Conversation.objects.create(owner=bob, title=f"{SECRET} elsewhere")
    asked = Message.objects.create(conversation=elsewhere, role="user", content=f"{SECRET} asked")
    streaming = Message.objects.create(conversation=elsewhere, role="assistant", status="streaming",
                                       content=f"{SECRET} so far", reply_to=asked)  # fmt: skip
    return {
        "alice": alice,
        "bob": bob,
        "own_conversation": home.pk,
        "bob_conversation": theirs.pk,
        "bob_question": bob_question.pk,
        "bob_reply": bob_reply.pk,
        "bob_streaming": streaming.pk,
        "bob_client_id": str(bob_question.client_id),
        "made": {"user": {str(question.pk)}, "assistant": {str(reply.pk)}},
    }


def bobs_data(world: dict) -> list:
    conversations = Conversation.objects.filter(owner=world["bob"]).order_by("pk")
    messages = Message.objects.filter(conversation__owner=world["bob"]).order_by("pk")
    return [list(conversations.values()), list(messages.values())]


ODD_SPELLINGS = [" {}", "0{}", "+{}", "{}\n", "{}_0"]
ARABIC_DIGITS = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def resolve(world: dict, draw_index: int, ref: Ref) -> str:
    alice, home = world["alice"], world["own_conversation"]
    shown = Message.objects.shown().filter(conversation_id=home)
    spelled = (ODD_SPELLINGS + ["arabic"])[draw_index % (len(ODD_SPELLINGS) + 1)]

    def oddly(pk: int) -> str:
        return str(pk).translate(ARABIC_DIGITS) if spelled == "arabic" else spelled.format(pk)

    if ref == "own_user_message":
        found = shown.filter(role="user").values_list("pk", flat=True).last()
    elif ref == "own_reply":
        found = shown.filter(role="assistant").values_list("pk", flat=True).last()
    elif ref == "last_client_id":  # a resend of alice's latest message
        return str(Message.objects.filter(conversation__owner=alice, role="user").latest("pk").client_id)
    elif ref == "other_own_conversation":
        found = Conversation.objects.filter(owner=alice).exclude(pk=home).values_list("pk", flat=True).last()
    elif ref == "missing":
        found = (Message.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 10_000
    elif ref == "over_bigint":
        found = 2**63 + draw_index
    elif ref == "negative":
        found = -1 - draw_index
    elif ref == "zero":
        found = 0
    elif ref.endswith("_spelled_oddly"):
        return oddly(world[ref.removesuffix("_spelled_oddly")])
    else:
        found = world[ref]
    return str(found if found is not None else home)


def resolved(world: dict, frame, draw_index: int):
    if isinstance(frame, Ref):
        return resolve(world, draw_index, frame)
    if isinstance(frame, dict):
        return {k: resolved(world, v, draw_index) for k, v in frame.items()}
    return frame


def canonical_client_id(frame) -> str | None:
    """The client_id the server names a send's answer with, if the frame has a valid one."""
    if not isinstance(frame, dict) or frame.get("type") != "send":
        return None
    try:
        return str(uuid.UUID(frame.get("client_id")))
    except (TypeError, ValueError, AttributeError):
        return None


def check_shape(frame: dict, world: dict) -> None:
    assert frame.get("type") in SHAPES and SHAPES[frame["type"]] <= frame.keys(), frame
    if frame["type"] == "error":
        assert frame["code"] in DOCUMENTED_CODES, frame
    # Nothing of bob's is shown: not his text, not his conversations.
    assert SECRET not in json.dumps(frame), frame
    assert frame.get("conversation_id") not in (str(world["bob_conversation"]),), frame


async def answers_to(client: Client, world: dict) -> list[dict]:
    """The frames up to the sentinel's error: the answer to the frame sent before it, and what was pushed."""
    received = []
    while True:
        frame = await client.recv()
        if frame.get("type") == "error" and "fuzz-sentinel" in frame.get("message", ""):
            return received
        check_shape(frame, world)
        received.append(frame)


async def exchange(world: dict, sent: list, tally: Counter, made: dict[str, set]) -> None:
    channel_layers.backends.clear()  # a fresh event loop per example: a layer of its own
    before = await sync_to_async(bobs_data)(world)
    async with Client(world["alice"]) as client:
        for index, drawn in enumerate(sent):
            frame = await sync_to_async(resolved)(world, drawn, index)
            if isinstance(frame, dict | list) or not isinstance(frame, str | bytes):
                payload = json.dumps(frame, ensure_ascii=False)
            else:
                payload = frame
            field = "bytes" if isinstance(payload, bytes) else "text"
            # As daphne hands frames over (the test client's send_to refuses empty ones).
            await client.communicator.send_input({"type": "websocket.receive", field: payload})
            # The sentinel's answer also shows the socket is still open and serving after each frame.
            await client.send_raw(SENTINEL)
            received = await answers_to(client, world)
            kind = frame.get("type") if isinstance(frame, dict) else None
            kind = kind if kind in ("open", "send", "stop", "regenerate") else "malformed"
            if kind == "regenerate" and not [f for f in received if f["type"] in ("error", "message")]:
                # Its answer (the new reply) goes to every socket through the channel layer: it may come later.
                received += await client.recv_until("message")
            answers = [f for f in received if f["type"] not in PUSHED]
            # One answer per frame; a `stop` of a reply that has ended is ignored (none).
            assert len(answers) == 1 or (kind == "stop" and not answers), (payload[:300], received)
            # A send with a valid client_id: its answer names it (the page knows which send it answers).
            client_id = canonical_client_id(frame)
            assert client_id is None or answers[0].get("client_id") == client_id, (payload[:300], answers)
            tally[f"{kind}:{answers[0]['type'] if answers else 'nothing'}"] += 1
            tally["edit"] += bool(kind == "send" and answers[0]["type"] == "ack" and frame.get("replaces"))
            for answer in answers:
                if answer["type"] == "ack":
                    made["user"].add(answer["user_message_id"])
                    made["assistant"].add(answer["assistant_message_id"])
                elif answer["type"] == "message":
                    made["assistant"].add(answer["message"]["id"])
            # A reply started: wait for its end, so the next frame meets no reply being written.
            started = [f for f in received if f["type"] in ("ack", "message")]
            for start in started:
                reply = start.get("assistant_message_id") or start["message"]["id"]
                if not any(f["type"] == "done" and f["message_id"] == reply for f in received):
                    received += await client.recv_until("done", timeout=30)
                    assert received[-1]["message_id"] == reply, received[-1]
                for f in received:
                    check_shape(f, world)
    if running.RUNNING:  # titles are written after `done`
        await asyncio.gather(*running.RUNNING.values(), return_exceptions=True)
    await ControlDispatcher.shutdown()
    assert await sync_to_async(bobs_data)(world) == before


def test_any_frame_gets_a_well_formed_answer_and_bobs_data_stays_his(world, settings):
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 0  # hundreds of turns: more than a minute's worth
    tally: Counter = Counter()
    made = world["made"]  # alice's messages: the first two, then those acks and regenerates announced

    @hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sent=st.lists(frames, min_size=1, max_size=6))
    def fuzz(sent):
        async_to_sync(exchange)(world, sent, tally, made)

    fuzz()
    # The turn path was exercised, not only the parser: sends acknowledged, edits made, replies regenerated.
    assert tally["send:ack"] >= 10, tally
    assert tally["edit"] >= 1, tally
    assert tally["regenerate:message"] >= 1, tally
    assert tally["open:history"] >= 1, tally
    assert tally["send:error"] >= 1 and tally["stop:error"] >= 1, tally
    # Nothing was written that no answer announced.
    for role, announced in made.items():
        assert Message.objects.filter(conversation__owner=world["alice"], role=role).count() == len(announced)
