"""A small OpenAI-compatible chat server for tests and benchmarks, scripted by the user's message.

The real ``openai`` client talks to it over HTTP, so the provider code runs for
real. It is asyncio on one thread, so two hundred concurrent streams cost it
little CPU (the load benchmark shares two cores with it). Directives anywhere
in the last user message:

    [tokens=N]      answer with N tokens "t0 t1 ..." (default: echo the message)
    [delay=S]       wait S seconds before each token
    [first_delay=S] wait S seconds before the first token
    [fail_after=N]  drop the connection after N tokens (mid-stream failure)
    [status=CODE]   answer with this HTTP status and an error body
    [bad_text]      answer "ok<NUL>ay <lone surrogate> end" (text PostgreSQL cannot store)
    [markdown]      answer with MARKDOWN_REPLY (a heading, a list, a table, a link, a Python code block)
    [xss]           answer with XSS_REPLY (script, event handlers, javascript: links, raw HTML)
    [cite]          answer with citation markers: CITED_REPLY ([1] and [2] exist when two sources
                    were given; [9] never does)

A title request (chat/titles.py: its system prompt starts "Write a short title") is answered
with the ``[title=Words_with_underscores]`` of the question it quotes, spaces for underscores,
or else with the question itself (so the title stays what it was); it is recorded in
``title_requests``, not ``requests``.

POST .../embeddings answers with deterministic vectors of the asked ``dimensions``.

Token times are scheduled from the request's arrival (token i is due at
first_delay + (i + 1) * delay), so a busy machine delays tokens without
stretching the whole reply.

Run it alone with ``python -m tests.llm_server PORT``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import threading
import time

DIRECTIVE = re.compile(r"\[(\w+)(?:=([\w.]+))?\]")


MARKDOWN_REPLY = (
    "### Reading a file\n\nThree steps:\n\n1. open it\n2. read it\n3. **close** it\n\n"
    "| mode | meaning |\n|---|---|\n| r | read |\n| w | write |\n\n"
    "```python\ndef read(path):\n    with open(path) as f:\n        return f.read()\n```\n\n"
    "See [the docs](https://docs.python.org/3/) for more.\n"
)
XSS_REPLY = (
    '<script>window.xssRan = "script"</script> <img src="x" onerror="window.xssRan = \'img\'"> '
    "[click me](javascript:window.xssRan='link') <b onmouseover=\"window.xssRan='b'\">bold?</b> "
    "<iframe src=\"javascript:window.xssRan='iframe'\"></iframe> done"
)
CITED_REPLY = "The pump needs a new seal [1]. Rinse the filter weekly [2][9]."


def plan(messages: list[dict]) -> tuple[list[str], dict[str, str]]:
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    directives = {k: v for k, v in DIRECTIVE.findall(last)}
    if "tokens" in directives:
        tokens = [f"t{i} " for i in range(int(directives["tokens"]))]
    elif "markdown" in directives:
        tokens = re.findall(r"\S+\s*", MARKDOWN_REPLY)
    elif "xss" in directives:
        tokens = re.findall(r"\S+\s*", XSS_REPLY)
    elif "cite" in directives:
        tokens = re.findall(r"\S+\s*", CITED_REPLY)
    elif "bad_text" in directives:
        tokens = ["ok\x00ay ", "\ud800 ", "end"]
    else:
        text = "You said: " + DIRECTIVE.sub("", last).strip()
        tokens = re.findall(r"\S+\s*", text)
    return tokens, directives


TITLE_REQUEST = "Write a short title"


def is_title_request(messages: list[dict]) -> bool:
    return bool(messages) and messages[0]["role"] == "system" and messages[0]["content"].startswith(TITLE_REQUEST)


def title_plan(messages: list[dict]) -> list[str]:
    quoted = messages[-1]["content"].removeprefix("User: ").partition("\n\nAssistant:")[0]
    wanted = dict(DIRECTIVE.findall(quoted)).get("title")
    return re.findall(r"\S+\s*", wanted.replace("_", " ") if wanted else quoted)


def expected_reply(content: str) -> str:
    """The text the server streams for a user message ``content``."""
    return "".join(plan([{"role": "user", "content": content}])[0])


def _embeddings(request: dict) -> dict:
    """Deterministic vectors of the asked size: a text's words hashed into buckets (similar texts, near vectors)."""
    size = int(request.get("dimensions") or 8)
    texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
    data = []
    for index, text in enumerate(texts):
        vector = [0.0] * size
        for word in text.lower().split():
            vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % size] += 1.0
        norm = sum(v * v for v in vector) ** 0.5 or 1.0
        data.append({"object": "embedding", "index": index, "embedding": [v / norm for v in vector]})
    return {"object": "list", "data": data, "model": request["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def _event(payload: dict) -> bytes:
    payload = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "test-model", **payload}
    data = f"data: {json.dumps(payload)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _token_event(token: str) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})


def _response(status: int, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class LLMServer:
    """Serves on 127.0.0.1 from an event loop of its own (in a thread, or the caller's with ``serve``)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.requests: list[dict] = []
        self.title_requests: list[dict] = []
        self.disconnects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> LLMServer:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve_until_closed(),), daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    async def _serve_until_closed(self) -> None:
        try:
            await self.serve()
        except asyncio.CancelledError:
            pass

    def shutdown(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnects += 1  # the client hung up: fine
        except asyncio.CancelledError:
            pass  # shutting down: end quietly (asyncio's stream callback logs cancelled handlers)
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request on a kept-alive connection; False when the client is gone."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed its kept-alive connection
        lines = head.decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if method == "GET":
            writer.write(_response(200, {"object": "list", "data": [{"id": "test-model", "object": "model"}]}))
            return True
        request = json.loads(body)
        if is_title_request(request.get("messages", [])):
            self.title_requests.append(request)
            await self._stream(writer, request, title_plan(request["messages"]), {})
            return True
        self.requests.append(request)
        if target.endswith("/embeddings"):
            writer.write(_response(200, _embeddings(request)))
            return True
        if headers.get("authorization") == "Bearer wrong-key":
            error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            writer.write(_response(401, error))
            return True
        tokens, directives = plan(request["messages"])
        if "status" in directives:
            # The request line quoted back, as proxies' errors often do (with any query string in it).
            error = {"error": {"message": f"scripted failure of {method} {target}", "type": "server_error"}}
            writer.write(_response(int(directives["status"]), error))
            return True
        await self._stream(writer, request, tokens, directives)
        return "fail_after" not in directives

    async def _stream(self, writer: asyncio.StreamWriter, request: dict, tokens: list[str], directives: dict) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = time.monotonic()
        first_delay = float(directives.get("first_delay", 0))
        delay = float(directives.get("delay", 0))
        fail_after = int(directives["fail_after"]) if "fail_after" in directives else None
        for i, token in enumerate(tokens):
            if fail_after is not None and i == fail_after:
                # No terminating chunk: the client sees a broken stream.
                await writer.drain()
                writer.transport.abort()
                raise ConnectionResetError
            wait = start + first_delay + (i + 1) * delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(_token_event(token))
            if writer.transport.is_closing():
                raise ConnectionResetError
        tail = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            prompt = sum(len(m["content"].split()) for m in request["messages"])
            tail += _event({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": len(tokens)}})
        writer.write(tail + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()


if __name__ == "__main__":
    server = LLMServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        await asyncio.get_running_loop().run_in_executor(None, server._ready.wait)
        print(server.base_url, flush=True)
        await task

    asyncio.run(main())
