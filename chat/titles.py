"""Conversation titles.

A new conversation is titled at once with its first message (cut to 80
characters), so the sidebar has something to show. When its first reply is
complete, the model is asked for a short title of that exchange (``by_model``);
the title replaces the first one unless the user renamed the conversation
meanwhile, and every open tab of the owner shows it.

The offline model (SmolLM2-135M) does not follow the instruction: asked for a
title it answers the question, or copies the answer ("Paris. It is famous for
the Eiffel Tower..."), which is worse than the first message. So by default
(``CHAT_TITLES = "auto"``) only a remote model writes titles.
"""

from __future__ import annotations

import re

from django.conf import settings

from chat.llm.base import Provider
from chat.models import Conversation

TITLE_CHARS = 80
# What the model reads of the exchange: a title needs the gist, not all of it.
EXCERPT_CHARS = 800
# The test server (tests/llm_server.py) recognises a title request by this opening.
PROMPT = (
    "Write a short title of 3 to 6 words for the conversation below, in its language. "
    "Answer with the title only: no quotes, no full stop."
)
_LABEL = re.compile(r"^\W*title\W*:\s*", re.IGNORECASE)
_EDGES = " \t\"'`*#_.:;!-«»“”‘’"


def by_model() -> bool:
    """Whether the model writes titles (CHAT_TITLES)."""
    mode = settings.CHAT_TITLES
    return mode == "model" or (mode == "auto" and settings.LLM_PROVIDER != "local")


def fallback(content: str) -> str:
    """The first message on one line, cut to TITLE_CHARS."""
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def cleaned(text: str) -> str:
    """The model's answer as a title: its first line, without a "Title:" label, quotes or markdown."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = _LABEL.sub("", line).strip(_EDGES)
    return fallback(line) if line else ""


async def ask(provider: Provider, question: str, answer: str) -> str:
    """A title for the exchange, written by ``provider``; "" if it gave nothing usable."""
    messages = [
        {"role": "system", "content": PROMPT},
        {"role": "user", "content": f"User: {question[:EXCERPT_CHARS]}\n\nAssistant: {answer[:EXCERPT_CHARS]}"},
    ]
    text = ""
    # No user id: a title does not take a place in the user's share of the local model's queue.
    async for event in provider.stream(messages):
        if isinstance(event, str):
            text += event
            # A title is one short line: stop the model there rather than let it ramble on.
            if "\n" in text.lstrip() or len(text) > 2 * TITLE_CHARS:
                break
    return cleaned(text)


def save(conversation_id: int, first: str, title: str) -> Conversation | None:
    """Set ``title`` if the conversation still has its first title ``first`` (not renamed, not deleted)."""
    # update(), not save(): a new title does not make the conversation "recently active".
    if not Conversation.objects.filter(pk=conversation_id, title=first).update(title=title):
        return None
    return Conversation.objects.get(pk=conversation_id)
