"""Property-based fuzzing of client frames: whatever a client sends, it gets an `error` frame (never
`internal_error`), nothing is written, and the socket still serves a normal turn."""

import json

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.models import Conversation, Message
from tests.conftest import Client, reply_text

pytestmark = pytest.mark.django_db(transaction=True)

EXPECTED_CODES = {"bad_request", "too_large", "not_found"}


def not_an_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


# Any JSON value, nested a little.
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Ids that name nothing: wrong types, text that is no number, numbers no row has.
ids = values.filter(lambda v: not isinstance(v, str) or not_an_int(v)) | st.integers(10**12, 10**15).map(str)
# Text with what PostgreSQL or UTF-8 cannot hold.
hostile_text = st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Lo", "So"]), max_size=40)
bad_content = st.one_of(
    values.filter(lambda v: not isinstance(v, str)),
    st.text(alphabet=" \t\n", max_size=5),
    st.tuples(st.text(max_size=20), st.sampled_from(["\x00", "\ud800", "\udfff"]), st.text(max_size=20)).map("".join),
    st.integers(16_001, 30_000).map(lambda n: "x" * n),  # longer than CHAT_MAX_MESSAGE_CHARS
)
client_ids = st.uuids().map(str) | values | hostile_text

frames = st.one_of(
    # Known types with wrong, missing or dangling fields.
    st.fixed_dictionaries(
        {"type": st.sampled_from(["open", "stop", "regenerate"])},
        optional={"conversation_id": ids, "message_id": ids, "extra": values},
    ).map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.just("send"), "content": bad_content},
        optional={"conversation_id": ids, "client_id": client_ids},
    ).map(lambda f: json.dumps(f, ensure_ascii=False)),
    # Unknown or non-string types, and JSON that is not an object.
    st.fixed_dictionaries({"type": values.filter(lambda t: t not in ("open", "send", "stop", "regenerate"))}).map(
        json.dumps
    ),
    values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    # Not JSON at all, invalid Unicode included.
    st.text(max_size=200) | hostile_text,
    # Nested deeper than the JSON parser's recursion limit.
    st.integers(900, 30_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(900, 10_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    # Binary frames.
    st.binary(max_size=100),
)


async def exchange(alice, sent: list[str | bytes]) -> None:
    channel_layers.backends.clear()  # a fresh event loop per example: a layer of its own
    conversations, messages = await Conversation.objects.acount(), await Message.objects.acount()
    async with Client(alice) as client:
        for frame in sent:
            # As daphne hands frames over (the test client's send_to refuses empty ones).
            kind = "bytes" if isinstance(frame, bytes) else "text"
            await client.communicator.send_input({"type": "websocket.receive", kind: frame})
            answer = await client.recv()
            assert answer["type"] == "error" and answer["code"] in EXPECTED_CODES, (frame[:200], answer)
        assert (await Conversation.objects.acount(), await Message.objects.acount()) == (conversations, messages)
        ack = await client.say("still fine?")
        assert ack["type"] == "ack"
        replies = await client.recv_until("done")
        assert reply_text(replies, ack["assistant_message_id"]) == "You said: still fine?"
        assert replies[-1]["status"] == "complete"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=st.lists(frames, min_size=1, max_size=8))
def test_any_frame_gets_an_error_writes_nothing_and_the_socket_keeps_serving(alice, settings, sent):
    settings.CHAT_LIMIT_MESSAGES_PER_MINUTE = 0  # one good turn per example: more than a minute's worth
    async_to_sync(exchange)(alice, sent)
