"""Search over the chunks a user may see: the retrieval half of answering from documents.

    scope -> rewrite -> embed -> retrieve (full text + vector, fused) -> rerank

Each stage is a plain function, so the answering flow (chat/flows/answer.py)
and ``manage.py retrieve`` run the very same pipeline. The stages' choices
(weights, rewrite, rerank) were measured with ``bench/retrieval.py``; the
figures are in docs/performance.md.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection, transaction

from chat.llm.base import ProviderError
from documents.embedding import configured_model_name, get_embedder

logger = logging.getLogger(__name__)

MODES = ("hybrid", "vector", "fulltext")


@dataclass(frozen=True)
class Scope:
    """What one user may search: the live versions of the documents they own and of the shared
    ones, embedded by the configured model (``DocumentQuerySet.searchable``)."""

    document_ids: list[int]
    chunks: int

    def __bool__(self) -> bool:
        return self.chunks > 0


def exact_scan(visible: int, table: int) -> bool:
    """Scan a user's vectors exactly rather than through the HNSW index?

    With a filter that keeps few rows, an HNSW scan visits ~40 / (share kept) index entries and
    can stop short (hnsw.max_scan_tuples); an exact scan costs ~3 µs a row here (8,300 rows:
    22 ms). So: exact below EXACT_SCAN_CHUNKS visible chunks, or when the user sees less than
    EXACT_SCAN_SHARE of the table (``table``: all chunks, everyone's); the index otherwise.
    """
    return visible < EXACT_SCAN_CHUNKS or visible < EXACT_SCAN_SHARE * table


@dataclass
class Hit:
    """A chunk found for a query, with what a citation needs to point into it."""

    chunk_id: int
    document_id: int
    title: str
    source: str
    text: str
    heading: str
    page: int | None
    ordinal: int
    char_start: int
    char_end: int
    score: float
    #: Cosine similarity to the query (None without a query vector).
    cosine: float | None = None
    #: Cosine similarity to each hit of the same search, in the order they came back.
    likeness: list[float] = field(default_factory=list, repr=False)


def scope(user_id: int) -> Scope:
    """One query over documents (no chunk is read): a user without any gets plain chat.

    A document whose latest upload is queued, processing or failed is searched in its live
    version; one never ingested is not; one embedded by another model waits for ``reembed``
    (its vectors cannot be compared with the query's).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(array_agg(id), '{}'), coalesce(sum(chunk_count), 0) FROM documents_document "
            "WHERE (owner_id = %s OR owner_id IS NULL) AND live_hash <> '' AND embedding_model = %s",
            [user_id, configured_model_name()],
        )
        ids, chunks = cursor.fetchone()
    return Scope(list(ids), int(chunks))


# --- rewrite ------------------------------------------------------------------

REWRITES = ("recent", "none", "llm")


def rewrite_recent(question: str, history: list[dict[str, str]]) -> str:
    """The question with the user's previous message in front: a follow-up ("and how do I undo
    it?") names its topic only there. Needs no model, so it costs nothing and cannot invent."""
    previous = [m["content"] for m in history if m["role"] == "user"][-1:]
    return "\n".join([*previous, question])


REWRITE_INSTRUCTION = (
    "Rewrite the user's last question as one standalone search query for documentation, using the "
    "conversation only to fill in what the question refers to. Reply with the query alone."
)


def rewrite_prompt(question: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
    recent = history[-4:]
    lines = [f"{m['role']}: {m['content'][:500]}" for m in recent]
    return [
        {"role": "system", "content": REWRITE_INSTRUCTION},
        {"role": "user", "content": "\n".join([*lines, f"last question: {question}"])},
    ]


async def rewrite_llm(provider: Any, question: str, history: list[dict[str, str]]) -> str:
    """The provider's standalone query for a follow-up; the question itself when there is no
    history or the model gives nothing usable (its first line, at most 300 characters)."""
    if not history:
        return question
    text = ""
    events = provider.stream(rewrite_prompt(question, history))
    try:
        async for event in events:
            if isinstance(event, str):
                text += event
                if "\n" in text.strip() or len(text) > 300:
                    break
    finally:
        await events.aclose()
    line = text.strip().splitlines()[0].strip(' "') if text.strip() else ""
    return line[:300] or question


# --- retrieve -----------------------------------------------------------------


def embed_query(query: str) -> np.ndarray:
    return np.asarray(get_embedder().embed([query])[0], dtype=np.float32)


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6f}" for x in vector.tolist()) + "]"


