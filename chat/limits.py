"""What one user, or one address, may do: counted where every process sees the count.

- Replies being written at once, and conversations, per user: counted in
  PostgreSQL inside ``begin_turn``. Sends of one user that arrive at the same
  instant are not serialised (that made a user's tabs queue behind each other
  under load), so such a burst can pass the limit by the number racing.
- Messages per minute per user, sign-ups per address per hour, failed logins
  per username and per address: counters in Redis (INCR in a fixed window;
  ``retry_after`` is the time left in the window). When Redis fails, they are
  counted in this process until it answers again (logged at WARNING): logging
  in and signing up need only PostgreSQL.
- The address is ``client_address``'s, the same for every per-address limit
  (TRUSTED_PROXY_HOPS).

A breach raises ``RateLimited``: a `rate_limited` error frame with
``retry_after`` on the socket, HTTP 429 with ``Retry-After`` on a page. Every
limit is a setting (``CHAT_LIMIT_*``, ``SIGNUP_LIMIT_PER_HOUR``,
``LOGIN_FAILURES_*``); 0 switches one off.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import threading
import time

import redis
from django.conf import settings
from django.http import HttpRequest
from redis.backoff import NoBackoff
from redis.retry import Retry

from chat import protocol
from chat.models import Conversation, Message
from chat.protocol import ProtocolError

logger = logging.getLogger(__name__)


class RateLimited(ProtocolError):
    def __init__(self, message: str, retry_after: int | None, client_id: str | None = None) -> None:
        super().__init__(protocol.RATE_LIMITED, message, client_id)
        self.retry_after = retry_after

    def frame(self) -> dict:
        return {**super().frame(), "retry_after": self.retry_after}


# --- counters --------------------------------------------------------------------------------


@functools.cache
def _redis() -> redis.Redis | None:
    if not settings.REDIS_URL:
        # No Redis means the in-memory channel layer, which means one process: its memory is every process's.
        logger.warning("no REDIS_URL: rate limits are counted in this process only")
        return None
    # Short time-outs and no retries: a login waits at most LIMITS_REDIS_TIMEOUT for a Redis that is gone.
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=settings.LIMITS_REDIS_TIMEOUT,
        socket_connect_timeout=settings.LIMITS_REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


# Counters kept here: without Redis, or while it fails. name -> [count, expiry (time.time())].
_local: dict[str, list] = {}
_local_lock = threading.Lock()
_local_swept = 0.0
# Until then (time.monotonic()), Redis failed and is not asked.
_redis_down_until = 0.0


def _client() -> redis.Redis | None:
    return None if time.monotonic() < _redis_down_until else _redis()


def _redis_failed(error: redis.RedisError) -> None:
    global _redis_down_until
    _redis_down_until = time.monotonic() + settings.LIMITS_REDIS_RETRY_SECONDS
    logger.warning(
        "Redis failed (%s: %s): rate limits are counted in this process only for %s s",
        type(error).__name__,
        error,
        settings.LIMITS_REDIS_RETRY_SECONDS,
    )


def _local_hit(name: str, left: int) -> int:
    global _local_swept
    now = time.time()
    with _local_lock:
        if now - _local_swept > 60:  # ended windows go, so the counters' memory stays bounded
            for old in [key for key, (_, expiry) in _local.items() if expiry <= now]:
                del _local[old]
            _local_swept = now
        counter = _local.setdefault(name, [0, now + left])
        counter[0] += 1
        return counter[0]


def _local_count(name: str) -> int:
    with _local_lock:
        return _local.get(name, [0])[0]


def _window(key: str, window: int) -> tuple[str, int]:
    """The counter's name in the current window, and the seconds left in that window."""
    now = time.time()
    return f"limit:{key}:{int(now // window)}", math.ceil(window - now % window)


def hit(key: str, window: int) -> tuple[int, int]:
    """Count one event under ``key``; returns (events in this window, seconds left in it)."""
    name, left = _window(key, window)
    client = _client()
    if client is not None:
        try:
            pipe = client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, window)
            count, _ = pipe.execute()
            return count, left
        except redis.RedisError as error:  # refused, timed out, dropped: count here instead
            _redis_failed(error)
    return _local_hit(name, left), left


def count(key: str, window: int, *, strict: bool = False) -> tuple[int, int]:
    """Events under ``key`` in the current window, and the seconds left in it (nothing counted).

    ``strict``: while Redis fails, raise ``redis.RedisError`` instead of counting in this process (for
    what needs Redis anyway, such as a chat turn, whose reply streams through the channel layer).
    """
    name, left = _window(key, window)
    client = _client()
    if strict and client is None and settings.REDIS_URL:
        raise redis.ConnectionError(f"Redis failed less than {settings.LIMITS_REDIS_RETRY_SECONDS} s ago")
    if client is not None:
        try:
            return int(client.get(name) or 0), left
        except redis.RedisError as error:
            _redis_failed(error)
            if strict:
                raise
    return _local_count(name), left


