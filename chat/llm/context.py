"""Fit a prompt into the model's context window."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings

from chat.llm.base import ChatMessages, Provider, ProviderError
from chat.protocol import CONTEXT_TOO_LONG
from documents.search import snippet


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


# --- sources from documents --------------------------------------------------------

CITE_INSTRUCTION = (
    "Answer from the numbered sources below when they hold the answer, and cite each source you "
    "use by its number in square brackets, like [1] or [2][3]. If they do not hold the answer, "
    "say so, then answer from what you know."
)


@dataclass
class Source:
    """A passage in the prompt, numbered ``n``: one chunk, or neighbouring chunks merged."""

    n: int
    document_id: int
    title: str
    chunk_id: int
    heading: str
    page: int | None
    text: str
    char_start: int
    char_end: int
    ordinal_first: int
    ordinal_last: int

    def prompt_text(self) -> str:
        where = " › ".join(part for part in (self.title, self.heading) if part)
        return f"[{self.n}] {where}\n{self.text}"

    def frame(self) -> dict[str, Any]:
        """What the `sources` frame and the saved message carry (docs/protocol.md)."""
        return {
            "n": self.n,
            "document_id": str(self.document_id),
            "title": self.title,
            "chunk_id": str(self.chunk_id),
            "snippet": snippet(self.text),
            "heading": self.heading,
            "page": self.page,
            "start": self.char_start,
            "end": self.char_end,
        }


def with_sources(system_prompt: str, sources: list[Source]) -> str:
    if not sources:
        return system_prompt
    return "\n\n".join([system_prompt, CITE_INSTRUCTION, *(s.prompt_text() for s in sources)])


def _merged(source: Source, hit: Any) -> Source | None:
    """``source`` with ``hit`` joined on, when ``hit`` is the next or previous chunk of the same
    section: one passage reads better than two halves, and their overlap is not paid twice."""
    if hit.document_id != source.document_id or hit.heading != source.heading:
        return None
    if hit.ordinal == source.ordinal_last + 1:
        overlap = max(0, source.char_end - hit.char_start)
        text = source.text + ("" if overlap else "\n\n") + hit.text[overlap:]
        return replace(source, text=text, char_end=hit.char_end, ordinal_last=hit.ordinal)
    if hit.ordinal == source.ordinal_first - 1:
        overlap = max(0, hit.char_end - source.char_start)
        text = hit.text + ("" if overlap else "\n\n") + source.text[overlap:]
        return replace(source, text=text, char_start=hit.char_start, ordinal_first=hit.ordinal, chunk_id=hit.chunk_id)
    return None


def source_budget(provider: Provider, question: str) -> int:
    """Tokens the sources may take: a share of what the window has left once the system prompt,
    the question and the answer's room are counted (the rest is for history), and a cap, since a
    128k window filled with passages costs money and dilutes the answer."""
    system = {"role": "system", "content": f"{provider.system_prompt}\n\n{CITE_INSTRUCTION}"}
    fixed = provider.count_tokens([system, {"role": "user", "content": question}])
    free = provider.context_tokens - provider.max_tokens - fixed
    return max(0, min(int(free * settings.RETRIEVAL_CONTEXT_SHARE), settings.RETRIEVAL_CONTEXT_TOKENS))


def select_sources(provider: Provider, hits: list[Any], budget: int, most: int) -> list[Source]:
    """The best hits, in their order, that fit ``budget`` tokens and ``most`` sources: exact
    duplicates dropped, neighbouring chunks of one section merged into one source."""

    def cost(source: Source) -> int:
        return provider.count_tokens([{"role": "system", "content": source.prompt_text()}])

    sources: list[Source] = []
    costs: list[int] = []
    seen: set[str] = set()
    for hit in hits:
        key = " ".join(hit.text.split()).lower()
        if key in seen:
            continue  # the same passage in another document (a file both shared and uploaded)
        for i, source in enumerate(sources):
            merged = _merged(source, hit)
            if merged is None:
                continue
            merged_cost = cost(merged)
            if sum(costs) - costs[i] + merged_cost <= budget:
                sources[i], costs[i] = merged, merged_cost
                break
        else:
            if len(sources) >= most:
                continue
            new = Source(
                len(sources) + 1, hit.document_id, hit.title, hit.chunk_id, hit.heading, hit.page,
                hit.text, hit.char_start, hit.char_end, hit.ordinal, hit.ordinal,
            )  # fmt: skip
            new_cost = cost(new)
            if sum(costs) + new_cost > budget:
                continue  # a shorter passage further down may still fit
            sources.append(new)
            costs.append(new_cost)
        seen.add(key)
    return sources
