"""Nobody reaches another user's data, and a refusal reveals nothing.

One table over every URL of the URLconf (the admin's included) and one over every client frame type
of the WebSocket protocol. Each is checked against the resolver and against ``protocol.ClientFrame``,
so a new view or frame type that is not in the table fails here. Each row is tried against alice's
objects by another user, by staff without the model's permission and anonymously, and its answer is
compared, word for word, with the answer for an id that names nothing (and one over 2^63): the same
answer. The one allowed (alice; a superuser in admin) is answered, so a wrong row fails too.

Adding a view or a frame type: one line in ``OBJECT_URLS`` (it takes an id) or ``PAGES`` (it takes none),
or in ``FRAMES``.
"""

import json
import re
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group
from django.contrib.auth.tokens import default_token_generator
from django.contrib.contenttypes.models import ContentType
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db.models import Max
from django.urls import URLResolver, get_resolver
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from procrastinate.contrib.django.models import ProcrastinateJob

from chat import protocol
from chat.models import Conversation, Feedback, Message
from chatsite.asgi import application
from documents import tasks
from documents.models import Chunk, Document, DocumentFile
from tests.conftest import Client

pytestmark = pytest.mark.usefixtures("quick_passwords")

SECRET = "alice-secret"  # in every text of alice's objects: no refusal may show it
OVER_BIGINT = 2**63 + 7  # an id no bigint column can hold


# --- the URL table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    """A URL that names one of alice's objects."""

    route: str  # the pattern as the resolver spells it: the key of the completeness check
    kind: str  # which of alice's objects (``alices``) the id names
    method: str = "get"
    body: dict | None = None  # a POST's body: JSON for the site's views, a form for the admin's
    # When the route is not simply "/" + route with its one parameter replaced: {id}, {ct} (the
    # object's content type), {uid} (the id as a password-reset link spells it), {token}.
    url: str = ""
    owner: int = 200  # what the one allowed gets
    refused: tuple[int, ...] = (302, 403, 404)  # what the others get (a login redirect, 403 or 404)

    def path(self, object_id: int, **context) -> str:
        template = self.url or "/" + re.sub(r"<[^>]+>", "{id}", self.route)
        return template.format(id=object_id, **context)


# Every admin URL of a registered model that takes an id, for each of alice's objects.
ADMIN_OBJECTS = {
    # model: (the object, what the superuser's empty change form gets, whether it may be deleted)
    "chat/conversation": ("conversation", 200, True),  # refused: the inline's management form is missing
    "chat/message": ("reply", 302, True),  # every field read-only: saved as it was
    "chat/feedback": ("feedback", 302, True),
    "documents/document": ("document", 200, True),  # refused: fields are required
    "documents/chunk": ("chunk", 302, True),
    "auth/user": ("user", 200, True),
    "auth/group": ("group", 200, True),
    "procrastinate/procrastinatejob": ("job", 403, False),  # the ingestion job of alice's document: read-only
}


def admin_object_urls(model: str, kind: str, change_post: int, deletable: bool) -> list:
    deleted = 302 if deletable else 403
    return [
        Url(f"admin/{model}/<path:object_id>/change/", kind),
        Url(f"admin/{model}/<path:object_id>/change/", kind, "post", {}, owner=change_post),
        Url(f"admin/{model}/<path:object_id>/delete/", kind, owner=200 if deletable else 403),
        Url(f"admin/{model}/<path:object_id>/delete/", kind, "post", {"post": "yes"}, owner=deleted),
        Url(f"admin/{model}/<path:object_id>/history/", kind),
        Url(f"admin/{model}/<path:object_id>/", kind, owner=302),  # the old change URL: to the new one
    ]


OBJECT_URLS = [
    Url("c/<int:conversation_id>/", "conversation"),
    Url("feedback/<int:message_id>/", "reply", "post", {"rating": -1, "comment": "pwned"}),
    Url("conversations/<int:conversation_id>/rename/", "conversation", "post", {"title": "pwned"}),
    Url("conversations/<int:conversation_id>/delete/", "conversation", "post"),
    Url("documents/<int:document_id>/delete/", "document", "post"),
    Url("documents/<int:document_id>/passage/", "document", url="/documents/{id}/passage/?start=0&end=12"),
    # A bad token, for everyone but alice (who has the link from her mail): the same "invalid link" page.
    Url("accounts/reset/<uidb64>/<token>/", "user", url="/accounts/reset/{uid}/{token}/", owner=302, refused=(200,)),
    # No model here has get_absolute_url: there is nothing to view on the site, for anyone (404).
    Url("admin/r/<path:content_type_id>/<path:object_id>/", "conversation", url="/admin/r/{ct}/{id}/", owner=404),
    Url("admin/auth/user/<id>/password/", "user"),
    *(url for model, row in ADMIN_OBJECTS.items() for url in admin_object_urls(model, *row)),
]


