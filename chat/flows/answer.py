"""The answering flow, one run per reply:

    LoadHistory -> BuildPrompt -> StreamAnswer -> Persist
                       \\--- "error" (e.g. question too long) ---> Persist

Retrieval nodes (RewriteQuery, Retrieve, Rerank, SelectContext) slot in
between LoadHistory and BuildPrompt. The shared store holds the ids of the
turn, the ``ReplyStream`` that publishes it, and each node's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from pocketflow import AsyncFlow, AsyncNode

from chat import protocol, services
from chat.generation import db
from chat.llm import ProviderError, Status, Usage, get_provider
from chat.llm.context import fit_prompt
from chat.models import Message

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_ms: int | None = None
    error_code: str = ""
    error_message: str = ""


class LoadHistory(AsyncNode):
    async def prep_async(self, shared: dict[str, Any]) -> tuple[int, int]:
        return shared["conversation_id"], shared["user_message_id"]

    async def exec_async(self, ids: tuple[int, int]) -> list[dict[str, str]]:
        return await db(services.prompt_history)(*ids)

    async def post_async(self, shared: dict[str, Any], prep_res: Any, history: list[dict[str, str]]) -> None:
        shared["history"] = history


class BuildPrompt(AsyncNode):
    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        provider = shared["provider"]
        return provider, shared["history"], shared["question"]

    async def exec_async(self, prep_res: tuple) -> list[dict[str, str]] | ProviderError:
        provider, history, question = prep_res
        try:
            # Tokenizing can take a while for long histories: keep the event loop free.
            return await asyncio.to_thread(fit_prompt, provider, history, question, provider.system_prompt)
        except ProviderError as exc:
            return exc

    async def post_async(self, shared: dict[str, Any], prep_res: Any, result: Any) -> str | None:
        if isinstance(result, ProviderError):
            shared["outcome"] = Outcome(Message.Status.ERROR, error_code=result.code, error_message=result.message)
            return "error"
        shared["prompt"] = result
        return None


class StreamAnswer(AsyncNode):
    """Streams the model's answer through the ReplyStream until it ends, fails or is stopped."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["provider"], shared["prompt"], shared["stream"]

    async def exec_async(self, prep_res: tuple) -> Outcome:
        provider, prompt, stream = prep_res
        started = time.monotonic()
        outcome = Outcome(Message.Status.COMPLETE, completion_tokens=0)
        deltas = 0

        async def consume() -> None:
            nonlocal deltas
            events = provider.stream(prompt)
            try:
                async for event in events:
                    if isinstance(event, str):
                        if outcome.first_token_ms is None:
                            outcome.first_token_ms = int((time.monotonic() - started) * 1000)
                        deltas += 1
                        await stream.emit(event)
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
            outcome.status = Message.Status.STOPPED
        else:
            exc = consumer.exception()
            if isinstance(exc, ProviderError):
                outcome.status = Message.Status.ERROR
                outcome.error_code, outcome.error_message = exc.code, exc.message
            elif exc is not None:
                raise exc
        if not outcome.completion_tokens:
            outcome.completion_tokens = deltas
        return outcome

    async def post_async(self, shared: dict[str, Any], prep_res: Any, outcome: Outcome) -> None:
        shared["outcome"] = outcome


class Persist(AsyncNode):
    """Publishes the last text, saves the final row and tells every socket `done`."""

    async def prep_async(self, shared: dict[str, Any]) -> tuple:
        return shared["stream"], shared["outcome"], shared["started"]

    async def exec_async(self, prep_res: tuple) -> dict[str, Any]:
        stream, outcome, started = prep_res
        await stream.close()
        await db(services.finish_reply)(
            stream.reply_id,
            status=outcome.status,
            content=stream.text,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            first_token_ms=outcome.first_token_ms,
            latency_ms=int((time.monotonic() - started) * 1000),
            error_code=outcome.error_code,
            error_message=outcome.error_message,
        )
        frame = protocol.done(
            stream.reply_id,
            outcome.status,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.error_code,
            outcome.error_message,
        )
        await stream.send(frame)
        return frame


def answer_flow() -> AsyncFlow:
    load, build, answer, persist = LoadHistory(), BuildPrompt(), StreamAnswer(), Persist()
    load >> build >> answer >> persist
    build - "error" >> persist
    return AsyncFlow(start=load)


async def run_answer(shared: dict[str, Any]) -> None:
    """Run the flow for one reply; whatever happens, the row ends in a final status and sockets get `done`."""
    stream = shared["stream"]
    shared["started"] = time.monotonic()
    stream.start()
    try:
        try:
            shared["provider"] = get_provider()
        except ProviderError as exc:
            shared["outcome"] = Outcome(Message.Status.ERROR, error_code=exc.code, error_message=exc.message)
            await Persist().run_async(shared)
            return
        await answer_flow().run_async(shared)
    except Exception:
        logger.exception("reply %s failed", stream.reply_id)
        shared["outcome"] = Outcome(
            Message.Status.ERROR,
            error_code=protocol.INTERNAL_ERROR,
            error_message="The server failed to write this reply.",
        )
        await Persist().run_async(shared)
    finally:
        await stream.close()
