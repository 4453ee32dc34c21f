"""Bad frames get a clear error and the socket stays usable; provider failures end cleanly."""

import io
import logging
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from chat.llm.base import NOT_SET_UP
from chat.models import Message
from tests.conftest import Client, reply_text

pytestmark = pytest.mark.django_db(transaction=True)

SEND = '{"type": "send", "conversation_id": null, "client_id": "%s", "content": %s}'
BAD_FRAMES = [
    ("not json {", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('{"no": "type"}', "bad_request"),
    ('{"type": "dance"}', "bad_request"),
    ('{"type": "open", "conversation_id": 5}', "bad_request"),
    ('{"type": "send", "conversation_id": null, "client_id": "not-a-uuid", "content": "x"}', "bad_request"),
    ('{"type": "send", "conversation_id": null, "client_id": "%s", "content": 42}' % uuid.uuid4(), "bad_request"),
    ('{"type": "send", "conversation_id": null, "client_id": "%s", "content": "  "}' % uuid.uuid4(), "bad_request"),
    ('{"type": "stop", "message_id": ["1"]}', "bad_request"),
    ("[" * 5000 + "]" * 5000, "bad_request"),  # RecursionError in the JSON parser
    # A NUL (PostgreSQL refuses it) and a lone surrogate (UTF-8 cannot hold it) in `content`.
    (SEND % (uuid.uuid4(), '"a\\u0000b"'), "bad_request"),
    (SEND % (uuid.uuid4(), '"a\\ud800b"'), "bad_request"),
    ('{"type": "open", "conversation_id": "abc"}', "not_found"),
    ('{"type": "stop", "message_id": "424242"}', "not_found"),
]


@pytest.mark.parametrize("text,code", BAD_FRAMES)
async def test_bad_frame_gets_error_and_socket_stays_usable(alice, text, code):
    async with Client(alice) as client:
        await client.send_raw(text)
        answer = await client.recv()
        assert answer["type"] == "error" and answer["code"] == code
        assert answer["message"]
        assert await Message.objects.acount() == 0
        ack = await client.say("still here?")
        assert ack["type"] == "ack"
        frames = await client.recv_until("done")
        assert reply_text(frames, ack["assistant_message_id"]) == "You said: still here?"


async def test_binary_frame_is_a_bad_request(alice):
    async with Client(alice) as client:
        await client.communicator.send_to(bytes_data=b"\x00\x01")
        answer = await client.recv()
        assert answer["code"] == "bad_request" and "JSON text" in answer["message"]
        assert (await client.say("ok?"))["type"] == "ack"
        await client.recv_until("done")


async def test_oversized_frame_and_message(alice, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 100
    async with Client(alice) as client:
        await client.send_raw('{"type": "send", "pad": "%s"}' % ("x" * 70_000))
        assert (await client.recv())["code"] == "too_large"
        client_id = str(uuid.uuid4())
        answer = await client.say("y" * 101, client_id=client_id)
        assert answer == {**answer, "type": "error", "code": "too_large", "client_id": client_id}
        assert (await client.say("fits"))["type"] == "ack"
        await client.recv_until("done")
    assert await Message.objects.filter(content__startswith="yyy").acount() == 0


async def test_frame_beyond_hard_cap_closes_with_1009(alice, settings):
    settings.CHAT_HARD_FRAME_BYTES = 200_000
    async with Client(alice) as client:
        await client.send_raw("x" * 200_001)
        closed = await client.communicator.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 1009}


async def test_provider_failure_mid_stream_keeps_partial_text(alice):
    async with Client(alice) as client:
        ack = await client.say("[tokens=20][fail_after=5]")
        frames = await client.recv_until("done")
    done = frames[-1]
    assert done["status"] == "error"
    assert done["error"]["code"] == "provider_error"
    assert "broke off" in done["error"]["message"]
    assert done["usage"]["completion_tokens"] == 5
    text = reply_text(frames, ack["assistant_message_id"])
    assert text == "t0 t1 t2 t3 t4 "
    reply = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert (reply.status, reply.content, reply.error_code) == ("error", text, "provider_error")


async def test_provider_http_error_is_a_clear_error(alice):
    async with Client(alice) as client:
        ack = await client.say("[status=500]")
        frames = await client.recv_until("done")
    done = frames[-1]
    assert done["status"] == "error" and done["error"]["code"] == "provider_error"
    assert done["error"]["message"] == "The model provider answered with an error (500)."
    assert "scripted failure" not in str(frames)  # the upstream's own words are for staff
    assert "scripted failure" in (await Message.objects.aget(pk=ack["assistant_message_id"])).error_detail
    assert not [f for f in frames if f["type"] == "chunk"]
    reply = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert (reply.status, reply.content) == ("error", "")


# Credentials in the provider's URL, as some deployments' proxies need, and a key in its query.
PASSWORD, QUERY_SECRET = "s3cret-pw", "qs3cret-key"


def credentialed(base_url: str) -> str:
    return base_url.replace("://", f"://proxy-user:{PASSWORD}@", 1) + f"?api-key={QUERY_SECRET}"


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text and QUERY_SECRET not in text and "proxy-user" not in text


async def test_provider_down_is_a_clear_error_and_nothing_half_written(alice, settings, caplog):
    # Nothing listens on the discard port.
    settings.OPENAI_BASE_URL = credentialed("http://127.0.0.1:9/v1")
    async with Client(alice) as client:
        ack = await client.say("anyone there?")
        frames = await client.recv_until("done")
        done = frames[-1]
        assert done["status"] == "error" and done["error"]["code"] == "provider_error"
        assert done["error"]["message"] == "The model provider could not be reached."
        # Users never see the endpoint; staff see which one it was, without its secrets.
        assert_no_secret(str(frames))
        assert "127.0.0.1" not in str(frames)
        saved = await Message.objects.aget(pk=ack["assistant_message_id"])
        assert_no_secret(saved.error_detail)
        assert "127.0.0.1:9/v1" in saved.error_detail
        # The log line as the code wrote it (the test's capture has no redacting formatter).
        logged = [
            r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "no connection" in r.getMessage()
        ]
        assert logged and "127.0.0.1:9/v1" in logged[0]
        assert_no_secret("\n".join(logged))
        # The conversation is consistent and usable: nothing is left streaming.
        assert await Message.objects.filter(status="streaming").acount() == 0
        await client.send({"type": "open", "conversation_id": ack["conversation_id"]})
        history = (await client.recv())["messages"]
        assert [(m["role"], m["status"], m["content"]) for m in history] == [
            ("user", "complete", "anyone there?"),
            ("assistant", "error", ""),
        ]
        assert history[1]["error"]["code"] == "provider_error"


async def test_provider_error_quoting_the_url_stores_and_shows_no_secret(alice, settings, llm_server, caplog):
    # The test server's error quotes the request line, query string included (the openai client keeps
    # a base URL's query); the URL's userinfo goes to the server as a Basic authorization.
    settings.OPENAI_BASE_URL = credentialed(llm_server.base_url)
    async with Client(alice) as client:
        ack = await client.say("[status=502]")
        frames = await client.recv_until("done")
    assert frames[-1]["error"]["message"] == "The model provider answered with an error (502)."
    assert_no_secret(str(frames))
    saved = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert "scripted failure of POST /v1/" in saved.error_detail  # the upstream's words are kept for staff
    assert f"127.0.0.1:{llm_server.port}/v1" in saved.error_detail
    assert_no_secret(saved.error_detail)
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records))
    # And admin shows it so.
    page = await sync_to_async(admin_page)(ack["conversation_id"], ack["assistant_message_id"])
    assert f"127.0.0.1:{llm_server.port}/v1" in page
    assert_no_secret(page)


