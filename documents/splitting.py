"""Sections of text to overlapping chunks, sized in the embedder's own tokens.

semantic-text-splitter does the splitting: it fills each chunk up to the
token budget with the largest units that fit (paragraphs, then sentences, then
words), so chunks end at paragraph or sentence boundaries, and overlaps them by
whole units. A chunk never crosses a heading: each section is split alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from django.conf import settings
from semantic_text_splitter import TextSplitter

from documents.embedding import count_tokens, counting_tokenizer
from documents.parsing import Section

# What separates two sections in a document's extracted text (DocumentFile.text).
SECTION_SEPARATOR = "\n\n"
HEADING_SEPARATOR = " › "


@dataclass(frozen=True)
class Piece:
    """A chunk before it is embedded: its text, where it lies, and what heads it."""

    text: str
    token_count: int
    heading: str
    char_start: int
    char_end: int
    page: int | None

    def embedded_text(self) -> str:
        return embedded_text(self.heading, self.text)


def embedded_text(heading: str, text: str) -> str:
    """What the embedder reads for a chunk: the headings give a short chunk its context."""
    return f"{heading}\n\n{text}" if heading else text


@functools.cache
def _splitter(tokens: int, overlap: int) -> TextSplitter:
    return TextSplitter.from_huggingface_tokenizer(counting_tokenizer(), tokens, overlap=overlap)


def extracted_text(sections: list[Section]) -> str:
    return SECTION_SEPARATOR.join(section.text for section in sections)


def split(sections: list[Section]) -> Iterator[Piece]:
    """The chunks of ``sections``, in order; spans index ``extracted_text(sections)``."""
    splitter = _splitter(settings.DOCUMENTS_CHUNK_TOKENS, settings.DOCUMENTS_CHUNK_OVERLAP)
    start = 0
    for section in sections:
        heading = HEADING_SEPARATOR.join(section.heading)
        for offset, text in splitter.chunk_indices(section.text):
            yield Piece(
                text=text,
                token_count=count_tokens(text),
                heading=heading,
                char_start=start + offset,
                char_end=start + offset + len(text),
                page=section.page,
            )
        start += len(section.text) + len(SECTION_SEPARATOR)