@dataclass(frozen=True)
class Page:
    """A URL that names no object: what each visitor gets (status codes), and none sees alice's data."""

    route: str
    # (anonymous, another user, staff without permissions, the one allowed: alice, or a superuser in admin)
    expect: tuple[int, int, int, int]
    method: str = "get"
    data: Callable[[], dict] | None = None  # a POST's form (called for each request: files are read once)
    url: str = ""

    def path(self) -> str:
        return self.url or "/" + self.route


def bobs_upload() -> dict:
    # The same file name as alice's document: it becomes the sender's own document, hers is untouched.
    return {"files": SimpleUploadedFile("manual.md", b"# Mine\n\nmy own text about pumps")}


MADE_ELSEWHERE = ("chat/message", "chat/feedback", "procrastinate/procrastinatejob")

#   Public or the visitor's own: nothing of alice's is in reach; each is answered as it should be.
PAGES = [
    Page("", (302, 200, 200, 200)),  # the chat page: the visitor's own conversations
    Page("conversations/", (302, 200, 200, 200), url="/conversations/?q=alice-secret"),  # own, searched
    Page("documents/", (302, 200, 200, 200)),  # the visitor's own documents
    Page("documents/upload/", (302, 200, 200, 200), "post", bobs_upload),
    Page("accounts/signup/", (200, 302, 302, 302)),  # logged in: back to the chat
    Page("accounts/login/", (200, 200, 200, 200)),
    Page("accounts/logout/", (302, 302, 302, 302), "post"),
    Page("accounts/password_change/", (302, 200, 200, 200)),  # the visitor's own password
    Page("accounts/password_change/done/", (302, 200, 200, 200)),
    Page("accounts/password_reset/", (200, 200, 200, 200)),
    Page("accounts/password_reset/done/", (200, 200, 200, 200)),
    Page("accounts/reset/done/", (200, 200, 200, 200)),
    # The admin: only staff get past its login; staff without permissions see no model.
    Page("admin/", (302, 302, 200, 200)),
    Page("admin/login/", (200, 200, 302, 302)),  # non-staff: "you are not authorised"; staff: to the index
    Page("admin/logout/", (302, 302, 302, 302), "post"),  # staff: logged out, to LOGOUT_REDIRECT_URL
    Page("admin/password_change/", (302, 302, 200, 200)),
    Page("admin/password_change/done/", (302, 302, 200, 200)),
    Page("admin/jsi18n/", (302, 302, 200, 200)),
    # No model admin has autocomplete_fields: refused for everyone (staff: 403).
    Page("admin/autocomplete/", (302, 302, 403, 403)),
    Page("admin/^(?P<app_label>auth|procrastinate|chat|documents)/$", (302, 302, 404, 200), url="/admin/chat/"),
    Page("admin/(?P<url>.*)$", (302, 302, 404, 404), url="/admin/no-such-page/"),
    # Changelists (searched for alice's text) and add forms: staff without the permission get 403.
    *(Page(f"admin/{model}/", (302, 302, 403, 200), url=f"/admin/{model}/?q=alice-secret") for model in ADMIN_OBJECTS),
    # Messages and feedback are made by chatting, jobs by uploads: never in admin.
    *(Page(f"admin/{model}/add/", (302, 302, 403, 403 if model in MADE_ELSEWHERE else 200)) for model in ADMIN_OBJECTS),
]

VISITORS = ["anonymous", "other", "staff"]


def routes(resolver: URLResolver | None = None, prefix: str = ""):
    """Every URL pattern of the URLconf, as its route strings joined (included URLconfs walked)."""
    for pattern in (resolver or get_resolver()).url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from routes(pattern, route)
        else:
            yield route


def test_the_url_table_names_every_url_of_the_urlconf():
    tabled = {row.route for row in OBJECT_URLS} | {page.route for page in PAGES}
    served = set(routes())
    assert served - tabled == set(), "URLs with no row here: add one to OBJECT_URLS or PAGES"
    assert tabled - served == set(), "rows for URLs that no longer exist"


# --- alice's objects, and the visitors ------------------------------------------------------------


