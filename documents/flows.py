"""The ingestion flow, one run per document (DESIGN.md §1, left half):

    Parse -> Split -> Embed -> Store -> Ready
      \\--------\\-------\\--------\\--- "failed" ---> Fail

Each node does one step; a step that cannot go on routes to Fail with a reason
for the document's owner. Store is the only node that makes chunks visible,
in one transaction with the document's status and live version, so a
version's chunks appear all together or not at all, and replace the previous
version's at once. Fail leaves a previous version as it was. The flow is synchronous: it runs in a worker
process (documents/tasks.py) or in ``manage.py ingest``, never on an event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models.functions import Length
from pocketflow import Flow, Node

from documents import parsing, splitting
from documents.embedding import EmbeddingError, get_embedder
from documents.models import Chunk, Document, DocumentFile

logger = logging.getLogger(__name__)

# progress(document, stage, done, total): stages "parsed", "embedding", "ready", "failed".
Progress = Callable[[Document, str, int, int], None]


def no_progress(document: Document, stage: str, done: int, total: int) -> None:
    pass


def new_store(document: Document, progress: Progress = no_progress, timings: dict | None = None) -> dict[str, Any]:
    """The shared store of one run; ``timings`` adds up each step's seconds (by step name), across runs."""
    return {"document": document, "progress": progress, "timings": {} if timings is None else timings}


class Failed(Exception):
    """A step could not go on; the message is for the document's owner."""