@dataclass(frozen=True)
class TableStatistics:
    """What ANALYZE knows about the chunks: how many, and the most common lexemes' frequencies."""

    chunks: int
    frequencies: dict[str, float]
    #: The frequency a lexeme not among the most common is counted at (the lowest listed).
    rare: float
    taken_at: float


STATISTICS_SECONDS = 300.0
_statistics: TableStatistics | None = None


def table_statistics() -> TableStatistics:
    """From pg_class and pg_stats, kept for STATISTICS_SECONDS per process: reading pg_stats costs
    a few ms of planning, and the figures move only when ANALYZE runs."""
    global _statistics
    now = time.monotonic()
    if _statistics is None or now - _statistics.taken_at > STATISTICS_SECONDS:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT c.reltuples, s.most_common_elems::text::text[], s.most_common_elem_freqs FROM pg_class c "
                "LEFT JOIN pg_stats s ON s.schemaname = current_schema() AND s.tablename = c.relname "
                "AND s.attname = 'search' WHERE c.oid = 'documents_chunk'::regclass"
            )
            chunks, elems, freqs = cursor.fetchone()
        frequencies = dict(zip(elems or [], freqs or [], strict=False))
        rare = min(frequencies.values()) if frequencies else 0.0
        _statistics = TableStatistics(max(0, int(chunks or 0)), frequencies, rare, now)
    return _statistics


def _tsquery(lexemes: list[str]) -> str:
    """Lexemes (already normalised) OR-ed, as tsquery text."""
    quoted = ("'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'" for lexeme in lexemes)
    return " | ".join(quoted)