@pytest.fixture
def quick_passwords(settings):
    """Four users per test: hashed with the slow default hasher, the table would take minutes."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def alices(alice) -> dict:
    conversation = Conversation.objects.create(owner=alice, title=f"{SECRET} title")
    question = Message.objects.create(
        conversation=conversation, role="user", content=f"{SECRET} question", client_id=uuid.uuid4()
    )
    reply = Message.objects.create(conversation=conversation, role="assistant", content=f"{SECRET} answer",
                                   reply_to=question, model="test-model")  # fmt: skip
    # A reply being written in another conversation (its process answers nothing: no control channel).
    elsewhere = Conversation.objects.create(owner=alice, title=f"{SECRET} elsewhere")
    asked = Message.objects.create(conversation=elsewhere, role="user", content=f"{SECRET} asked")
    streaming = Message.objects.create(conversation=elsewhere, role="assistant", status="streaming",
                                       content=f"{SECRET} so far", reply_to=asked)  # fmt: skip
    feedback = Feedback.objects.create(message=reply, user=alice, rating=1, comment=f"{SECRET} comment")
    text = f"{SECRET} passage about pumps"
    document = Document.objects.create(owner=alice, title=f"{SECRET} manual", source="manual.md",
                                       content_hash="0" * 64, live_hash="0" * 64, mime_type="text/markdown",
                                       size=len(text), status="ready", chunk_count=1)  # fmt: skip
    DocumentFile.objects.create(document=document, data=text.encode(), text=text)
    chunk = Chunk.objects.create(document=document, ordinal=0, text=text, token_count=5, char_start=0,
                                 char_end=len(text), embedding=[0.1] * 384, heading=f"{SECRET} heading")  # fmt: skip
    group = Group.objects.create(name=f"{SECRET} group")
    alice.groups.add(group)
    alice.email = f"{SECRET}@example.com"
    alice.save()
    return {"conversation": conversation, "question": question, "reply": reply, "streaming": streaming,
            "feedback": feedback, "document": document, "chunk": chunk, "user": alice, "group": group}  # fmt: skip


@pytest.fixture
def alices_and_job(alices) -> dict:
    """With the ingestion job of her document: in the HTTP tests only, which roll back (a transactional
    test would leave the job behind: procrastinate's tables are not flushed)."""
    tasks.enqueue(alices["document"])
    return {**alices, "job": ProcrastinateJob.objects.get(args__document_id=alices["document"].pk)}


def stored(obj) -> dict | None:
    found = type(obj).objects.filter(pk=obj.pk).values().first()
    return None if found is None else {field: str(value) for field, value in found.items()}


def state(objects: dict) -> list:
    """Everything stored about alice's objects (and how many she has): a refusal changes none of it."""
    rows = [stored(obj) for obj in objects.values()]
    owner = objects["user"]
    counts = [
        Conversation.objects.filter(owner=owner).count(),
        Message.objects.filter(conversation__owner=owner).count(),
        Feedback.objects.count(),
        Document.objects.filter(owner=owner).count(),
        Chunk.objects.filter(document__owner=owner).count(),
    ]
    return [rows, counts]


def missing_id(model) -> int:
    return (model.objects.aggregate(top=Max("pk"))["top"] or 0) + 1000


@pytest.fixture
def visitors(client, bob, django_user_model) -> dict:
    """A logged-in test client per visitor: anonymous, another user, staff without any permission."""
    staff = django_user_model.objects.create_user("carol", password="pw-carol-123", is_staff=True)
    clients = {}
    for name, user in (("anonymous", None), ("other", bob), ("staff", staff)):
        clients[name] = type(client)()
        if user is not None:
            clients[name].force_login(user)
    return clients


@pytest.fixture
def allowed(client, alice, django_user_model) -> dict:
    """Who may reach alice's objects: alice on the site, a superuser in admin."""
    root = django_user_model.objects.create_superuser("root", password="pw-root-123")
    clients = {"site": type(client)(), "admin": type(client)()}
    clients["site"].force_login(alice)
    clients["admin"].force_login(root)
    return clients


def allowed_client(allowed: dict, route: str):
    return allowed["admin" if route.startswith("admin/") else "site"]


CSRF = re.compile(r'name="csrfmiddlewaretoken" value="[^"]*"')


def request(client, method: str, path: str, body, *, form: bool):
    if method == "get":
        return client.get(path)
    if form:
        return client.post(path, body() if callable(body) else (body or {}))
    return client.post(path, json.dumps(body or {}), content_type="application/json", HTTP_ACCEPT="application/json")


def fetch(client, row: Url, object_id: int, context: dict):
    return request(client, row.method, row.path(object_id, **context), row.body, form=row.route.startswith("admin/"))


def answer(client, row: Url, object_id: int, context: dict) -> tuple:
    """What a visitor learns from the response: everything but CSRF tokens and the id it sent (echoed
    in a login redirect's ?next=)."""
    response = fetch(client, row, object_id, context)
    body = CSRF.sub("", response.content.decode())
    location = re.sub(rf"(?<![0-9]){object_id}(?![0-9])", "ID", response.get("Location", ""))
    return response.status_code, response.get("Content-Type"), location, body


def contexts(row: Url, objects: dict, *, owner: bool = False) -> list[tuple[int, dict]]:
    """(id, context) for alice's real object, then an id that names nothing, then one over 2^63."""
    real = objects[row.kind]
    model = type(real)
    token = default_token_generator.make_token(real) if owner and row.kind == "user" else "bad-token"
    ct = ContentType.objects.get_for_model(model).pk
    ids = [real.pk] if owner else [real.pk, missing_id(model), OVER_BIGINT]
    return [(i, {"ct": ct, "uid": urlsafe_base64_encode(force_bytes(i)), "token": token}) for i in ids]


def row_id(row) -> str:
    return f"{row.method} {row.route}"


@pytest.mark.django_db
@pytest.mark.parametrize("visitor", VISITORS)
@pytest.mark.parametrize("row", OBJECT_URLS, ids=row_id)
def test_a_url_refuses_alices_objects_as_if_they_did_not_exist(visitors, alices_and_job, visitor, row):
    before = state(alices_and_job)
    real, missing, too_big = (answer(visitors[visitor], row, i, c) for i, c in contexts(row, alices_and_job))
    assert real[0] in row.refused, real[:3]
    assert SECRET not in real[3]
    assert real == missing, "the answer for alice's id differs from the one for an id that names nothing"
    assert real == too_big
    assert state(alices_and_job) == before


@pytest.mark.django_db
@pytest.mark.parametrize("row", OBJECT_URLS, ids=row_id)
def test_the_one_allowed_reaches_each_of_alices_objects(allowed, alices_and_job, row):
    [(object_id, context)] = contexts(row, alices_and_job, owner=True)
    response = fetch(allowed_client(allowed, row.route), row, object_id, context)
    assert response.status_code == row.owner, response.content[:300]


def page_id(page: Page) -> str:
    return f"{page.method} {page.route}"


@pytest.mark.django_db
@pytest.mark.parametrize("visitor", VISITORS)
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_a_url_with_no_object_answers_each_visitor_as_it_should(visitors, alices_and_job, visitor, page):
    before = state(alices_and_job)
    response = request(visitors[visitor], page.method, page.path(), page.data, form=True)
    assert response.status_code == page.expect[VISITORS.index(visitor)], response.content[:300]
    assert SECRET not in response.content.decode()
    assert state(alices_and_job) == before


@pytest.mark.django_db
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_a_url_with_no_object_answers_the_one_allowed(allowed, alices_and_job, page):
    response = request(allowed_client(allowed, page.route), page.method, page.path(), page.data, form=True)
    assert response.status_code == page.expect[-1], response.content[:300]


# --- the frame table ------------------------------------------------------------------------------

CLIENT_ID = "5d1f2a77-1d0e-4a8f-9a53-3f6d1c1f0a0b"


@dataclass(frozen=True)
class Frame:
    """A client frame about alice's objects."""

    type: type  # the protocol.ClientFrame it parses to: the key of the completeness check
    # The frame, from ids: conversation, question, reply, streaming (alice's) and own (the sender's own conversation).
    build: Callable[[dict[str, str]], dict]
    owner: str | None  # the first frame alice herself gets back (None: none, as for a `stop`)


def send(conversation: str, **fields) -> dict:
    return {"type": "send", "conversation_id": conversation, "client_id": CLIENT_ID, "content": "let me in", **fields}


FRAMES = [
    Frame(protocol.Open, lambda i: {"type": "open", "conversation_id": i["conversation"]}, "history"),
    Frame(protocol.Send, lambda i: send(i["conversation"]), "ack"),
    Frame(protocol.Send, lambda i: send(i["conversation"], replaces=i["question"], use_documents=False), "ack"),
    # An edit, in the sender's own conversation, of alice's message.
    Frame(protocol.Send, lambda i: send(i["own"], replaces=i["question"]), "ack"),
    Frame(protocol.Stop, lambda i: {"type": "stop", "message_id": i["streaming"]}, None),
    Frame(protocol.Regenerate, lambda i: {"type": "regenerate", "message_id": i["reply"]}, "message"),
    Frame(protocol.Regenerate, lambda i: {"type": "regenerate", "message_id": i["question"]}, "message"),
]


def frame_id(row: Frame) -> str:
    return json.dumps(row.build({k: k for k in ("conversation", "question", "reply", "streaming", "own")}))


def test_the_frame_table_names_every_client_frame_type():
    assert {row.type for row in FRAMES} == set(typing.get_args(protocol.ClientFrame))
    for row in FRAMES:  # and each row is the frame type it says
        text = json.dumps(row.build({k: "1" for k in ("conversation", "question", "reply", "streaming", "own")}))
        assert isinstance(protocol.parse(text, len(text)), row.type)


def frame_ids(objects: dict, own: int, replace_with: int | None = None) -> dict[str, str]:
    ids = {k: objects[k].pk for k in ("conversation", "question", "reply", "streaming")}
    if replace_with is not None:
        ids = dict.fromkeys(ids, replace_with)
    return {k: str(v) for k, v in {**ids, "own": own}.items()}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("visitor", ["other", "staff"])
@pytest.mark.parametrize("row", FRAMES, ids=frame_id)
async def test_a_frame_refuses_alices_ids_as_if_they_did_not_exist(alices, bob, django_user_model, visitor, row):
    user = bob
    if visitor == "staff":
        user = await sync_to_async(django_user_model.objects.create_user)("carol", password="pw-c-123", is_staff=True)
    own = await Conversation.objects.acreate(owner=user, title="mine")
    await Message.objects.acreate(conversation=own, role="user", content="my own question")
    before = await sync_to_async(state)(alices)
    missing = max(await sync_to_async(missing_id)(Conversation), await sync_to_async(missing_id)(Message))
    async with Client(user) as client:
        answers = []
        for replace_with in (None, missing, OVER_BIGINT):
            await client.send(row.build(frame_ids(alices, own.pk, replace_with)))
            answers.append(await client.recv())
        assert await client.nothing_more()
    assert answers[0]["type"] == "error" and answers[0]["code"] == "not_found", answers[0]
    assert answers[0] == answers[1] == answers[2]  # word for word the same answer
    assert await sync_to_async(state)(alices) == before
    assert await Message.objects.filter(conversation=own).acount() == 1  # the edit took nothing out of hers


async def anonymous_outputs(frame: dict) -> list[dict]:
    """What an anonymous socket gets, through the whole stack, when it sends ``frame`` at once: each
    distinct output once (a frame that races the close closes it again, which changes nothing)."""
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1")])
    connected, _ = await communicator.connect()
    assert connected  # accepted, to be closed with 4401
    await communicator.send_to(text_data=json.dumps(frame))
    outputs = [await communicator.receive_output(timeout=5)]
    while not await communicator.receive_nothing(timeout=1):
        outputs.append(await communicator.receive_output())
    await communicator.disconnect()
    return [json.loads(output) for output in dict.fromkeys(json.dumps(output) for output in outputs)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("row", FRAMES, ids=frame_id)
async def test_an_anonymous_socket_gets_nothing_but_4401_for_any_frame(alices, row):
    before = await sync_to_async(state)(alices)
    missing = max(await sync_to_async(missing_id)(Conversation), await sync_to_async(missing_id)(Message))
    real = await anonymous_outputs(row.build(frame_ids(alices, alices["conversation"].pk)))
    assert real == [{"type": "websocket.close", "code": protocol.CLOSE_UNAUTHENTICATED}]
    assert real == await anonymous_outputs(row.build(frame_ids(alices, alices["conversation"].pk, missing)))
    assert await sync_to_async(state)(alices) == before


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("row", FRAMES, ids=frame_id)
async def test_alice_is_answered_each_frame_about_her_own_objects(alices, row):
    async with Client(alices["user"]) as client:
        await client.send(row.build(frame_ids(alices, alices["conversation"].pk)))
        frames = []
        while not await client.nothing_more(0.5):
            frames.append(await client.recv())
            if frames[-1]["type"] == "done":
                break
    assert [f["type"] for f in frames[:1]] == ([row.owner] if row.owner else []), frames
    assert not [f for f in frames if f["type"] == "error"]
    stopped = await Message.objects.filter(pk=alices["streaming"].pk, stop_requested=True).aexists()
    assert stopped == (row.type is protocol.Stop)
