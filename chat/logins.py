"""Failed-login limits on every login path, at the authentication layer.

Every login (chat's own page, Django admin's, anything that calls
``django.contrib.auth.authenticate``) passes through ``LoginThrottle``, the
first entry of AUTHENTICATION_BACKENDS: over the limit it raises
``LoginThrottled`` before any password is checked, so the right password is
refused too. Each failure, whichever backend refused it, is counted by the
``user_login_failed`` receiver. ``LoginThrottleMiddleware`` turns the exception
into HTTP 429 with ``Retry-After`` on any page; chat's LoginView renders its
own form instead. The counts are chat/limits.py's (per username and per
address); a system check keeps LoginThrottle first and the middleware in place.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import checks
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin

from chat import limits

BACKEND = "chat.logins.LoginThrottle"
MIDDLEWARE = "chat.logins.LoginThrottleMiddleware"


class LoginThrottled(Exception):
    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"Too many failed attempts. Try again in {retry_after // 60 + 1} minutes.")


def _username(credentials: dict) -> str | None:
    username = credentials.get("username", credentials.get(get_user_model().USERNAME_FIELD))
    return None if username is None else str(username)


class LoginThrottle:
    """Authenticates no one; refuses every attempt of a username or address over its failed-login limit.

    Not a BaseBackend: without ``get_user`` no session is ever tied to it (``login()`` and the test
    client's ``force_login`` pass it by), and sessions keep naming ModelBackend, as before it came.
    """

    def authenticate(self, request: HttpRequest | None, **credentials) -> None:
        wait = limits.login_blocked(_username(credentials), request)
        if wait is not None:
            # Not PermissionDenied: authenticate() would swallow that as a failed login (200, and one more failure).
            raise LoginThrottled(wait)
        return None  # the next backend checks the password

    async def aauthenticate(self, request: HttpRequest | None, **credentials) -> None:
        return await sync_to_async(self.authenticate)(request, **credentials)


def count_failure(sender, credentials: dict, request: HttpRequest | None = None, **kwargs) -> None:
    """The ``user_login_failed`` receiver (connected in ChatConfig.ready)."""
    limits.login_failed(_username(credentials), request)


def too_many(request: HttpRequest, refused: LoginThrottled) -> HttpResponse:
    response = render(request, "registration/throttled.html", {"throttled": str(refused)}, status=429)
    response["Retry-After"] = str(refused.retry_after)
    return response


class LoginThrottleMiddleware(MiddlewareMixin):
    """A login refused by LoginThrottle, on any page that did not answer it itself, is a 429."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        return too_many(request, exception) if isinstance(exception, LoginThrottled) else None


@checks.register(checks.Tags.security)
def check_login_throttle(app_configs, **kwargs) -> list[checks.CheckMessage]:
    errors = []
    if list(settings.AUTHENTICATION_BACKENDS[:1]) != [BACKEND]:
        errors.append(
            checks.Error(
                f"AUTHENTICATION_BACKENDS must start with {BACKEND!r}: logins would not be throttled.",
                id="chat.E001",
            )
        )
    if MIDDLEWARE not in settings.MIDDLEWARE:
        errors.append(
            checks.Error(f"MIDDLEWARE must include {MIDDLEWARE!r}: a throttled login would be a 500.", id="chat.E002")
        )
    return errors
