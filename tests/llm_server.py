"""A small OpenAI-compatible chat server for tests, scripted by the user's message.

The real ``openai`` client talks to it over HTTP, so the provider code runs for
real. Directives anywhere in the last user message:

    [tokens=N]      answer with N tokens "t0 t1 ..." (default: echo the message)
    [delay=S]       wait S seconds before each token
    [first_delay=S] wait S seconds before the first token
    [fail_after=N]  drop the connection after N tokens (mid-stream failure)
    [status=CODE]   answer with this HTTP status and an error body

Run it alone with ``python -m tests.llm_server PORT``.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIRECTIVE = re.compile(r"\[(\w+)(?:=([\w.]+))?\]")


def plan(messages: list[dict]) -> tuple[list[str], dict[str, str]]:
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    directives = {k: v for k, v in DIRECTIVE.findall(last)}
    if "tokens" in directives:
        tokens = [f"t{i} " for i in range(int(directives["tokens"]))]
    else:
        text = "You said: " + DIRECTIVE.sub("", last).strip()
        tokens = re.findall(r"\S+\s*", text)
    return tokens, directives


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LLMServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "test-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.requests.append(body)
        if self.headers.get("Authorization") == "Bearer wrong-key":
            self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            return
        tokens, directives = plan(body["messages"])
        if "status" in directives:
            self._json(int(directives["status"]), {"error": {"message": "scripted failure", "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        delay = float(directives.get("delay", 0))
        fail_after = int(directives["fail_after"]) if "fail_after" in directives else None
        time.sleep(float(directives.get("first_delay", 0)))
        try:
            for i, token in enumerate(tokens):
                if fail_after is not None and i == fail_after:
                    # No terminating chunk: the client sees a broken stream.
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if delay:
                    time.sleep(delay)
                self._event({"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
            self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                prompt = sum(len(m["content"].split()) for m in body["messages"])
                self._event({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": len(tokens)}})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects += 1  # the client hung up: fine

    def _event(self, payload: dict) -> None:
        payload = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "test-model", **payload}
        self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LLMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.requests: list[dict] = []
        self.disconnects = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> LLMServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


if __name__ == "__main__":
    server = LLMServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.base_url, flush=True)
    server.serve_forever()
