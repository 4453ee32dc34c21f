"""Fit a prompt into the model's context window."""

from __future__ import annotations

from chat.llm.base import ChatMessages, Provider, ProviderError
from chat.protocol import CONTEXT_TOO_LONG


def _turns(history: ChatMessages) -> list[ChatMessages]:
    """Split history into turns: a user message and the replies after it."""
    turns: list[ChatMessages] = []
    for message in history:
        if message["role"] == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def fit_prompt(provider: Provider, history: ChatMessages, question: str, system_prompt: str) -> ChatMessages:
    """System prompt + as many recent whole turns as fit + the question, leaving ``max_tokens`` for the answer.

    Tokens are counted by the provider (the model's own tokenizer where it has
    one). The question is never cut: if it does not fit on its own, that is an
    error the user sees.
    """
    system = {"role": "system", "content": system_prompt}
    asked = {"role": "user", "content": question}
    budget = provider.context_tokens - provider.max_tokens
    used = provider.count_tokens([system, asked])
    if used > budget:
        raise ProviderError(
            CONTEXT_TOO_LONG,
            f"Your message is too long for this model: it takes {used} tokens with the system prompt, "
            f"and the model has room for {budget} (its window is {provider.context_tokens} tokens, "
            f"{provider.max_tokens} of them kept for the answer). Shorten it or split it up.",
        )
    base = provider.count_tokens([system])
    kept: list[ChatMessages] = []
    for turn in reversed(_turns(history)):
        # What the turn adds to a prompt, template markup included.
        cost = provider.count_tokens([system, *turn]) - base
        if used + cost > budget:
            break
        kept.insert(0, turn)
        used += cost

    def build() -> ChatMessages:
        return [system, *(m for turn in kept for m in turn), asked]

    # Counting turns apart can miss a token of markup where they join: check the whole.
    while kept and provider.count_tokens(build()) > budget:
        kept.pop(0)
    return build()
