"""Sockets per user, and `open` frames per user: counted in Redis, where every process sees them.

- Each open socket is a member of its user's sorted set (``limit:sockets:USER``), scored by the
  time its entry lapses. The process refreshes its sockets' entries every third of
  CHAT_SOCKET_TTL_SECONDS, in one pipeline, and removes each when it closes; a process that dies
  stops refreshing, and its sockets lapse. A socket is let in by one script (atomic on the
  server) only while fewer than CHAT_MAX_SOCKETS_PER_USER unlapsed entries remain.
- `open` frames per user are a fixed-window counter, like the other per-user limits
  (chat/limits.py): CHAT_LIMIT_OPENS_PER_MINUTE, each `open` reads a page of the conversation.

Both let everything through when Redis fails (logged): `open` is answered from the database so
that it works while Redis is down, and a refused socket is worse than an uncounted one. Without
REDIS_URL (one process, the in-memory layer) the counts are this process's own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import redis.asyncio as aioredis
from django.conf import settings

from chat.limits import RateLimited

logger = logging.getLogger(__name__)

# KEYS[1]: the user's socket set; ARGV: now, lapse time, channel, most allowed (0: no limit), key ttl.
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local most = tonumber(ARGV[4])
if most > 0 and redis.call('ZCARD', KEYS[1]) >= most then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def sockets_key(user_id: int) -> str:
    return f"limit:sockets:{user_id}"


class Counters:
    """This event loop's Redis client and its sockets (one per loop: redis.asyncio's connections
    belong to the loop that made them)."""

    _per_loop: dict[asyncio.AbstractEventLoop, Counters] = {}

    def __init__(self) -> None:
        self.redis = (
            aioredis.Redis.from_url(
                settings.REDIS_URL,
                socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
                socket_connect_timeout=settings.REDIS_SOCKET_TIMEOUT,
            )
            if settings.REDIS_URL
            else None
        )
        self.admit_script = self.redis.register_script(ADMIT) if self.redis is not None else None
        # user id -> this process's open sockets (channel names) of that user.
        self.sockets: dict[int, set[str]] = {}
        # Without Redis: the counts of `open` frames, by window.
        self.local_opens: dict[str, int] = {}
        self.refresher: asyncio.Task | None = None

    @classmethod
    def of_this_loop(cls) -> Counters:
        loop = asyncio.get_running_loop()
        if loop not in cls._per_loop:
            cls._per_loop = {k: v for k, v in cls._per_loop.items() if not k.is_closed()}
            cls._per_loop[loop] = cls()
        return cls._per_loop[loop]

    async def admit(self, user_id: int, channel: str) -> bool:
        """Count a new socket of ``user_id``; False if the user has CHAT_MAX_SOCKETS_PER_USER already."""
        most, ttl = settings.CHAT_MAX_SOCKETS_PER_USER, settings.CHAT_SOCKET_TTL_SECONDS
        if self.redis is None:
            if most and len(self.sockets.get(user_id, ())) >= most:
                return False
        else:
            now = time.time()
            try:
                args = [now, now + ttl, channel, most, math.ceil(ttl)]
                if not await self.admit_script(keys=[sockets_key(user_id)], args=args):
                    return False
            except Exception:  # noqa: BLE001 - Redis down: let the socket in, uncounted until the next refresh
                logger.warning("could not count the sockets of user %s; letting one in", user_id, exc_info=True)
        self.sockets.setdefault(user_id, set()).add(channel)
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.create_task(self._refresh())
        return True

    async def leave(self, user_id: int, channel: str) -> None:
        mine = self.sockets.get(user_id, set())
        mine.discard(channel)
        if not mine:
            self.sockets.pop(user_id, None)
        if self.redis is not None:
            try:
                await self.redis.zrem(sockets_key(user_id), channel)
            except Exception:  # noqa: BLE001 - it lapses by itself
                logger.warning("could not uncount a socket of user %s; it lapses", user_id, exc_info=True)
        await self.release()

    async def release(self) -> None:
        """With no socket left on this loop, close its Redis client and forget it: a loop that then
        ends (a test's, a process stopping) leaves no connection behind for the garbage collector,
        whose clean-up would need the closed loop. The next socket makes a new one."""
        if self.sockets:
            return
        if Counters._per_loop.get(asyncio.get_running_loop()) is self:
            del Counters._per_loop[asyncio.get_running_loop()]
        if self.refresher is not None:
            self.refresher.cancel()
        if self.redis is not None:
            await self.redis.aclose()

    async def _refresh(self) -> None:
        """Push back the lapse time of every socket of this process, one pipeline per beat."""
        ttl = settings.CHAT_SOCKET_TTL_SECONDS
        while self.sockets:
            await asyncio.sleep(ttl / 3)
            if self.redis is None:
                continue
            now = time.time()
            try:
                pipe = self.redis.pipeline(transaction=False)
                for user_id, channels in self.sockets.items():
                    pipe.zadd(sockets_key(user_id), {channel: now + ttl for channel in channels})
                    pipe.expire(sockets_key(user_id), math.ceil(ttl))
                await pipe.execute()
            except Exception:  # noqa: BLE001 - tried again next beat; the entries last a whole ttl
                logger.warning("could not refresh this process's socket counts", exc_info=True)

    async def count_open(self, user_id: int) -> None:
        """Count one `open` frame of ``user_id``; RateLimited past CHAT_LIMIT_OPENS_PER_MINUTE."""
        most = settings.CHAT_LIMIT_OPENS_PER_MINUTE
        if not most:
            return
        now = time.time()
        name, left = f"limit:opens:{user_id}:{int(now // 60)}", math.ceil(60 - now % 60)
        if self.redis is None:
            self.local_opens[name] = opened = self.local_opens.get(name, 0) + 1
        else:
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.incr(name)
                pipe.expire(name, 60)
                opened, _ = await pipe.execute()
            except Exception:  # noqa: BLE001 - `open` must work while Redis is down
                logger.warning("could not count an `open` of user %s; letting it through", user_id, exc_info=True)
                return
        if opened > most:
            raise RateLimited(
                f"You have opened conversations {most} times this minute, the most allowed; try again in {left} s.",
                retry_after=left,
            )