def admin_page(conversation_id: str, message_id: str) -> str:
    """The conversation's and the reply's admin pages, as a superuser sees them."""
    from django.contrib.auth.models import User
    from django.test import Client as HttpClient

    admin = User.objects.filter(username="root").first() or User.objects.create_superuser("root", password="pw-root-1")
    http = HttpClient()
    http.force_login(admin)
    pages = [
        http.get(f"/admin/chat/conversation/{conversation_id}/change/"),
        http.get(f"/admin/chat/message/{message_id}/change/"),
    ]
    assert [page.status_code for page in pages] == [200, 200]
    return "\n".join(page.content.decode() for page in pages)


async def test_admin_shows_an_old_unredacted_detail_redacted(alice):
    """A row stored before details were redacted: admin hides its secrets when it shows it."""
    from chat.models import Conversation

    conversation = await Conversation.objects.acreate(owner=alice, title="t")
    question = await Message.objects.acreate(conversation=conversation, role="user", content="q")
    reply = await Message.objects.acreate(
        conversation=conversation,
        role="assistant",
        status="error",
        reply_to=question,
        error_detail=f"{credentialed('https://llm.example:8443/v1')}: no connection",
    )
    page = await sync_to_async(admin_page)(conversation.pk, reply.pk)
    assert "https://***@llm.example:8443/v1?***" in page
    assert_no_secret(page)


