"""The answering flow, one run per reply:

    Prepare -> LoadHistory -> UseDocuments -> RewriteQuery -> Retrieve -> Rerank -> SelectContext
                                   |                                                     |
                                   \\------------- "plain" -------------> BuildPrompt <--/
                                                                              |
                                                      Persist <- StreamAnswer <-/
                                                         |
                                                    NameConversation
    (Prepare and BuildPrompt go to Persist on "error".)

Prepare gets the provider and starts the reply's row heartbeat and control
registration. UseDocuments decides whether this turn searches documents (the
conversation's switch, and whether the user can see any); the search stages
are documents/search.py's, the same ``manage.py retrieve`` runs. SelectContext
picks the passages that fit the window, saves them on the reply and sends the
`sources` frame before any chunk. Persist is the one place a reply ends (last
text published, final row written, `done` sent), whatever happened before it.
NameConversation then asks the model to title a new conversation (chat/titles.py).
The shared store (``new_store``) holds the turn's ids, the ``ReplyStream``
that publishes it, the ``ReplyRow`` that saves it, and each node's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.layers import BaseChannelLayer
from django.conf import settings
from pocketflow import AsyncFlow, AsyncNode

from chat import protocol, services, sidebar, titles
from chat.llm import ProviderError, Status, Usage, get_provider
from chat.llm.context import fit_prompt, select_sources, source_budget, with_sources
from chat.models import Message
from chat.replies import control, running
from chat.replies.row import Outcome, ReplyRow
from chat.replies.stream import DeliveryError, ReplyStream
from chat.services import db
from documents import search

logger = logging.getLogger(__name__)


def new_store(turn: services.Turn, stream: ReplyStream) -> dict[str, Any]:
    """The shared store of one run: what every node reads and writes."""
    return {
        "conversation_id": turn.conversation.pk,
        "user_message_id": turn.user_message.pk,
        "reply_id": turn.reply.pk,
        "user_id": turn.conversation.owner_id,
        "question": turn.user_message.content,
        "scope": turn.scope,
        "sources": [],
        # A conversation made by this send has no history: LoadHistory need not ask the database.
        "new_conversation": turn.created_conversation,
        "title": turn.conversation.title,
        "stream": stream,
        "row": ReplyRow(turn.reply.pk),
        "started": time.monotonic(),
    }


def failed(reply_id: int, exc: ProviderError) -> Outcome:
    """The outcome of a reply the provider could not give; what happened goes to the log and the row."""
    logger.warning("reply %s: %s: %s", reply_id, exc.code, exc.detail or exc.message)
    return Outcome(Message.Status.ERROR, error_code=exc.code, error_message=exc.message, error_detail=exc.detail)


def _store_or_fail(shared: dict[str, Any], key: str, result: Any) -> str | None:
    """A node's result into ``shared[key]``; a ProviderError instead becomes the outcome, and the "error" route."""
    if isinstance(result, ProviderError):
        shared["outcome"] = failed(shared["reply_id"], result)
        return "error"
    shared[key] = result
    return None


class Prepare(AsyncNode):
    """The provider, and the reply made reachable: saved on a heartbeat, stoppable from any process."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple[ReplyStream, ReplyRow]:
        return shared["stream"], shared["row"]

    async def exec_async(self, prep_res: tuple[ReplyStream, ReplyRow]) -> Any:
        stream, row = prep_res
        control.register(stream)
        row.start(lambda: stream.text, stream.stop_event.set)
        try:
            return get_provider()
        except ProviderError as exc:
            return exc

    async def post_async(self, shared: dict[str, Any], prep_res: Any, provider: Any) -> str | None:
        return _store_or_fail(shared, "provider", provider)


class LoadHistory(AsyncNode):
    """The latest CHAT_PROMPT_HISTORY_MESSAGES messages, in one query however long the conversation
    (BuildPrompt then keeps the turns that fit the window)."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple[int, int] | None:
        return None if shared["new_conversation"] else (shared["conversation_id"], shared["user_message_id"])

    async def exec_async(self, ids: tuple[int, int] | None) -> list[dict[str, str]]:
        return await db(services.prompt_history)(*ids) if ids else []

    async def post_async(self, shared: dict[str, Any], prep_res: Any, history: list[dict[str, str]]) -> None:
        shared["history"] = history


