"""Any OpenAI-compatible chat endpoint, through the official ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx2
import openai
from django.conf import settings

from chat.llm.base import ChatMessages, ProviderError, Status, Usage
from chat.llm.redact import redact
from chat.protocol import PROVIDER_ERROR


class OpenAICompatibleProvider:
    def __init__(self) -> None:
        self.model_name = settings.LLM_MODEL
        self.context_tokens = settings.LLM_CONTEXT_TOKENS
        self.max_tokens = settings.LLM_MAX_TOKENS
        self.system_prompt = settings.LLM_SYSTEM_PROMPT
        self.base_url = settings.OPENAI_BASE_URL or "https://api.openai.com/v1"
        # How error details name the endpoint: its host and path, never its credentials or query.
        self.endpoint = redact(self.base_url)
        # Built once and reused: a new client per message costs ~50 ms of CPU.
        self.client = openai.AsyncOpenAI(
            # Local OpenAI-compatible servers often need no key, but the client insists on one.
            api_key=settings.OPENAI_API_KEY or "not-needed",
            base_url=self.base_url,
            timeout=openai.Timeout(settings.LLM_TIMEOUT, connect=settings.LLM_CONNECT_TIMEOUT),
            max_retries=settings.LLM_MAX_RETRIES,
        )

    def warm_up(self) -> None:
        pass  # the client was built in __init__; connections open on first use

    def count_tokens(self, messages: ChatMessages) -> int:
        # The remote model's tokenizer is unknown here; ~3 characters per token
        # over-counts English a little, which errs on the side of fitting.
        return sum(len(m["content"]) // 3 + 4 for m in messages)

    async def stream(self, messages: ChatMessages, user_id: int | None = None) -> AsyncIterator[str | Usage | Status]:
        """The reply's text deltas, then its Usage.

        The request goes through the openai client (auth, retries, time-outs,
        errors by status), but the event stream is read as plain JSON: the
        client's typed chunk objects cost 0.25-0.35 ms of CPU per token here, most of
        a process's CPU at 200 concurrent streams (docs/performance.md).
        """
        completion_tokens = 0
        usage = None
        try:
            async with self.client.chat.completions.with_streaming_response.create(
                model=self.model_name,
                messages=messages,
                max_tokens=self.max_tokens,
                temperature=settings.LLM_TEMPERATURE,
                stream=True,
                stream_options={"include_usage": True},
            ) as response:
                async for data in server_sent_data(response.iter_lines()):
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        raise ProviderError(
                            PROVIDER_ERROR, "The model failed part-way through its reply.", _error_text(event)
                        )
                    if event.get("usage"):
                        usage = Usage(event["usage"].get("prompt_tokens"), event["usage"].get("completion_tokens"))
                    for choice in event.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            completion_tokens += 1  # one streamed chunk is one token on OpenAI-style servers
                            yield content
        except ProviderError:
            raise
        except openai.AuthenticationError:
            raise ProviderError(
                PROVIDER_ERROR, "The model provider refused this site's credentials.", f"{self.endpoint}: 401/403"
            ) from None
        except (openai.APITimeoutError, httpx2.TimeoutException):
            when = "part-way through its reply" if completion_tokens else "to start its reply"
            raise ProviderError(
                PROVIDER_ERROR, f"The model took too long {when}.", f"{self.endpoint}: timed out {when}"
            ) from None
        except openai.APIConnectionError:
            raise ProviderError(
                PROVIDER_ERROR, "The model provider could not be reached.", f"{self.endpoint}: no connection"
            ) from None
        except openai.APIStatusError as exc:
            raise ProviderError(
                PROVIDER_ERROR,
                f"The model provider answered with an error ({exc.status_code}).",
                f"{self.endpoint}: {exc.status_code} {_short(exc.message)}",
            ) from None
        except Exception as exc:  # noqa: BLE001 - any failure of the stream is the provider's
            raise ProviderError(
                PROVIDER_ERROR, "The model's reply broke off.", f"{self.endpoint}: {_short(repr(exc))}"
            ) from None
        yield usage or Usage(None, completion_tokens)


async def server_sent_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event in a stream of lines (the SSE format: a blank line ends an event,
    several ``data:`` lines join with newlines; comments, ``event:``, ``id:`` and ``retry:`` carry nothing a chat
    completion needs: an error event's data says ``error`` itself)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _error_text(event: dict) -> str:
    error = event["error"]
    return _short(str(error.get("message") if isinstance(error, dict) else error))


def _short(text: str, limit: int = 200) -> str:
    """Upstream text for an error detail: redacted before it is cut (a cut URL could keep half a password)."""
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