# The question's lexemes, OR-ed: websearch_to_tsquery ANDs every word, and a natural question
# almost never has all its words in one chunk (DESIGN.md §6). Rows are ranked by ts_rank_cd
# against all of them (more of them, closer together, ranks higher), but *matched* only by the
# rarest ones: taken rarest first while the rows they are expected to match among the user's
# chunks stay within RETRIEVAL_TEXT_MATCH_ROWS (always at least one). So the work stays bounded
# however large the table and however common the question's words, and common words, which
# BM25's idf would weigh near zero anyway, still count in the ranking. Measured faster and
# better than matching by all of them (docs/performance.md).
def text_queries(query: str, visible: int, stats: TableStatistics) -> tuple[str, str] | None:
    """(matched by, ranked by) tsquery texts for ``query``, or None if it has no lexeme."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT tsvector_to_array(to_tsvector('english', %s))", [query])
        lexemes = cursor.fetchone()[0]
    if not lexemes:
        return None
    rarest_first = sorted(lexemes, key=lambda lexeme: (stats.frequencies.get(lexeme, stats.rare), lexeme))
    selective, expected = [], 0.0
    for lexeme in rarest_first:
        expected += stats.frequencies.get(lexeme, stats.rare) * visible
        if selective and expected > settings.RETRIEVAL_TEXT_MATCH_ROWS:
            break
        selective.append(lexeme)
    return _tsquery(selective), _tsquery(lexemes)


# How the HNSW index goes on when the filter drops rows (pgvector's hnsw.iterative_scan).
ITERATIVE_SCAN = "relaxed_order"
# See exact_scan().
EXACT_SCAN_CHUNKS = 3000
EXACT_SCAN_SHARE = 0.03


def _vector_cte(exact: bool) -> str:
    if exact:
        # A materialized CTE keeps the planner from the HNSW index: the filter picks few rows.
        return """
        visible AS MATERIALIZED (
            SELECT c.id, c.embedding <=> %(v)s::vector AS distance FROM documents_chunk c
            WHERE c.document_id = ANY(%(docs)s)
        ),
        vec AS (
            SELECT id, row_number() OVER (ORDER BY distance) AS rank
            FROM (SELECT id, distance FROM visible ORDER BY distance LIMIT %(n)s) v
        )"""
    # The HNSW index, scanned on (hnsw.iterative_scan) until enough rows pass the filter.
    return """
        near AS MATERIALIZED (
            SELECT c.id, c.embedding <=> %(v)s::vector AS distance FROM documents_chunk c
            WHERE c.document_id = ANY(%(docs)s)
            ORDER BY distance LIMIT %(n)s
        ),
        vec AS (SELECT id, row_number() OVER (ORDER BY distance) AS rank FROM near)"""


TEXT_CTE = """
        text_hits AS (
            SELECT c.id, row_number() OVER (ORDER BY ts_rank_cd(c.search, %(ranked_by)s::tsquery) DESC, c.id) AS rank
            FROM documents_chunk c
            WHERE c.search @@ %(matched_by)s::tsquery AND c.document_id = ANY(%(docs)s)
            ORDER BY ts_rank_cd(c.search, %(ranked_by)s::tsquery) DESC, c.id LIMIT %(n)s
        )"""


def retrieve(
    where: Scope,
    query: str,
    vector: np.ndarray | None,
    *,
    mode: str = "hybrid",
    candidates: int | None = None,
    explain: bool = False,
) -> list[Hit] | list[str]:
    """The best chunks for ``query`` in ``where``, best first, in one SQL statement.

    hybrid: weighted reciprocal rank fusion of the vector and full-text lists (score = weight /
    (RRF_K + rank), summed over the lists a chunk is in). ``explain``: the statement's plan
    (EXPLAIN ANALYZE), not its rows.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    if not where:
        return []
    candidates = candidates or settings.RETRIEVAL_CANDIDATES
    stats = table_statistics()
    texts = text_queries(query, where.chunks, stats) if mode in ("hybrid", "fulltext") else None
    ctes, parts = [], []
    if mode in ("hybrid", "vector"):
        ctes.append(_vector_cte(exact_scan(where.chunks, stats.chunks)))
        parts.append("SELECT id, %(wv)s / (%(k)s + rank) AS score FROM vec")
    if texts:
        ctes.append(TEXT_CTE)
        parts.append("SELECT id, %(wt)s / (%(k)s + rank) AS score FROM text_hits")
    if not parts:
        return []  # full text only, and the query has no word to search
    sql = f"""
        WITH {",".join(ctes)},
        fused AS MATERIALIZED (
            SELECT s.id, sum(s.score) AS score FROM ({" UNION ALL ".join(parts)}) s
            GROUP BY s.id ORDER BY score DESC, s.id LIMIT %(n)s
        ),
        found AS MATERIALIZED (
            SELECT f.id, f.score, c.embedding FROM fused f JOIN documents_chunk c ON c.id = f.id
        )
        SELECT c.id, c.document_id, d.title, d.source, c.text, c.heading, c.page, c.ordinal,
               c.char_start, c.char_end, f.score, 1 - (f.embedding <=> %(v)s::vector),
               -- The rerank's likeness matrix, computed here: 40 x 40 numbers cross the wire, not 40 x 384.
               ARRAY(SELECT 1 - (f.embedding <=> o.embedding) FROM found o ORDER BY o.score DESC, o.id)
        FROM found f JOIN documents_chunk c ON c.id = f.id JOIN documents_document d ON d.id = c.document_id
        ORDER BY f.score DESC, f.id"""
    params = {
        "q": query,
        "v": _vector_literal(vector) if vector is not None else None,
        "docs": where.document_ids,
        "n": candidates,
        "k": float(settings.RETRIEVAL_RRF_K),
        "wv": float(settings.RETRIEVAL_WEIGHT_VECTOR),
        "wt": float(settings.RETRIEVAL_WEIGHT_TEXT),
        "matched_by": texts[0] if texts else None,
        "ranked_by": texts[1] if texts else None,
    }
    with transaction.atomic(), connection.cursor() as cursor:
        # For this statement's transaction only (is_local), whoever reuses the connection next.
        cursor.execute(
            "SELECT set_config('hnsw.iterative_scan', %s, true), set_config('hnsw.ef_search', %s, true)",
            [ITERATIVE_SCAN, str(max(settings.RETRIEVAL_EF_SEARCH, candidates))],
        )
        cursor.execute(("EXPLAIN (ANALYZE, COSTS OFF) " if explain else "") + sql, params)
        rows = cursor.fetchall()
    if explain:
        return [row[0] for row in rows]
    return [Hit(*row[:10], float(row[10]), row[11], row[12]) for row in rows]