class UseDocuments(AsyncNode):
    """Whether this turn searches: the conversation's switch is on and the user can see a ready
    document (``Turn.scope``, read with the turn itself). Without, the turn is plain chat (no
    embedding, no chunk read)."""

    async def prep_async(self, shared: dict[str, Any]) -> search.Scope | None:
        return shared["scope"]

    async def post_async(self, shared: dict[str, Any], scope: search.Scope | None, exec_res: Any) -> str | None:
        return None if scope else "plain"


class RewriteQuery(AsyncNode):
    """A follow-up ("and how do I undo it?") as a query that names its topic (RETRIEVAL_REWRITE)."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["provider"], shared["question"], shared["history"]

    async def exec_async(self, prep_res: tuple) -> str:
        provider, question, history = prep_res
        return await search.search_query(question, history, settings.RETRIEVAL_REWRITE, provider)

    async def post_async(self, shared: dict[str, Any], prep_res: Any, query: str) -> None:
        shared["query"] = query


class Retrieve(AsyncNode):
    """Full text and vector search over the user's chunks, fused (documents/search.py)."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["scope"], shared["query"], shared["stream"]

    async def exec_async(self, prep_res: tuple) -> list[search.Hit]:
        scope, query, stream = prep_res
        try:
            # The embedder computes for ~10-25 ms: off the event loop.
            vector = await asyncio.to_thread(search.embed_query, query)
            return await db(search.retrieve)(scope, query, vector)
        except Exception:  # noqa: BLE001 - the answer goes on without documents, and says so
            logger.exception("reply %s: searching documents failed", stream.reply_id)
            await stream.send(protocol.status(stream.reply_id, "search_failed"))
            return []

    async def post_async(self, shared: dict[str, Any], prep_res: Any, hits: list[search.Hit]) -> None:
        shared["hits"] = hits


class Rerank(AsyncNode):
    """Rescored by cosine, picked by maximal marginal relevance (RETRIEVAL_RERANK; docs/performance.md)."""

    async def prep_async(self, shared: dict[str, Any]) -> list[search.Hit]:
        return shared["hits"]

    async def exec_async(self, hits: list[search.Hit]) -> list[search.Hit]:
        return search.rerank(hits) if settings.RETRIEVAL_RERANK else hits

    async def post_async(self, shared: dict[str, Any], prep_res: Any, hits: list[search.Hit]) -> None:
        shared["hits"] = hits


