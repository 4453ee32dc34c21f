"""Request bodies bounded before they are read: 413 past HTTP_MAX_UPLOAD_BODY_BYTES / HTTP_MAX_BODY_BYTES.

In two places, because daphne reads a request's whole body (into a temporary
file past 100 kB) before it hands the request to any ASGI application, and
Django's ASGI handler reads it all again (into its own spooled file) before
any view or login check runs:

- ``BoundedRequest`` is daphne's request (chatsite/serve.py): it refuses a
  body over the largest limit as soon as its headers arrive (by Content-Length),
  or as a chunked body passes it, and closes the connection;
- ``BodyLimit`` is the ASGI middleware in front of Django (chatsite/asgi.py):
  it holds each path to its own limit (files only to the upload view) before
  Django reads a byte, and counts a body that comes without a Content-Length.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from daphne.http_protocol import WebRequest
from django.conf import settings
from django.urls import reverse


def limit_for(path: str) -> int:
    """The largest body a request to ``path`` may have."""
    if path == reverse("documents:upload"):
        return settings.HTTP_MAX_UPLOAD_BODY_BYTES
    return settings.HTTP_MAX_BODY_BYTES


def largest_limit() -> int:
    return max(settings.HTTP_MAX_UPLOAD_BODY_BYTES, settings.HTTP_MAX_BODY_BYTES)


def refusal(limit: int) -> bytes:
    """The 413 body: JSON with `error`, as the upload page reads it."""
    return json.dumps({"error": f"The request is too large: at most {limit / 1024 / 1024:.1f} MB."}).encode()


class BoundedRequest(WebRequest):
    """daphne's request, refused with 413 (and the connection closed) once its body would pass the
    largest limit: before any of it is read when it declares its length, else as it passes it."""

    refused = False
    received = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        self.limit = largest_limit()
        if length is not None and length > self.limit:
            self._refuse()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.refused:
            return
        self.received += len(data)
        if self.received > self.limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802 - Twisted's name
        if not self.refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self.refused = True
        if self.content is not None:
            self.content.close()  # what was written of it is freed now
        # Twisted answers `Expect: 100-continue` right after this: the client must not be invited to send.
        self.requestHeaders.removeHeader(b"expect")
        body = refusal(self.limit)
        head = (
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        self.channel.transport.write(head + body)
        self.channel.transport.loseConnection()


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: an HTTP request whose body is over its path's limit gets 413, and the
    application never sees the body (by Content-Length: never called; counted: told the client left)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope["path"])
        length = _content_length(scope["headers"])
        if length is not None and length > limit:
            await _send_413(send, limit)
            return
        received = 0
        refused = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await _send_413(send, limit)
                    # Django stops reading and answers nothing (RequestAborted).
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # counted instead; the server refuses a malformed length itself
    return None


async def _send_413(send: Send, limit: int) -> None:
    body = refusal(limit)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
