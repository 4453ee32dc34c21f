"""Any OpenAI-compatible chat endpoint, through the official ``openai`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
from django.conf import settings

from chat.llm.base import ChatMessages, ProviderError, Status, Usage
from chat.protocol import PROVIDER_ERROR


class OpenAICompatibleProvider:
    def __init__(self) -> None:
        self.model_name = settings.LLM_MODEL
        self.context_tokens = settings.LLM_CONTEXT_TOKENS
        self.max_tokens = settings.LLM_MAX_TOKENS
        self.system_prompt = settings.LLM_SYSTEM_PROMPT
        self.base_url = settings.OPENAI_BASE_URL or "https://api.openai.com/v1"
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

    async def stream(self, messages: ChatMessages) -> AsyncIterator[str | Usage | Status]:
        completion_tokens = 0
        try:
            stream = await self.client.chat.completions.create(
                model=self.model_name,
                messages=messages,
                max_tokens=self.max_tokens,
                temperature=settings.LLM_TEMPERATURE,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.AuthenticationError:
            raise ProviderError(PROVIDER_ERROR, f"The model endpoint {self.base_url} refused the API key.") from None
        except openai.APITimeoutError:
            raise ProviderError(PROVIDER_ERROR, f"The model endpoint {self.base_url} did not answer in time.") from None
        except openai.APIConnectionError:
            raise ProviderError(PROVIDER_ERROR, f"Could not reach the model endpoint {self.base_url}.") from None
        except openai.APIStatusError as exc:
            raise ProviderError(
                PROVIDER_ERROR, f"The model endpoint answered {exc.status_code}: {_short(exc.message)}"
            ) from None
        usage = None
        try:
            async for event in stream:
                if event.usage is not None:
                    usage = Usage(event.usage.prompt_tokens, event.usage.completion_tokens)
                for choice in event.choices:
                    if choice.delta and choice.delta.content:
                        completion_tokens += 1  # one streamed chunk is one token on OpenAI-style servers
                        yield choice.delta.content
        except openai.APITimeoutError:
            raise ProviderError(
                PROVIDER_ERROR, f"The model endpoint {self.base_url} did not answer in time (mid-reply)."
            ) from None
        except Exception as exc:  # noqa: BLE001 - any failure of the stream is the provider's
            raise ProviderError(PROVIDER_ERROR, f"The model stream broke off: {_short(str(exc))}") from None
        finally:
            await stream.close()
        yield usage or Usage(None, completion_tokens)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
