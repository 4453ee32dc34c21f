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

import redis
from channels_redis.pubsub import RedisPubSubChannelLayer, RedisSingleShardConnection


class PipelinedShard(RedisSingleShardConnection):
    def __init__(self, host, channel_layer) -> None:
        super().__init__(host, channel_layer)
        self._outbox: list[tuple[str, bytes, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None
        self._requests: list[tuple[str, str, asyncio.Future]] = []
        self._subscriber: asyncio.Task | None = None

    async def publish(self, channel, message) -> None:
        done = asyncio.get_running_loop().create_future()
        self._outbox.append((channel, message, done))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        await done

    async def _send(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    self._ensure_redis()
                    pipe = self._redis.pipeline(transaction=False)
                    for channel, message, _ in batch:
                        pipe.publish(channel, message)
                    await pipe.execute()
                except Exception as exc:  # noqa: BLE001 - every waiting publisher gets the error
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._sender = None

    async def subscribe(self, channel) -> None:
        await self._request("subscribe", channel)

    async def unsubscribe(self, channel) -> None:
        await self._request("unsubscribe", channel)

    async def _request(self, kind: str, channel: str) -> None:
        done = asyncio.get_running_loop().create_future()
        self._requests.append((kind, channel, done))
        if self._subscriber is None:
            self._subscriber = asyncio.create_task(self._subscribe_all())
        await done

    async def _subscribe_all(self) -> None:
        try:
            while self._requests:
                batch, self._requests = self._requests, []
                async with self._lock:  # flush() takes it too
                    for kind, run in itertools.groupby(batch, key=lambda request: request[0]):
                        await self._apply(kind, list(run))
        finally:
            self._subscriber = None

    async def _apply(self, kind: str, run: list[tuple[str, str, asyncio.Future]]) -> None:
        """One SUBSCRIBE (or UNSUBSCRIBE) for the channels of ``run`` that need it."""
        subscribing = kind == "subscribe"
        channels = [
            c for c in dict.fromkeys(channel for _, channel, _ in run) if (c in self._subscribed_to) != subscribing
        ]
        try:
            if channels:
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
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            for _, _, done in run:
                if not done.done():
                    done.set_exception(exc)
        else:
            for _, _, done in run:
                if not done.done():
                    done.set_result(None)


class PipelinedPubSubChannelLayer(RedisPubSubChannelLayer):
    def _get_layer(self):
        layer = super()._get_layer()
        if not isinstance(layer._shards[0], PipelinedShard):
            layer._shards = [PipelinedShard(shard.host, layer) for shard in layer._shards]
        return layer
