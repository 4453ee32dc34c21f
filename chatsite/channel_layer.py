"""channels_redis's pub/sub channel layer, publishing in pipelines instead of one at a time.

``channels_redis.pubsub`` (4.3.0) sends every PUBLISH of a process on one
connection under one lock, waiting for each reply before the next: under load
each publish then costs an event-loop cycle, and at 200 concurrent replies
chunks queued for seconds (docs/performance.md). Here a publish joins an
outbox and one task sends all the waiting ones in one pipeline per round
trip. Order is kept (one connection, in arrival order); everything else,
receiving included, is channels_redis's own.
"""

from __future__ import annotations

import asyncio

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisSingleShardConnection


class PipelinedShard(RedisSingleShardConnection):
    def __init__(self, host, channel_layer) -> None:
        super().__init__(host, channel_layer)
        self._outbox: list[tuple[str, bytes, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

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


class PipelinedPubSubChannelLayer(RedisPubSubChannelLayer):
    def _get_layer(self):
        layer = super()._get_layer()
        if not isinstance(layer._shards[0], PipelinedShard):
            layer._shards = [PipelinedShard(shard.host, layer) for shard in layer._shards]
        return layer
