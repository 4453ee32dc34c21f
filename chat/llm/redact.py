"""Secrets out of text that leaves the code: the log, ``Message.error_detail``, admin, error frames.

A provider's URL may carry credentials (``https://user:pass@proxy/v1``) or a key in its query
(``?api-key=...``), and the errors of the openai client and of the servers behind it quote URLs.
``redact`` keeps what staff need to tell endpoints apart (scheme, host, port, path) and hides the
rest; it also hides the configured keys and URL secrets wherever they appear bare (a parser's
"Invalid port: 's3cret'"). ``RedactingFormatter``, the formatter of the site's log handler
(settings.LOGGING), applies it to every line logged: a second line of defence for text that
never went through ``redact``.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote, urlsplit

HIDDEN = "***"
# A URL up to the first character that cannot be part of it in a log line or a repr.
URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
# A path's query without the rest of its URL, as a server quotes its request line ("POST /v1/?key=...").
PATH_QUERY = re.compile(r"(/[^\s?'\"<>`]*)\?[^\s'\"<>`]+")
# Settings whose values are secrets, and settings holding URLs whose userinfo and query are.
SECRET_SETTINGS = ("OPENAI_API_KEY", "EMBEDDING_API_KEY")
URL_SETTINGS = ("OPENAI_BASE_URL", "EMBEDDING_BASE_URL")
# Shorter values are not hidden as bare words: they would blank out ordinary text ("pw", "1").
MIN_SECRET_CHARS = 6


def redact(text: str) -> str:
    """``text`` with every URL's userinfo, query and fragment hidden, every path's query, and the configured
    secrets."""
    if "://" in text:
        text = URL.sub(_url, text)
    if "?" in text:
        text = PATH_QUERY.sub(rf"\1?{HIDDEN}", text)
    for secret in _configured_secrets():
        if secret in text:
            text = text.replace(secret, HIDDEN)
    return text


def _url(match: re.Match) -> str:
    scheme, rest = match.group(0).split("://", 1)
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    before, after = rest[:cut], rest[cut:]
    # Userinfo ends at the last "@" before the query: a password may hold an unescaped "/".
    if "@" in before:
        before = f"{HIDDEN}@{before.rpartition('@')[2]}"
    else:
        authority, slash, path = before.partition("/")
        # "user:pass" with its "@host" cut off (a shortened message): no port is made of letters.
        if ":" in authority and not authority.endswith("]") and not authority.rpartition(":")[2].isdigit():
            before = f"{HIDDEN}{slash}{path}"
    if after:
        after = after[0] + HIDDEN
    return f"{scheme}://{before}{after}"


def _configured_secrets() -> list[str]:
    from django.conf import settings

    if not settings.configured:
        return []
    found = [getattr(settings, name, "") for name in SECRET_SETTINGS]
    for name in URL_SETTINGS:
        try:
            parts = urlsplit(getattr(settings, name, "") or "")
            found += [parts.password or "", *(value for _, _, value in _pairs(parts.query))]
        except ValueError:
            continue  # a URL too broken to parse: its URL form is still hidden by the pattern above
    found += [unquote(secret) for secret in found]
    # Longest first: a secret that contains another is hidden whole.
    return sorted({s for s in found if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def _pairs(query: str) -> list[tuple[str, str, str]]:
    return [pair.partition("=") for pair in query.split("&") if pair]


class RedactingFormatter(logging.Formatter):
    """Formats a record as usual (message, traceback, stack), then runs ``redact`` over the result.

    A formatter rather than a filter: the record itself is left as it was, so another handler
    (a test's log capture) sees what the code logged, and each defence can be tested alone.
    """

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
