"""A running reply: publishing it, the one writer of its row, control from any process, joining it mid-stream.

- ``events``: every message that crosses the channel layer, built in one place.
- ``stream``: ``ReplyStream`` publishes a reply's chunks (coalesced) to its conversation's group.
- ``row``: ``ReplyRow`` is the one writer of the reply's database row while it streams.
- ``control``: ``ControlDispatcher``, the process's address for `stop` and snapshot requests.
- ``join``: a socket joining a streaming reply gets the text so far, then the rest with no gap or repeat.
- ``running``: the asyncio tasks of this process's replies.
"""
