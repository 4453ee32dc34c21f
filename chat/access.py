"""Whether a socket's login still holds.

A WebSocket outlives the request that logged it in. Each frame's database hop
(and, for frames pushed to the socket, a check every
CHAT_SESSION_CHECK_SECONDS) asks again what Django asks of every HTTP request:
the session exists and has not expired, its user is still active, and the
password has not changed since (the session's auth hash).
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

from django.conf import settings
from django.contrib import auth


def still_logged_in(session_key: str | None, user_id: int) -> bool:
    if not session_key:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    # auth.get_user is the HTTP path's own check: expiry (the session backend),
    # is_active (the auth backend) and the password hash; it flushes a session that fails it.
    user = auth.get_user(SimpleNamespace(session=store))
    return user.is_authenticated and user.pk == user_id