class _Step(Node):
    """A node whose exec may raise ``Failed``: the reason is kept and the flow routes to Fail;
    otherwise its result goes to ``shared[self.result]``.

    The time its exec takes is added to ``shared["timings"]`` under the step's name.
    """

    result = ""

    def _run(self, shared: dict[str, Any]) -> Any:
        prep_res = self.prep(shared)
        started = time.perf_counter()
        exec_res = self._exec(prep_res)
        name = type(self).__name__.lower()
        shared["timings"][name] = shared["timings"].get(name, 0.0) + time.perf_counter() - started
        return self.post(shared, prep_res, exec_res)

    def exec_fallback(self, prep_res: Any, exc: Exception) -> Any:
        if isinstance(exc, Failed | parsing.Unreadable | EmbeddingError):
            return Failed(str(exc))
        logger.exception("ingesting failed unexpectedly", exc_info=exc)
        return Failed(f"Ingesting failed unexpectedly ({exc.__class__.__name__}); try again or report it.")

    def post(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str | None:
        if isinstance(exec_res, Failed):
            shared["error"] = str(exec_res)
            return "failed"
        shared[self.result] = exec_res
        return None


class Parse(_Step):
    """The file as sections of text. ``parsing.parse`` runs in a child process bounded in memory and
    time (documents/sandbox.py): a file beyond either fails with that reason, and the worker goes on."""

    result = "parsed"

    def prep(self, shared: dict[str, Any]) -> tuple[bytes, str]:
        document = shared["document"]
        data = DocumentFile.objects.values_list("data", flat=True).get(document=document)
        return bytes(data), document.source

    def exec(self, prep_res: tuple[bytes, str]) -> parsing.Parsed:
        data, source = prep_res
        return parsing.parse(data, source)

    def post(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str | None:
        action = super().post(shared, prep_res, exec_res)
        if action is None:
            shared["progress"](shared["document"], "parsed", 0, 0)
        return action


class Split(_Step):
    result = "pieces"

    def prep(self, shared: dict[str, Any]) -> list[parsing.Section]:
        return shared["parsed"].sections

    def exec(self, prep_res: list[parsing.Section]) -> list[splitting.Piece]:
        return list(splitting.split(prep_res))


class Embed(_Step):
    """Vectors for every piece, in the embedder's batches, reporting progress after each batch."""

    result = "vectors"

    def prep(self, shared: dict[str, Any]) -> tuple[list[splitting.Piece], Callable[[int, int], None]]:
        document, progress = shared["document"], shared["progress"]
        return shared["pieces"], lambda done, total: progress(document, "embedding", done, total)

    def exec(self, prep_res: tuple[list[splitting.Piece], Callable[[int, int], None]]) -> list[list[float]]:
        pieces, report = prep_res
        embedder = get_embedder()
        step = getattr(embedder, "batch", 32) * 4  # a progress report every few seconds
        vectors: list[list[float]] = []
        report(0, len(pieces))
        for start in range(0, len(pieces), step):
            vectors.extend(embedder.embed([piece.embedded_text() for piece in pieces[start : start + step]]))
            report(len(vectors), len(pieces))
        return vectors


# Chunks inserted per statement by Store.
STORE_BATCH = 500


class Store(_Step):
    """The new version replaces the live one whole, in one transaction: its chunks, its text, its
    title, and the document becomes ready. Until it commits, searches see the old version."""

    result = "document"

    def prep(self, shared: dict[str, Any]) -> dict[str, Any]:
        return shared

    def exec(self, prep_res: dict[str, Any]) -> Document | None:
        document: Document = prep_res["document"]
        pieces: list[splitting.Piece] = prep_res["pieces"]
        embedder = get_embedder()
        with transaction.atomic():
            current = Document.objects.select_for_update().filter(pk=document.pk).first()
            if current is None or current.content_hash != document.content_hash:
                return None  # deleted, or replaced by a newer upload whose own job follows
            Chunk.objects.filter(document=current).delete()
            Chunk.objects.bulk_create(
                (
                    Chunk(
                        document=current,
                        ordinal=ordinal,
                        text=piece.text,
                        token_count=piece.token_count,
                        heading=piece.heading,
                        char_start=piece.char_start,
                        char_end=piece.char_end,
                        page=piece.page,
                        embedding=vector,
                    )
                    for ordinal, (piece, vector) in enumerate(zip(pieces, prep_res["vectors"], strict=True))
                ),
                batch_size=STORE_BATCH,
            )
            DocumentFile.objects.filter(document=current).update(
                text=splitting.extracted_text(prep_res["parsed"].sections)
            )
            current.title = prep_res["parsed"].title
            current.mime_type = prep_res["parsed"].mime_type
            current.size = DocumentFile.objects.filter(document=current).values_list(Length("data"), flat=True).get()
            current.status = Document.Status.READY
            current.error = ""
            current.live_hash = current.content_hash
            current.chunk_count = len(pieces)
            current.embedding_model = embedder.name
            current.embedding_dimensions = embedder.dimensions
            current.save()
        return current

    def post(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str | None:
        if exec_res is None:
            return "gone"  # nothing stored: nothing to report
        return super().post(shared, prep_res, exec_res)


class Ready(Node):
    """The owner learns that the document is searchable."""

    def prep(self, shared: dict[str, Any]) -> Document:
        return shared["document"]

    def post(self, shared: dict[str, Any], prep_res: Document, exec_res: Any) -> None:
        shared["progress"](prep_res, "ready", prep_res.chunk_count, prep_res.chunk_count)


class Fail(Node):
    """The latest upload ends `failed`, with its reason; the live version, if any, stays as it was."""

    def prep(self, shared: dict[str, Any]) -> tuple[Document, str]:
        return shared["document"], shared["error"]

    def exec(self, prep_res: tuple[Document, str]) -> Document | None:
        document, error = prep_res
        return fail(document, error)

    def post(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> None:
        if exec_res is not None:
            shared["document"] = exec_res
            shared["progress"](exec_res, "failed", 0, 0)


def fail(document: Document, error: str) -> Document | None:
    """``document``'s latest upload marked failed with ``error``; None if it was deleted or replaced
    meanwhile. A live version keeps its chunks and text (still searched and cited). Without one,
    any chunk and text of the document go: they belong to no version (rows of a run from before
    versions were kept), and a document without a live version is never searched."""
    with transaction.atomic():
        current = Document.objects.select_for_update().filter(pk=document.pk).first()
        if current is None or current.content_hash != document.content_hash:
            return None
        if not current.live_hash:
            Chunk.objects.filter(document=current).delete()
            DocumentFile.objects.filter(document=current).update(text="")
            current.chunk_count = 0
        current.status = Document.Status.FAILED
        current.error = error
        current.save()
    logger.info("document %s (%s): a new version failed: %s", current.pk, current.source, error)
    return current


def ingestion_flow() -> Flow:
    parse, split, embed, store, ready, failed = Parse(), Split(), Embed(), Store(), Ready(), Fail()
    parse >> split >> embed >> store >> ready
    store - "gone" >> Node()  # deleted or replaced meanwhile: the run ends quietly
    parse - "failed" >> failed
    split - "failed" >> failed
    embed - "failed" >> failed
    store - "failed" >> failed
    return Flow(start=parse)
