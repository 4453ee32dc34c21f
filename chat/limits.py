"""What one user, or one address, may do: counted where every process sees the count.

- Replies being written at once, and conversations, per user: counted in
  PostgreSQL inside ``begin_turn``. Sends of one user that arrive at the same
  instant are not serialised (that made a user's tabs queue behind each other
  under load), so such a burst can pass the limit by the number racing.
- Messages per minute per user, sign-ups per address per hour, failed logins
  per username and per address: counters in Redis (INCR in a fixed window;
  ``retry_after`` is the time left in the window).

A breach raises ``RateLimited``: a `rate_limited` error frame with
``retry_after`` on the socket, HTTP 429 with ``Retry-After`` on a page. Every
limit is a setting (``CHAT_LIMIT_*``, ``SIGNUP_LIMIT_PER_HOUR``,
``LOGIN_FAILURES_*``); 0 switches one off.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time

import redis
from django.conf import settings

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
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=settings.REDIS_SOCKET_TIMEOUT)


_local: dict[str, int] = {}
_local_lock = threading.Lock()


def _window(key: str, window: int) -> tuple[str, int]:
    """The counter's name in the current window, and the seconds left in that window."""
    now = time.time()
    return f"limit:{key}:{int(now // window)}", math.ceil(window - now % window)


def hit(key: str, window: int) -> tuple[int, int]:
    """Count one event under ``key``; returns (events in this window, seconds left in it)."""
    name, left = _window(key, window)
    client = _redis()
    if client is None:
        with _local_lock:
            _local[name] = _local.get(name, 0) + 1
            return _local[name], left
    pipe = client.pipeline(transaction=False)
    pipe.incr(name)
    pipe.expire(name, window)
    count, _ = pipe.execute()
    return count, left


def count(key: str, window: int) -> tuple[int, int]:
    """Events under ``key`` in the current window, and the seconds left in it (nothing counted)."""
    name, left = _window(key, window)
    client = _redis()
    if client is None:
        with _local_lock:
            return _local.get(name, 0), left
    return int(client.get(name) or 0), left


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
    sent, left = count(f"messages:{user.pk}", 60)
    if sent < most:
        return None
    return RateLimited(
        f"You have sent {most} messages this minute, the most allowed; try again in {left} s.",
        retry_after=left,
        client_id=client_id,
    )


def count_message(user) -> None:
    """Count a message whose turn was saved. Its transaction has committed: a Redis failure now leaves
    the message uncounted (logged), never the turn half-started."""
    if not settings.CHAT_LIMIT_MESSAGES_PER_MINUTE:
        return
    try:
        hit(f"messages:{user.pk}", 60)
    except redis.RedisError:
        logger.warning("user %s: a message was not counted against the per-minute limit", user.pk, exc_info=True)


# --- pages --------------------------------------------------------------------------------------

LOGIN_WINDOW = 15 * 60


def login_blocked(username: str, address: str) -> int | None:
    """Seconds to wait if this username or address has failed to log in too often, else None."""
    for key, most in (
        (f"login:user:{username.lower()}", settings.LOGIN_FAILURES_PER_USERNAME),
        (f"login:addr:{address}", settings.LOGIN_FAILURES_PER_ADDRESS),
    ):
        failed, left = count(key, LOGIN_WINDOW)
        if most and failed >= most:
            return left
    return None


def login_failed(username: str, address: str) -> None:
    hit(f"login:user:{username.lower()}", LOGIN_WINDOW)
    hit(f"login:addr:{address}", LOGIN_WINDOW)


def signup_blocked(address: str) -> int | None:
    """Seconds to wait if this address has made SIGNUP_LIMIT_PER_HOUR accounts this hour, else None."""
    made, left = count(f"signup:{address}", 3600)
    most = settings.SIGNUP_LIMIT_PER_HOUR
    return left if most and made >= most else None


def signed_up(address: str) -> None:
    hit(f"signup:{address}", 3600)
