"""Every page carries the Content-Security-Policy: the site's own pages, the admin's, and the error pages.
In the browser (tests/test_browser.py) the policy blocks what it should and nothing the pages need."""

from unittest import mock

import pytest
from django.test import Client

from chat.models import Conversation, Message
from documents.models import Document, DocumentFile

pytestmark = pytest.mark.django_db

# What the site promises, word for word: only its own scripts, styles, images (and data: URIs),
# sockets and form targets; no plugins; never framed.
POLICY = {
    "default-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}


def policy(response) -> dict[str, list[str]]:
    header = response.headers.get("Content-Security-Policy")
    assert header, f"no Content-Security-Policy on {response.request['PATH_INFO']} ({response.status_code})"
    directives = [part.split() for part in header.split(";") if part.strip()]
    return {name: values for name, *values in directives}


@pytest.fixture
def pages(alice, admin_user):
    conversation = Conversation.objects.create(owner=alice, title="plans")
    question = Message.objects.create(conversation=conversation, role="user", content="hi")
    Message.objects.create(conversation=conversation, role="assistant", content="hello", reply_to=question)
    document = Document.objects.create(owner=alice, title="notes", source="notes.md", content_hash="0" * 64,
                                       live_hash="0" * 64, mime_type="text/markdown", size=5,
                                       status=Document.Status.READY)  # fmt: skip
    DocumentFile.objects.create(document=document, data=b"hello", text="hello")
    return {"conversation": conversation.pk, "document": document.pk, "alice": alice, "staff": admin_user}


# (who, method, path, status): every kind of page, and a redirect.
PAGES = [
    ("anonymous", "get", "/", 302),
    ("anonymous", "get", "/accounts/login/", 200),
    ("anonymous", "get", "/accounts/signup/", 200),
    ("anonymous", "get", "/admin/login/", 200),
    ("anonymous", "get", "/no/such/page/", 404),
    ("alice", "get", "/", 200),
    ("alice", "get", "/c/{conversation}/", 200),
    ("alice", "get", "/c/999999999/", 404),
    ("alice", "get", "/documents/", 200),
    ("alice", "get", "/documents/{document}/passage/?start=0&end=2", 200),
    ("alice", "get", "/conversations/", 200),
    ("alice", "get", "/accounts/password_change/", 200),
    ("alice", "post", "/accounts/logout/", 302),
    ("staff", "get", "/admin/", 200),
    ("staff", "get", "/admin/chat/conversation/", 200),
    ("staff", "get", "/admin/chat/conversation/{conversation}/change/", 200),
    ("staff", "get", "/admin/chat/feedback/", 200),
    ("staff", "get", "/admin/documents/document/{document}/change/", 200),
]


@pytest.mark.parametrize("who,method,path,status", PAGES)
def test_every_page_carries_the_policy(client, pages, who, method, path, status):
    if who != "anonymous":
        client.force_login(pages[who])
    response = getattr(client, method)(path.format(**pages))
    assert response.status_code == status
    assert policy(response) == POLICY


def test_a_refused_form_post_carries_the_policy(alice):
    """The CSRF failure page (403) is made by middleware, not a view."""
    response = Client(enforce_csrf_checks=True).post("/accounts/login/", {"username": "alice", "password": "x"})
    assert response.status_code == 403
    assert policy(response) == POLICY


def test_a_server_error_page_carries_the_policy(alice):
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    with mock.patch("chat.views.model_note", side_effect=RuntimeError("the view broke")):
        response = client.get("/")
    assert response.status_code == 500
    assert policy(response) == POLICY