# --- the client's address -----------------------------------------------------------------------


def client_address(request: HttpRequest | None) -> str:
    """The address that per-address limits count for ``request`` ("" if there is none).

    With TRUSTED_PROXY_HOPS = 0 it is the socket's peer (REMOTE_ADDR) and X-Forwarded-For is
    ignored. With N proxies in front of the site it is the Nth X-Forwarded-For entry from the
    right: each proxy appends the address it saw, so entries left of that are the client's own
    and can be anything. An IPv6 address counts as its /64, which one host usually has whole.
    """
    if request is None:
        return ""
    address = request.META.get("REMOTE_ADDR", "")
    hops = settings.TRUSTED_PROXY_HOPS
    if hops > 0:
        entries = [e.strip() for e in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if e.strip()]
        if entries:
            # Fewer entries than proxies: every entry was written by one of them; the leftmost is the farthest seen.
            address = entries[-min(hops, len(entries))]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a proxy's "unknown"): still one key, bounded
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(parsed) >> 64 << 64, 64)))
    return str(parsed)


# --- chat turns (in begin_turn's transaction) ---------------------------------------------------


def check_turn(user, client_id: str | None, *, new_conversation: bool) -> None:
    """Refuse a new reply over the user's limits counted in PostgreSQL."""
    most = settings.CHAT_LIMIT_CONCURRENT_REPLIES
    if most and Message.objects.filter(conversation__owner=user, status=Message.Status.STREAMING).count() >= most:
        raise RateLimited(
            f"You have {most} replies being written already; wait for one to finish.",
            retry_after=2,
            client_id=client_id,
        )
    most = settings.CHAT_LIMIT_CONVERSATIONS
    if most and new_conversation and Conversation.objects.filter(owner=user).count() >= most:
        raise RateLimited(
            f"You have {most} conversations, the most this site keeps per user; delete some to start new ones.",
            retry_after=None,
            client_id=client_id,
        )


# The per-minute count is in Redis, another service: it is read before the turn's transaction and added to
# after it, so nothing waits for Redis while a turn holds its locks, a refused turn takes none, and a turn
# that made nothing (refused, failed, a resend) is not counted. Sends at the same instant can pass the limit
# by the number racing, as the counts in PostgreSQL can.


def messages_refusal(user, client_id: str | None) -> RateLimited | None:
    """The refusal of one more message of ``user`` this minute (CHAT_LIMIT_MESSAGES_PER_MINUTE), or None."""
    most = settings.CHAT_LIMIT_MESSAGES_PER_MINUTE
    if not most:
        return None
    # Strict: with Redis gone the reply could not stream, so the turn is refused before anything is saved.
    sent, left = count(f"messages:{user.pk}", 60, strict=True)
    if sent < most:
        return None
    return RateLimited(
        f"You have sent {most} messages this minute, the most allowed; try again in {left} s.",
        retry_after=left,
        client_id=client_id,
    )


def count_message(user) -> None:
    """Count a message whose turn was saved (its transaction has committed). While Redis fails, ``hit``
    counts it in this process."""
    if settings.CHAT_LIMIT_MESSAGES_PER_MINUTE:
        hit(f"messages:{user.pk}", 60)


# --- pages --------------------------------------------------------------------------------------


def _login_keys(username: str | None, request: HttpRequest | None) -> list[tuple[str, int]]:
    keys = []
    if username:
        keys.append((f"login:user:{username[:150].lower()}", settings.LOGIN_FAILURES_PER_USERNAME))
    address = client_address(request)
    if address:
        keys.append((f"login:addr:{address}", settings.LOGIN_FAILURES_PER_ADDRESS))
    return keys


def login_blocked(username: str | None, request: HttpRequest | None) -> int | None:
    """Seconds to wait if this username or the request's address has failed to log in too often, else None."""
    for key, most in _login_keys(username, request):
        failed, left = count(key, settings.LOGIN_FAILURES_WINDOW)
        if most and failed >= most:
            return left
    return None


def login_failed(username: str | None, request: HttpRequest | None) -> None:
    for key, _ in _login_keys(username, request):
        hit(key, settings.LOGIN_FAILURES_WINDOW)


def signup_blocked(request: HttpRequest) -> int | None:
    """Seconds to wait if the request's address has made SIGNUP_LIMIT_PER_HOUR accounts this hour, else None."""
    made, left = count(f"signup:{client_address(request)}", 3600)
    most = settings.SIGNUP_LIMIT_PER_HOUR
    return left if most and made >= most else None


def signed_up(request: HttpRequest) -> None:
    hit(f"signup:{client_address(request)}", 3600)
