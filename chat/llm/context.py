"""Fit a prompt into the model's context window."""

from __future__ import annotations

from chat.llm.base import ChatMessages, Provider, ProviderError
from chat.protocol import CONTEXT_TOO_LONG


def fit_prompt(provider: Provider, history: ChatMessages, question: str, system_prompt: str) -> ChatMessages:
    """System prompt + as many recent turns as fit + the question, leaving ``max_tokens`` for the answer.

    The question is never cut: if it does not fit on its own, that is an error the user sees.
    """
    system = {"role": "system", "content": system_prompt}
    asked = {"role": "user", "content": question}
    budget = provider.context_tokens - provider.max_tokens
    needed = provider.count_tokens([system, asked])
    if needed > budget:
        raise ProviderError(
            CONTEXT_TOO_LONG,
            f"Your message is too long for this model: it takes {needed} tokens with the system prompt, "
            f"and the model has room for {budget} (its window is {provider.context_tokens} tokens, "
            f"{provider.max_tokens} of them kept for the answer). Shorten it or split it up.",
        )
    kept: ChatMessages = []
    used = needed
    # Whole turns, newest first, until the next one would not fit.
    for start in range(len(history) - 1, -1, -1):
        if history[start]["role"] != "user":
            continue
        turn = history[start : start + 2] if start + 1 < len(history) else history[start:]
        turn = [m for m in turn if m is history[start] or m["role"] == "assistant"]
        cost = sum(provider.count_tokens([m]) for m in turn)
        if used + cost > budget:
            break
        kept[:0] = turn
        used += cost
    messages = [system, *kept, asked]
    # Per-message counts miss a little template overhead: check the whole and trim if needed.
    while kept and provider.count_tokens(messages) > budget:
        kept = kept[2:] if len(kept) > 1 and kept[1]["role"] == "assistant" else kept[1:]
        messages = [system, *kept, asked]
    return messages