# --- rerank -------------------------------------------------------------------


def rerank(hits: list[Hit], diversity: float | None = None) -> list[Hit]:
    """Rescore the fused candidates, then pick them by maximal marginal relevance; no model, < 1 ms.

    Relevance is half the fused score (scaled to the best) and half the exact cosine similarity to
    the query: fusion keeps only ranks, so it cannot tell a near match from a distant one, and
    the index's distances are approximate. Then each pick is the candidate that best trades that
    relevance against its likeness to the picks before it (RETRIEVAL_RERANK_DIVERSITY), so
    near-copies of one passage give way to the next different one and the top few cover more.
    ``hits`` must be one search's whole list, in its order (``likeness`` is by position).
    """
    if len(hits) < 3:
        return hits
    diversity = settings.RETRIEVAL_RERANK_DIVERSITY if diversity is None else diversity
    fused = np.array([h.score for h in hits]) / max(h.score for h in hits)
    cosine = np.array([np.nan if h.cosine is None else h.cosine for h in hits])
    relevance = fused if np.isnan(cosine).any() else 0.5 * fused + 0.5 * cosine
    likeness = np.array([h.likeness for h in hits], dtype=float)
    picked: list[int] = []
    redundancy = np.zeros(len(hits))  # likeness to the closest pick so far
    left = np.ones(len(hits), dtype=bool)
    for _ in range(len(hits)):
        gains = np.where(left, (1 - diversity) * relevance - diversity * redundancy, -np.inf)
        best = int(np.argmax(gains))
        picked.append(best)
        left[best] = False
        redundancy = np.maximum(redundancy, likeness[best])
    return [hits[i] for i in picked]


# --- the pipeline ---------------------------------------------------------------


@dataclass
class Query:
    """How to search: what ``manage.py retrieve`` and the evaluation vary, the settings by default."""

    mode: str = "hybrid"
    rewrite: str = "recent"
    rerank: bool = True

    @classmethod
    def configured(cls) -> Query:
        return cls(mode="hybrid", rewrite=settings.RETRIEVAL_REWRITE, rerank=settings.RETRIEVAL_RERANK)


async def search_query(question: str, history: list[dict[str, str]], rewrite: str, provider: Any = None) -> str:
    """The search query for ``question`` by the ``rewrite`` named (REWRITES); "llm" asks
    ``provider``, and falls back to "recent" if the provider fails."""
    if rewrite == "llm":
        try:
            return await rewrite_llm(provider, question, history)
        except ProviderError as exc:
            logger.warning("query rewrite failed (%s): the recent turns are used instead", exc.code)
            return rewrite_recent(question, history)
    if rewrite == "recent":
        return rewrite_recent(question, history)
    return question


def pipeline(where: Scope, query_text: str, how: Query, limit: int) -> list[Hit]:
    """Embed, retrieve and rerank: the ranking the answering flow uses, for ``manage.py retrieve``."""
    vector = embed_query(query_text) if how.mode != "fulltext" and where else None
    hits = retrieve(where, query_text, vector, mode=how.mode)
    if how.rerank:
        hits = rerank(hits)
    return hits[:limit]


_SPACE = re.compile(r"\s+")


def snippet(text: str, chars: int = 240) -> str:
    flat = _SPACE.sub(" ", text).strip()
    return flat if len(flat) <= chars else flat[: chars - 1].rsplit(" ", 1)[0] + "…"
