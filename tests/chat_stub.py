"""A local stand-in for an OpenAI-compatible chat-completions server: scripted answers, on a
free port, in a thread. It checks the auto-interp pipeline, not the quality of explanations."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXPLANATION = "the word fox and its numbered variants"


def excerpts(messages: list[dict]) -> int:
    return len(re.findall(r"^Excerpt \d+:", messages[-1]["content"], flags=re.M))


def scripted(messages: list[dict]) -> str:
    """Explainer: a fixed explanation; scorers: 1 for every excerpt."""
    if "[EXPLANATION]" in messages[0]["content"]:
        return f"Thinking about the marked tokens.\n[EXPLANATION]: {EXPLANATION}"
    return json.dumps([1] * excerpts(messages))


class ChatStub:
    """``answer(messages) -> str`` for each request; ``fail(n) -> (status, headers) | None``
    makes the n-th request (from 1) fail; ``delay`` seconds per answer. Records every
    request's messages (``requests``) and arrival time (``times``)."""

    def __init__(self, answer=scripted, fail=None, delay: float = 0.0):
        self.answer, self.fail, self.delay = answer, fail, delay
        self.requests: list[list[dict]] = []
        self.times: list[float] = []
        self.models: list[str] = []
        self.keys: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.times.append(time.monotonic())
                    n = len(stub.times)
                    stub.keys.append(self.headers.get("Authorization"))
                failure = stub.fail(n) if stub.fail else None
                if self.path != "/v1/chat/completions":
                    failure = (404, {})
                if failure is not None:
                    status, headers = failure
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    return
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                if stub.delay:
                    time.sleep(stub.delay)
                with stub._lock:
                    stub.in_flight -= 1
                    stub.requests.append(body["messages"])
                    stub.models.append(body["model"])
                content = stub.answer(body["messages"])
                if isinstance(content, bytes):  # not the protocol: sent as it is
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                    return
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "finish_reason": "stop", "message": message}
                payload = {
                    "id": "stub",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [choice],
                }
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free one
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ChatStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