class SelectContext(AsyncNode):
    """The best passages that fit the window beside the history and the answer; saved on the
    reply and sent as the `sources` frame, before any chunk."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["provider"], shared["hits"], shared["question"]

    async def exec_async(self, prep_res: tuple) -> list:
        provider, hits, question = prep_res
        if not hits:
            return []

        def select() -> list:
            budget = source_budget(provider, question)
            return select_sources(provider, hits, budget, settings.RETRIEVAL_SOURCES)

        return await asyncio.to_thread(select)  # counting tokens takes a few ms

    async def post_async(self, shared: dict[str, Any], prep_res: Any, sources: list) -> None:
        shared["sources"] = sources
        if sources:
            items = [source.frame() for source in sources]
            await shared["row"].save_sources(items)
            await shared["stream"].send(protocol.sources(shared["reply_id"], items))


# Below this many characters, fitting a prompt takes about a millisecond (local model, measured):
# it runs on the event loop rather than waiting in line for a worker thread.
INLINE_PROMPT_CHARS = 1000


class BuildPrompt(AsyncNode):
    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["provider"], shared["history"], shared["question"], shared["sources"]

    async def exec_async(self, prep_res: tuple) -> list[dict[str, str]] | ProviderError:
        provider, history, question, sources = prep_res
        system = with_sources(provider.system_prompt, sources)
        size = len(question) + len(system) + sum(len(m["content"]) for m in history)
        try:
            if size <= INLINE_PROMPT_CHARS:
                return fit_prompt(provider, history, question, system)
            # Tokenizing a long history takes a while: keep the event loop free.
            return await asyncio.to_thread(fit_prompt, provider, history, question, system)
        except ProviderError as exc:
            return exc

    async def post_async(self, shared: dict[str, Any], prep_res: Any, result: Any) -> str | None:
        return _store_or_fail(shared, "prompt", result)


class StreamAnswer(AsyncNode):
    """Streams the model's answer through the ReplyStream until it ends, fails or is stopped."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["provider"], shared["prompt"], shared["stream"], shared["started"], shared["user_id"]

    async def exec_async(self, prep_res: tuple) -> Outcome:
        provider, prompt, stream, started, user_id = prep_res
        outcome = Outcome(Message.Status.COMPLETE, completion_tokens=0)
        deltas = 0

        async def consume() -> None:
            nonlocal deltas
            events = provider.stream(prompt, user_id)
            try:
                async for event in events:
                    if isinstance(event, str):
                        if outcome.first_token_ms is None:
                            outcome.first_token_ms = int((time.monotonic() - started) * 1000)
                        deltas += 1
                        # A NUL or a lone surrogate from the model would break every write of the row.
                        await stream.emit(protocol.clean(event))
                    elif isinstance(event, Usage):
                        outcome.prompt_tokens = event.prompt_tokens or outcome.prompt_tokens
                        outcome.completion_tokens = event.completion_tokens
                    elif isinstance(event, Status):
                        await stream.send(protocol.status(stream.reply_id, event.state, **event.detail))
            finally:
                # A stop can land while we are publishing, with the provider's generator
                # suspended: close it now, not at garbage collection, so it stops the model.
                await events.aclose()

        consumer = asyncio.create_task(consume())
        stopper = asyncio.create_task(stream.stop_event.wait())
        try:
            await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not consumer.done():
            # Cancelling closes the provider's stream: no token is made for a reply nobody wants.
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            if stream.interrupted:
                outcome.status = Message.Status.INTERRUPTED
                outcome.error_code = services.INTERRUPTED["error_code"]
                outcome.error_message = services.INTERRUPTED["error_message"]
            else:
                outcome.status = Message.Status.STOPPED
        else:
            exc = consumer.exception()
            if isinstance(exc, ProviderError):
                ended = failed(stream.reply_id, exc)  # the tokens counted so far are kept
                outcome.status, outcome.error_code = ended.status, ended.error_code
                outcome.error_message, outcome.error_detail = ended.error_message, ended.error_detail
            elif exc is not None and not isinstance(exc, DeliveryError):
                raise exc
        if stream.failed is not None:
            outcome.status = Message.Status.ERROR
            outcome.error_code = protocol.DELIVERY_FAILED
            outcome.error_message = "The reply could not be delivered live; reload to see the text saved so far."
            outcome.error_detail = str(stream.failed)
        if not outcome.completion_tokens:
            outcome.completion_tokens = deltas
        return outcome

    async def post_async(self, shared: dict[str, Any], prep_res: Any, outcome: Outcome) -> None:
        shared["outcome"] = outcome


