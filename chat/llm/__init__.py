"""LLM providers: ``get_provider()`` returns the configured one (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import weakref

from django.conf import settings

from chat.llm.base import NOT_SET_UP, ChatMessages, Provider, ProviderError, Status, Usage
from chat.protocol import NOT_CONFIGURED

__all__ = ["ChatMessages", "Provider", "ProviderError", "Status", "Usage", "get_provider"]

# The openai client's connection pool belongs to one event loop: one provider per loop
# (in daphne that is one per process, built at start-up).
_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Provider] = weakref.WeakKeyDictionary()


def get_provider() -> Provider:
    """The provider of this process, built on first use."""
    if settings.LLM_PROVIDER == "openai":
        from chat.llm.openai_compatible import OpenAICompatibleProvider

        loop = asyncio.get_running_loop()
        if loop not in _per_loop:
            _per_loop[loop] = OpenAICompatibleProvider()
        return _per_loop[loop]
    if settings.LLM_PROVIDER == "local":
        from chat.llm.local import get_local_provider

        return get_local_provider()
    raise ProviderError(
        NOT_CONFIGURED,
        NOT_SET_UP,
        f"Unknown LLM_PROVIDER {settings.LLM_PROVIDER!r}. Set OPENAI_BASE_URL (and OPENAI_API_KEY) for an "
        "OpenAI-compatible endpoint, or leave both unset for the offline local model.",
    )
