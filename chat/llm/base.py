"""The one streaming interface every LLM provider implements.

``Provider.stream(messages)`` is an async iterator of events: ``str`` text
deltas, then at most one ``Usage``; ``Status`` events may come before the
first delta (queued, warming up). Failures raise ``ProviderError`` with a
protocol error code; text already yielded stays the caller's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from chat.llm.redact import redact

ChatMessages = list[dict[str, str]]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class Status:
    """Progress before the first token: ``state`` is "queued" (with ``position``) or "warming_up"."""

    state: str
    detail: dict[str, Any]


# What users are told when no model can answer (the detail says why, in the log).
NOT_SET_UP = "No language model is set up on this site yet; the administrator can see why in the server log."


class ProviderError(Exception):
    """A reply the provider could not give.

    ``message`` is what the user is shown: short, and free of anything about
    the deployment (endpoint URLs, which may hold credentials; host names;
    file paths; raw upstream text). ``detail`` says what happened, for the
    log and for staff in admin (``Message.error_detail``). Both are redacted here (chat/llm/redact.py),
    so no credential of a provider URL reaches either, nor the exception's own text.
    """

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        message, detail = redact(message), redact(detail)
        super().__init__(detail or message)
        self.code = code
        self.message = message
        self.detail = detail


class Provider(Protocol):
    #: The model name recorded on each reply.
    model_name: str
    #: The context window in tokens (prompt + answer).
    context_tokens: int
    #: Tokens kept free for the answer.
    max_tokens: int
    system_prompt: str

    def stream(self, messages: ChatMessages, user_id: int | None = None) -> AsyncIterator[str | Usage | Status]:
        """The reply's text deltas (and progress, and usage); ``user_id`` says whose turn it is (for fair shares)."""
        ...

    def count_tokens(self, messages: ChatMessages) -> int:
        """Tokens the prompt made of ``messages`` takes, as the model counts them."""
        ...

    def warm_up(self) -> None:
        """Get ready in the background (load a model, open connections); must not block."""
        ...