class Persist(AsyncNode):
    """Where every reply ends: the last text published, the final row written, `done` sent to every socket."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        shared["persisting"] = True
        return shared["stream"], shared["row"], shared["outcome"], shared["started"]

    async def exec_async(self, prep_res: tuple) -> dict[str, Any]:
        stream, row, outcome, started = prep_res
        await stream.close()
        control.unregister(stream)
        try:
            await row.finish(outcome, stream.text, int((time.monotonic() - started) * 1000))
        except Exception as exc:  # noqa: BLE001 - the database is down: the sockets must still hear how it ended
            logger.exception("reply %s: the final write failed", stream.reply_id)
            # The row keeps its last flush and is recovered as `interrupted` once its process no longer runs it.
            outcome = Outcome(
                Message.Status.ERROR,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                error_code=protocol.SAVE_FAILED,
                error_message="This reply could not be saved; when you reload, it may end earlier.",
                error_detail=repr(exc),
            )
        frame = protocol.done(
            stream.reply_id,
            outcome.status,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.error_code,
            outcome.error_message,
        )
        try:
            await stream.send(frame)
        except DeliveryError:
            # The row is final: a socket that re-opens the conversation sees the outcome.
            logger.exception("reply %s ended as %s but `done` could not be published", stream.reply_id, outcome.status)
        return frame


class NameConversation(AsyncNode):
    """A new conversation whose first reply is complete gets a title written by the model.

    After `done`, so the reply never waits for it. Best effort: any failure keeps the first title.
    """

    async def prep_async(self, shared: dict[str, Any]) -> tuple | None:
        wanted = shared["new_conversation"] and titles.by_model()
        if not wanted or shared["outcome"].status != Message.Status.COMPLETE:
            return None
        return shared["provider"], shared["question"], shared["stream"].text

    async def exec_async(self, prep_res: tuple | None) -> str:
        if prep_res is None:
            return ""
        try:
            async with asyncio.timeout(settings.CHAT_TITLE_TIMEOUT):
                return await titles.ask(*prep_res)
        except (ProviderError, TimeoutError) as exc:
            logger.info("no title from the model: %r", exc)
            return ""

    async def post_async(self, shared: dict[str, Any], prep_res: Any, title: str) -> None:
        if not title or title == shared["title"]:
            return
        try:
            conversation = await db(titles.save)(shared["conversation_id"], shared["title"], title)
            if conversation is not None:
                await sidebar.tell_tabs(shared["stream"].layer, conversation)
        except Exception:  # noqa: BLE001 - the reply is saved and delivered; a title is not worth failing it
            logger.warning(
                "conversation %s: the new title was not saved or not shown", shared["conversation_id"], exc_info=True
            )


def answer_flow() -> AsyncFlow:
    prepare, load, use_documents = Prepare(), LoadHistory(), UseDocuments()
    rewrite, retrieve, rerank, select = RewriteQuery(), Retrieve(), Rerank(), SelectContext()
    build, answer, persist, name = BuildPrompt(), StreamAnswer(), Persist(), NameConversation()
    prepare >> load >> use_documents >> rewrite >> retrieve >> rerank >> select >> build >> answer >> persist >> name
    use_documents - "plain" >> build
    prepare - "error" >> persist
    build - "error" >> persist
    return AsyncFlow(start=prepare)


async def run_answer(shared: dict[str, Any]) -> None:
    """Run the flow for one reply; whatever happens, the row ends in a final status and sockets get `done`."""
    try:
        await answer_flow().run_async(shared)
    except Exception:
        logger.exception("reply %s failed", shared["reply_id"])
        if shared.get("persisting"):
            return  # Persist itself failed (the database is down?): the row goes stale, then `interrupted`
        shared["outcome"] = Outcome(
            Message.Status.ERROR,
            error_code=protocol.INTERNAL_ERROR,
            error_message="The server failed to write this reply.",
        )
        try:
            await Persist().run_async(shared)
        except Exception:
            logger.exception("reply %s could not be saved", shared["reply_id"])


def start(layer: BaseChannelLayer, turn: services.Turn, ready: asyncio.Event | None = None) -> asyncio.Task:
    """Start the answering flow for ``turn.reply`` as a task of this process.

    With ``ready``, the reply's frames wait until it is set (see ``ReplyStream``).
    """
    stream = ReplyStream(layer, turn.conversation.pk, turn.reply.pk, ready)
    return running.spawn(turn.reply.pk, run_answer(new_store(turn, stream)), stream.interrupt)
