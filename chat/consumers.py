"""The chat WebSocket: protocol v1 (docs/protocol.md) over one socket per browser tab."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import access, limits, protocol, services, sockets
from chat.flows import answer
from chat.llm import ProviderError, get_provider
from chat.models import Message
from chat.protocol import ProtocolError
from chat.replies import control, events, running
from chat.replies.control import ControlDispatcher
from chat.replies.join import Join
from chat.replies.stream import RETRY_PAUSES
from chat.services import db

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LoggedOut(Exception):
    """The socket's login no longer holds (chat/access.py): it is closed with 4401."""


class ChatConsumer(AsyncWebsocketConsumer):
    conversation_id: int | None = None
    #: Replies the last `history` showed as ended: late frames about them are dropped, not shown again.
    settled: frozenset[str] = frozenset()
    logged_out = False

    async def connect(self) -> None:
        self.user = self.scope.get("user")
        if self.user is None or not self.user.is_authenticated:
            # Accepted, then closed with 4401: a refused handshake reaches the page as a bare 1006,
            # which it cannot tell from a network failure (it would retry for ever).
            await self.accept()
            await self.close(code=protocol.CLOSE_UNAUTHENTICATED)
            return
        await self.accept()
        # Counted across processes (chat/sockets.py); one over the cap is closed, as 4401 is, not refused.
        self.counters = sockets.Counters.of_this_loop()
        if not await self.counters.admit(self.user.pk, self.channel_name):
            await self.counters.release()
            await self.close(code=protocol.CLOSE_TOO_MANY_SOCKETS)
            return
        try:
            # The user's documents report their ingestion progress here (documents/progress.py).
            await self.channel_layer.group_add(events.user_group(self.user.pk), self.channel_name)
        except BaseException:
            # Channels calls no disconnect() for a connect that raised: give the socket's place back here.
            await self.counters.leave(self.user.pk, self.channel_name)
            raise
        self.join = Join(self.channel_layer, self.channel_name, self._push)
        self.checked_at = time.monotonic()
        self.checking: asyncio.Task | None = None
        try:
            # Someone is about to chat: load the model / build the client now, not on their first message.
            get_provider().warm_up()
        except ProviderError:
            pass  # reported on the first message, where the user sees it

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "join"):
            return  # never logged in, or over the cap
        self.join.close()
        if self.checking is not None:
            self.checking.cancel()
        await self.counters.leave(self.user.pk, self.channel_name)
        # Leaving the group does not touch any running generation: it finishes and is saved.
        await self._unsubscribe()
        await self.channel_layer.group_discard(events.user_group(self.user.pk), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not hasattr(self, "join") or self.logged_out:
            return  # closed at connect, or since
        # surrogatepass: a lone surrogate is sized here and refused by protocol.parse, not a crash.
        size = len(text_data.encode("utf-8", "surrogatepass")) if text_data is not None else len(bytes_data or b"")
        if size > settings.CHAT_HARD_FRAME_BYTES:
            await self.close(code=protocol.CLOSE_TOO_BIG)
            return
        frame = None
        try:
            try:
                frame = protocol.parse(text_data, size)
            except ProtocolError:
                # A logged-out socket is closed (4401) whatever it sent, not told what was wrong with it.
                await self.as_user(lambda: None)()
                raise
            if isinstance(frame, protocol.Open):
                await self.open(frame)
            elif isinstance(frame, protocol.Send):
                await self.send_message(frame)
            elif isinstance(frame, protocol.Stop):
                await self.stop(frame)
            elif isinstance(frame, protocol.Regenerate):
                await self.regenerate(frame)
        except ProtocolError as exc:
            if exc.client_id is None and isinstance(frame, protocol.Send):
                exc.client_id = frame.client_id  # the page learns which of its sends was refused
            await self.send_frame(exc.frame())
        except LoggedOut:
            await self._log_out()
        except Exception:  # noqa: BLE001 - one bad frame must not take the socket down
            logger.exception("failed to handle a frame from user %s", self.user.pk)
            # A send's client_id lets the page offer to resend it: the same client_id makes that safe.
            client_id = frame.client_id if isinstance(frame, protocol.Send) else None
            await self.send_frame(
                protocol.error(protocol.INTERNAL_ERROR, "The server failed to handle that; try again.", client_id)
            )

    def as_user(self, fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
        """``fn`` run on the database thread pool after checking, in the same hop, that the login still holds.

        Every frame's handling starts with one of these, so a socket whose
        login is gone (logged out in another tab, expired, password changed,
        user deactivated) is closed at its next frame, in the hop it needs anyway.
        """
        key, user_id = self.scope["session"].session_key, self.user.pk

        def checked(*args: Any) -> T:
            if not access.still_logged_in(key, user_id):
                raise LoggedOut
            self.checked_at = time.monotonic()
            return fn(*args)

        return db(checked)

    async def _log_out(self) -> None:
        self.logged_out = True
        await self.close(code=protocol.CLOSE_UNAUTHENTICATED)

    def _check_login_now_and_then(self) -> None:
        """Frames pushed to a socket that sends nothing: the login is checked again beside them, every
        CHAT_SESSION_CHECK_SECONDS, so a logged-out tab stops receiving within about that time."""
        if self.checking is not None or time.monotonic() - self.checked_at < settings.CHAT_SESSION_CHECK_SECONDS:
            return

        async def check() -> None:
            try:
                await self.as_user(lambda: None)()
            except LoggedOut:
                await self._log_out()
            except Exception:  # noqa: BLE001 - a failed check is tried again with the next frame
                logger.exception("could not check the login of user %s", self.user.pk)
            finally:
                self.checking = None

        self.checking = asyncio.create_task(check())

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame))

    async def _push(self, frame: dict[str, Any]) -> None:
        """A frame the socket did not ask for at this moment (a join's, a group's): none once logged out."""
        if not self.logged_out:
            await self.send_frame(frame)

    # --- subscription -----------------------------------------------------------------

    async def _subscribe(self, conversation_id: int) -> None:
        """Subscribed to the conversation's group, or raises with the socket subscribed to none."""
        if self.conversation_id == conversation_id:
            return
        await self._unsubscribe()
        self.settled = frozenset()
        group = events.group_name(conversation_id)
        for pause in (*RETRY_PAUSES, None):
            try:
                await self.channel_layer.group_add(group, self.channel_name)
                break
            except Exception:
                if pause is None:
                    # The layer may already count this socket in the group; a later success must not feed it.
                    await self._discard(group)
                    raise
                logger.warning("subscribing to %s failed; retrying in %.2f s", group, pause, exc_info=True)
                await asyncio.sleep(pause)
        # Only now: a socket recorded as subscribed that is not would show history and never a live chunk.
        self.conversation_id = conversation_id

    async def _unsubscribe(self) -> None:
        if self.conversation_id is not None:
            group, self.conversation_id = events.group_name(self.conversation_id), None
            self.join.reset()
            await self._discard(group)

    async def _discard(self, group: str) -> None:
        try:
            await self.channel_layer.group_discard(group, self.channel_name)
        except Exception:  # noqa: BLE001 - the layer forgets the socket before it tells Redis: nothing reaches it
            logger.warning("unsubscribing from %s failed", group, exc_info=True)

    # --- client frames ------------------------------------------------------------------

    async def open(self, frame: protocol.Open) -> None:
        try:
            await self.counters.count_open(self.user.pk)
        except limits.RateLimited as exc:
            await self.as_user(lambda: None)()  # a logged-out socket is closed, not told to wait
            # Which `open` was refused: the page tries it again after `retry_after`.
            await self.send_frame({**exc.frame(), "conversation_id": frame.conversation_id})
            return
        if frame.before is not None:
            # A page of earlier messages: the subscription and any join stay as they are.
            conversation, rows, more = await self.as_user(services.history_page)(
                self.user, frame.conversation_id, frame.before
            )
            payloads = [protocol.message(row) for row in rows]
            await self.send_frame(protocol.history(conversation, payloads, more, frame.before))
            return
        conversation, rows, more = await self.as_user(services.open_conversation)(self.user, frame.conversation_id)
        # At most one reply streams per conversation (a database constraint).
        streaming = [i for i, row in enumerate(rows) if row.status == Message.Status.STREAMING]
        if not streaming or conversation.pk != self.conversation_id:
            self.join.reset()  # what it held is in this history, or of another conversation
        await self._subscribe(conversation.pk)
        # A reply that ended just before the read above may still have frames on their way through the group.
        self.settled = frozenset(str(row.pk) for row in rows if row.status != Message.Status.STREAMING)
        payloads = [protocol.message(row) for row in rows]

        async def send_history(text: str | None = "", final: Message | None = None, index: int = -1) -> None:
            if index >= 0 and text is None:
                del payloads[index]  # deleted while we asked for its text
            elif index >= 0:
                payloads[index] = protocol.message(final) if final else {**payloads[index], "content": text}
            await self._push(protocol.history(conversation, payloads, more))

        if not streaming:
            await send_history()
            return
        index = streaming[0]
        shown = frozenset(payload["id"] for payload in payloads)
        # Even when a join of this conversation is pending: a join that never got its answer starts anew.
        await self.join.start(
            rows[index], lambda text, final: send_history(text, final, index), shown,
            conversation_id=conversation.pk, again=True,
        )  # fmt: skip

    def _model_name(self) -> str:
        try:
            return get_provider().model_name
        except ProviderError:
            return ""

    async def _begin(self, begin: Callable[..., services.Turn], *args: Any) -> services.Turn:
        """``begin`` (begin_turn or begin_regenerate) as this user; if a reply left `streaming` by a process
        that is gone holds the conversation, that reply is ended as `interrupted` and ``begin`` tried again."""
        try:
            return await self.as_user(begin)(self.user, *args)
        except services.Busy as busy:
            reply = busy.reply
            if reply is None or await control.is_running(self.channel_layer, reply.pk, reply.control_channel):
                raise
            ended = await db(services.interrupt_if_dead)(reply.pk)
            if ended is None:
                raise
            logger.warning("reply %s was left streaming by a process that is gone: interrupted", reply.pk)
            # Sockets still showing it as streaming learn how it ended.
            await self.channel_layer.group_send(
                events.group_name(ended.conversation_id), events.frames(protocol.done_for(ended))
            )
            return await self.as_user(begin)(self.user, *args)

    async def send_message(self, frame: protocol.Send) -> None:
        self._refuse_if_stopping(frame.client_id)
        # Counted until its reply is running: a stopping process waits for it (running.drain).
        with running.starting():
            control_address = await ControlDispatcher.address(self.channel_layer)
            turn = await self._begin(
                services.begin_turn,
                frame.conversation_id,
                frame.client_id,
                frame.content,
                frame.use_documents,
                self._model_name(),
                control_address,
                frame.replaces,
            )
            ack = protocol.ack(frame.client_id, turn.conversation.pk, turn.user_message.pk, turn.reply.pk)
            if turn.replayed:
                await self._subscribe(turn.conversation.pk)
                await self.send_frame(ack)
                await self._resume(turn.reply)
                return
            # The other sockets learn of both new messages (after an edit, of what it replaced) before the first chunk.
            # A conversation this send made has no other socket yet: none to tell.
            announce = None
            if not turn.created_conversation:
                frames = [protocol.message_frame(turn.user_message), protocol.message_frame(turn.reply)]
                if turn.replaced is not None:
                    frames.insert(0, protocol.replaced(turn.conversation.pk, turn.replaced))
                announce = events.frames(*frames, exclude=self.channel_name)
            await self._answer(turn, ack, announce)

    @staticmethod
    def _refuse_if_stopping(client_id: str | None = None) -> None:
        if not running.accepting():
            # `busy`: the page offers to send it again, and its new socket reaches a process that is serving.
            raise ProtocolError(protocol.BUSY, "The server is restarting; send it again in a moment.", client_id)

    async def _answer(self, turn: services.Turn, ack: dict[str, Any] | None, announce: dict[str, Any] | None) -> None:
        """Start the reply, then subscribe, acknowledge and announce while the model request is on its way.

        The reply's frames are held until all three are done, so none overtakes them.
        """
        ready = asyncio.Event()
        answer.start(self.channel_layer, turn, ready)
        try:
            await self._subscribe(turn.conversation.pk)
            if ack is not None:
                await self.send_frame(ack)
            if announce is not None:
                await self.channel_layer.group_send(events.group_name(turn.conversation.pk), announce)
        finally:
            ready.set()

    async def _resume(self, reply: Message) -> None:
        """After a replayed send: the reply again from offset 0, then the rest as it streams."""

        async def send_text(text: str | None, final: Message | None) -> None:
            if text is None:
                return  # deleted meanwhile: the client re-opens the conversation and sees it gone
            await self._push(protocol.chunk(reply.pk, 0, text))
            if final is not None:
                await self._push(protocol.done_for(final))

        if reply.status == Message.Status.STREAMING:
            await self.join.start(reply, send_text, frozenset(), conversation_id=reply.conversation_id)
        else:
            await send_text(reply.content, reply)

    async def stop(self, frame: protocol.Stop) -> None:
        reply = await self.as_user(services.request_stop)(self.user, frame.message_id)
        logger.info("stop for reply %s: %s", frame.message_id, "requested" if reply else "already finished")
        if reply is not None and reply.control_channel:
            # The generation's own address reaches it in whichever process runs it.
            await self.channel_layer.send(reply.control_channel, events.stop_request(reply.pk))

    async def regenerate(self, frame: protocol.Regenerate) -> None:
        self._refuse_if_stopping()
        with running.starting():
            control_address = await ControlDispatcher.address(self.channel_layer)
            turn = await self._begin(services.begin_regenerate, frame.message_id, self._model_name(), control_address)
            # Every socket on the conversation, this one included, learns the new reply's id.
            await self._answer(turn, None, events.frames(protocol.message_frame(turn.reply)))

    # --- channel-layer events -----------------------------------------------------------------

    async def chat_frames(self, event: dict[str, Any]) -> None:
        if event.get("exclude") == self.channel_name or self.logged_out:
            return
        self._check_login_now_and_then()
        for frame in event["frames"]:
            if frame["type"] in protocol.REPLY_FRAMES and frame["message_id"] in self.settled:
                continue
            await self.join.deliver(frame)

    async def chat_snapshot(self, event: dict[str, Any]) -> None:
        if self.logged_out:
            return
        await self.join.answered(event)
