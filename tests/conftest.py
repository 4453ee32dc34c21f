import asyncio
import inspect
import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore

from chat.replies import running
from chat.replies.control import ControlDispatcher
from chat.routing import websocket_urlpatterns
from tests.llm_server import LLMServer
from tests.servers import Site


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    # Replies write from worker threads; persistent connections there would keep
    # the test database busy when pytest-django drops it.
    from django.conf import settings

    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    yield
    # Worker threads may still hold connections: end them so the test database can be dropped.
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session")
def llm_server() -> LLMServer:
    server = LLMServer().start()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def site(tmp_path_factory, llm_server):
    """Two real daphne processes sharing a second embedded PostgreSQL and Valkey; yields their ports."""
    env = {"OPENAI_BASE_URL": llm_server.base_url, "OPENAI_API_KEY": "test-key", "LLM_MODEL": "test-model"}
    with Site(tmp_path_factory.mktemp("stack"), {**env, "LLM_PROVIDER": None}) as site:
        yield site


@pytest.fixture(autouse=True)
def site_without_documents(request):
    """The shared site's documents go with the test that made them: a later test's turns would
    otherwise search them (and get a `sources` frame it does not expect)."""
    yield
    if "site" in request.fixturenames:
        request.getfixturevalue("site").forget_documents()


@pytest.fixture(autouse=True)
def fresh_limits():
    """Rate-limit counters live in Redis and outlive a test: each test starts with none."""
    from chat import limits

    client = limits._redis()
    if client is not None:
        for key in client.scan_iter("limit:*"):
            client.delete(key)
    limits._local.clear()


@pytest.fixture(autouse=True)
def use_test_llm(settings, llm_server):
    """Every test talks to the scripted OpenAI-compatible server unless it says otherwise."""
    settings.LLM_PROVIDER = "openai"
    settings.OPENAI_BASE_URL = llm_server.base_url
    settings.OPENAI_API_KEY = "test-key"
    settings.LLM_MODEL = "test-model"
    settings.LLM_MAX_RETRIES = 0
    settings.LLM_TIMEOUT = 10
    settings.CHAT_FLUSH_SECONDS = 0.2
    llm_server.title_requests.clear()  # the earlier tests' replies have all ended (isolated_event_loop_state)
    return llm_server


def pytest_collection_modifyitems(items):
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "function", None)):
            item.add_marker(pytest.mark.usefixtures("isolated_event_loop_state"))


@pytest.fixture
async def isolated_event_loop_state():
    """Each async test runs on its own event loop: give it a channel layer of its own (channels_redis
    keeps asyncio locks that belong to the loop that made them), and after it, let every reply
    finish (they outlive sockets) before the test's database goes away."""
    channel_layers.backends.clear()
    yield
    if running.RUNNING:
        await asyncio.wait_for(asyncio.gather(*running.RUNNING.values(), return_exceptions=True), 30)
    await ControlDispatcher.shutdown()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob-123")


def logged_in_session(user) -> SessionStore:
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return session


class Client:
    """A WebSocket client of the chat protocol, for tests."""

    def __init__(self, user) -> None:
        self.user = user
        self.communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/")
        self.communicator.scope["user"] = user

    async def __aenter__(self) -> "Client":
        # A real logged-in session, as AuthMiddlewareStack gives a browser's socket.
        self.communicator.scope["session"] = await sync_to_async(logged_in_session)(self.user)
        connected, _ = await self.communicator.connect()
        assert connected
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.communicator.disconnect()

    async def send(self, frame: dict) -> None:
        await self.communicator.send_to(text_data=json.dumps(frame))

    async def send_raw(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def recv(self, timeout: float = 10) -> dict:
        return json.loads(await self.communicator.receive_from(timeout=timeout))

    async def recv_until(self, kind: str, timeout: float = 20) -> list[dict]:
        """Frames up to and including the first of type ``kind``."""
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if frame["type"] == kind:
                return frames

    async def say(
        self, content: str, conversation_id: str | None = None, client_id: str | None = None, **fields
    ) -> dict:
        """Send ``content`` (with any extra ``fields`` of the send frame); return the next frame (the ack)."""
        client_id = client_id or str(uuid.uuid4())
        await self.send(
            {"type": "send", "conversation_id": conversation_id, "client_id": client_id, "content": content, **fields}
        )
        return await self.recv()

    async def nothing_more(self, timeout: float = 0.3) -> bool:
        return await self.communicator.receive_nothing(timeout=timeout)


def reply_text(frames: list[dict], message_id: str) -> str:
    """The text that the chunk frames for ``message_id`` spell, checking offsets as a client must."""
    text = ""
    for frame in frames:
        if frame["type"] == "chunk" and frame["message_id"] == message_id:
            assert frame["offset"] == len(text), f"gap or repeat at {frame['offset']} (have {len(text)})"
            text += frame["delta"]
    return text
