"""The project's channel layer (chatsite/channel_layer.py) against the real embedded Valkey."""

import asyncio

import redis.asyncio as redis
from channels.layers import get_channel_layer
from django.conf import settings

from chatsite.channel_layer import PipelinedPubSubChannelLayer


async def commands_called(name: str) -> int:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return stats.get(f"cmdstat_{name}", {}).get("calls", 0)


async def test_subscriptions_asked_for_together_go_out_together_and_each_works():
    layer = get_channel_layer()
    assert isinstance(layer, PipelinedPubSubChannelLayer)
    await layer.new_channel()  # the connection exists before counting
    before = await commands_called("subscribe")
    channels = await asyncio.gather(*(layer.new_channel() for _ in range(40)))
    await asyncio.gather(*(layer.group_add(f"g{i}", channel) for i, channel in enumerate(channels)))
    # 80 subscriptions in far fewer commands (upstream sends one SUBSCRIBE each, one after another).
    assert await commands_called("subscribe") - before <= 4
    await asyncio.gather(*(layer.group_send(f"g{i}", {"type": "t", "n": i}) for i in range(40)))
    received = await asyncio.wait_for(asyncio.gather(*(layer.receive(channel) for channel in channels)), 5)
    assert [message["n"] for message in received] == list(range(40))


async def test_a_subscribe_and_an_unsubscribe_in_one_batch_apply_in_order():
    layer = get_channel_layer()
    first, second = await asyncio.gather(layer.new_channel(), layer.new_channel())
    # Joined, then left at once (the group is empty again): the group ends unsubscribed.
    await asyncio.gather(layer.group_add("left", first), layer.group_discard("left", first))
    # Left, then joined again: the group ends subscribed.
    await layer.group_add("rejoined", second)
    await asyncio.gather(layer.group_discard("rejoined", second), layer.group_add("rejoined", second))
    names = [layer._get_layer()._get_group_channel_name(group) for group in ("left", "rejoined")]
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for _ in range(20):  # the commands were written; give the server a moment to have read them
            counts = [count for _, count in await client.pubsub_numsub(*names)]
            if counts == [0, 1]:
                break
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    assert counts == [0, 1]
    await layer.group_send("rejoined", {"type": "t", "n": 1})
    assert (await asyncio.wait_for(layer.receive(second), 5))["n"] == 1


async def test_a_subscription_right_after_the_connection_was_dropped_still_takes():
    """A killed connection is only found out by the next command on it: that one is tried again."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert await client.client_kill_filter(_type="pubsub") >= 1
    finally:
        await client.aclose()
    await layer.group_add("after-the-drop", channel)
    await layer.group_send("after-the-drop", {"type": "t", "n": 7})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 7