def test_chat_command_prints_no_secret(alice, settings, capsys):
    from django.core.management import CommandError, call_command

    settings.OPENAI_BASE_URL = credentialed("http://127.0.0.1:9/v1")
    with pytest.raises(CommandError) as raised:
        call_command("chat", "anyone there?", user="alice")
    out = capsys.readouterr()
    assert "The model provider could not be reached." in out.err
    assert_no_secret(out.out + out.err + str(raised.value))
    assert_no_secret(Message.objects.get(role="assistant").error_detail)


def test_the_log_formatter_alone_redacts_a_url_logged_raw():
    """The site's log handler (settings.LOGGING) hides a URL's secrets that the code logged as they were,
    in the message and in a traceback."""
    handler = next(h for h in logging.getLogger().handlers if h.get_name() == "console")
    url = credentialed("https://llm.example/v1")
    out = io.StringIO()
    previous = handler.setStream(out)
    try:
        logging.getLogger("chat.anything").warning("calling %s failed", url)
        try:
            raise ConnectionError(f"could not reach {url}")
        except ConnectionError:
            logging.getLogger("chat.anything").exception("and again")
    finally:
        handler.setStream(previous)
    text = out.getvalue()
    assert "calling https://***@llm.example/v1?*** failed" in text
    assert "ConnectionError: could not reach https://***@llm.example/v1?***" in text
    assert_no_secret(text)


async def test_provider_timeout_mid_stream_is_reported(alice, settings):
    settings.LLM_TIMEOUT = 0.5
    async with Client(alice) as client:
        ack = await client.say("[tokens=10][first_delay=3]")
        done = (await client.recv_until("done"))[-1]
    assert done["status"] == "error" and done["error"]["code"] == "provider_error"
    assert done["error"]["message"] == "The model took too long to start its reply."
    assert (await Message.objects.aget(pk=ack["assistant_message_id"])).status == "error"


async def test_refused_api_key_is_reported(alice, settings):
    settings.OPENAI_API_KEY = "wrong-key"
    async with Client(alice) as client:
        await client.say("hello")
        done = (await client.recv_until("done"))[-1]
    assert done["error"]["code"] == "provider_error"
    assert done["error"]["message"] == "The model provider refused this site's credentials."


@override_settings(LLM_PROVIDER="nonsense")
async def test_no_provider_configured_tells_the_user_and_the_operator(alice):
    async with Client(alice) as client:
        await client.say("hello")
        done = (await client.recv_until("done"))[-1]
    assert done["status"] == "error" and done["error"]["code"] == "not_configured"
    assert done["error"]["message"] == NOT_SET_UP
    # How to set one up is for the operator: the log and admin.
    saved = await Message.objects.aget(role="assistant")
    assert "OPENAI_BASE_URL" in saved.error_detail


async def test_stale_streaming_reply_is_marked_interrupted(alice, settings):
    from datetime import timedelta

    from django.utils import timezone

    from chat.models import Conversation

    conversation = await Conversation.objects.acreate(owner=alice, title="t")
    question = await Message.objects.acreate(conversation=conversation, role="user", content="q")
    await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", content="half", reply_to=question
    )
    await Message.objects.filter(status="streaming").aupdate(updated_at=timezone.now() - timedelta(minutes=5))
    async with Client(alice) as client:
        await client.send({"type": "open", "conversation_id": str(conversation.pk)})
        history = (await client.recv())["messages"]
        assert history[1]["status"] == "interrupted" and history[1]["content"] == "half"
        # And the conversation is not stuck "busy".
        assert (await client.say("again", str(conversation.pk)))["type"] == "ack"
        await client.recv_until("done")


async def test_a_nul_or_lone_surrogate_from_the_model_is_cleaned_and_the_reply_finishes(alice):
    async with Client(alice) as client:
        ack = await client.say("[bad_text]")
        frames = await client.recv_until("done")
    assert frames[-1]["status"] == "complete"
    assert reply_text(frames, ack["assistant_message_id"]) == "okay \ufffd end"
    saved = await Message.objects.aget(pk=ack["assistant_message_id"])
    assert saved.status == "complete" and saved.content == "okay \ufffd end"
