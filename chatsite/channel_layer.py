"""channels_redis's pub/sub channel layer, publishing in pipelines instead of one at a time.

``channels_redis.pubsub`` (4.3.0) sends every PUBLISH of a process on one
connection under one lock, waiting for each reply before the next: under load
each publish then costs an event-loop cycle, and at 200 concurrent replies
chunks queued for seconds (docs/performance.md). Here a publish joins an
outbox and one task sends all the waiting ones in one pipeline per round
trip. Order is kept (one connection, in arrival order).

SUBSCRIBE and UNSUBSCRIBE (each socket's own channel, each conversation it
opens) went the same way, one at a time under the lock; with 200 turns
starting while replies streamed, a socket waited up to 4 s for its
subscription. They are batched too: the requests waiting at one moment go out
as one command per run of the same kind, in order. Receiving is channels_redis's own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from channels_redis.pubsub import RedisPubSubChannelLayer, RedisSingleShardConnection


class Batches:
    """Requests made while earlier ones are on the wire wait, and go out together.

    Each batch is sent as one call of ``send`` per run of requests of the same
    kind, in arrival order; every caller gets the outcome of its own request's
    run (the error, if that call failed).
    """

    def __init__(self, send: Callable[[str, list[Any]], Awaitable[None]]) -> None:
        self._send = send
        self._waiting: list[tuple[str, Any, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def submit(self, kind: str, item: Any) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((kind, item, done))
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await done

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                for kind, run in itertools.groupby(batch, key=lambda request: request[0]):
                    run = list(run)
                    error = None
                    try:
                        await self._send(kind, [item for _, item, _ in run])
                    except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                        error = exc
                    for _, _, done in run:
                        if done.done():
                            continue
                        if error is None:
                            done.set_result(None)
                        else:
                            done.set_exception(error)
        finally:
            self._task = None


class PipelinedShard(RedisSingleShardConnection):
    def __init__(self, host, channel_layer) -> None:
        super().__init__(host, channel_layer)
        self._publishes = Batches(self._publish)
        self._subscriptions = Batches(self._subscribe)

    async def publish(self, channel, message) -> None:
        await self._publishes.submit("publish", (channel, message))

    async def subscribe(self, channel) -> None:
        await self._subscriptions.submit("subscribe", channel)

    async def unsubscribe(self, channel) -> None:
        await self._subscriptions.submit("unsubscribe", channel)

    async def _publish(self, _kind: str, messages: list[tuple[str, bytes]]) -> None:
        """One pipeline of PUBLISHes."""
        self._ensure_redis()
        pipe = self._redis.pipeline(transaction=False)
        for channel, message in messages:
            pipe.publish(channel, message)
        await pipe.execute()

    async def _subscribe(self, kind: str, requested: list[str]) -> None:
        """One SUBSCRIBE (or UNSUBSCRIBE) for the requested channels that need it."""
        subscribing = kind == "subscribe"
        async with self._lock:  # flush() takes it too
            channels = [c for c in dict.fromkeys(requested) if (c in self._subscribed_to) != subscribing]
            if not channels:
                return
            self._ensure_redis()
            self._ensure_receiver()
            try:
                await getattr(self._pubsub, kind)(*channels)
            except redis.ConnectionError:
                # The connection was dropped (a Redis restart, a killed client) and only found out now;
                # redis-py has let it go, so this attempt reconnects (and resubscribes the rest).
                await getattr(self._pubsub, kind)(*channels)
            if subscribing:
                self._subscribed_to.update(channels)
            else:
                self._subscribed_to.difference_update(channels)


class PipelinedPubSubChannelLayer(RedisPubSubChannelLayer):
    def _get_layer(self):
        layer = super()._get_layer()
        if not isinstance(layer._shards[0], PipelinedShard):
            layer._shards = [PipelinedShard(shard.host, layer) for shard in layer._shards]
        return layer
