"""A small client for any OpenAI-compatible chat-completions endpoint (vLLM, Ollama,
llama.cpp's server, hosted APIs), with what a long auto-interp run needs:

- concurrent requests (``concurrency`` threads) under a shared rate limit (at most
  ``rate`` request starts per second);
- retries with exponential backoff on connection errors, timeouts, HTTP 429 and 5xx (a
  ``Retry-After`` header is honoured); other HTTP errors (a wrong model name, a bad key) stop
  the run at once with the server's message;
- an on-disk answer cache (:class:`AnswerCache`, JSONL appended and flushed per answer), so a
  run that is interrupted resumes without asking again what was already answered.

Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint refused a request for a reason retrying cannot fix, or kept failing."""


class AnswerCache:
    """Answers by request key, kept in a JSONL file: one ``{"key", "answer"}`` line per answer,
    appended, flushed and fsynced as it arrives. A line cut off by a crash is ignored."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self._answers[record["key"]] = record["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # the last line of an interrupted write

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            self._answers[key] = answer
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


class RateLimiter:
    """At most ``rate`` acquisitions per second, spaced evenly, across threads (None: no
    limit)."""

    def __init__(self, rate: float | None):
        if rate is not None and rate <= 0:
            raise ValueError(f"the rate limit must be > 0 requests/s, got {rate}")
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def chat_url(endpoint: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000/v1/chat/completions`` (a URL that already
    ends with ``/chat/completions`` is kept)."""
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(
            f"--endpoint {endpoint!r} is not an http(s) URL (e.g. http://localhost:8000/v1)"
        )
    url = endpoint.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class ChatClient:
    """Chat completions from ``model`` at ``endpoint`` (a base URL such as
    ``http://localhost:8000/v1``), cached in ``cache``."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        rate: float | None = None,
        retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 120.0,
        max_tokens: int = 400,
        cache: AnswerCache | None = None,
    ):
        if concurrency < 1 or retries < 0:
            raise ValueError(
                f"need concurrency >= 1 and retries >= 0, got {concurrency}, {retries}"
            )
        self.url, self.model, self.api_key = chat_url(endpoint), model, api_key
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.timeout, self.max_tokens = timeout, max_tokens
        self.limiter = RateLimiter(rate)
        self.cache = cache if cache is not None else AnswerCache(None)  # (an empty one is falsy)
        self.sent = 0  # requests that reached the wire, retries included
        self.unreadable = 0  # answers the caller could not read: not cached, asked again later
        self._count = threading.Lock()

    def key(self, messages: list[dict]) -> str:
        """The cache key of a request: the model and everything that shapes its answer."""
        blob = json.dumps(self._request(messages), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _request(self, messages: list[dict]) -> dict:
        """The request body: what is sent is what the cache key hashes."""
        return {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }

    def complete(self, messages: list[dict], readable: Callable[[str], bool] | None = None) -> str:
        """One answer (from the cache when it holds one). An answer that ``readable`` refuses
        is returned but not cached (a later run asks again) and counted in ``unreadable``."""
        key = self.key(messages)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        answer = self._post(messages)
        if readable is None or readable(answer):
            self.cache.put(key, answer)
        else:
            with self._count:
                self.unreadable += 1
        return answer

    def complete_many(
        self,
        requests: Sequence[list[dict]],
        done: Callable[[int], None] | None = None,
        readable: Callable[[int, str], bool] | None = None,
    ) -> list[str]:
        """Answers to every request, asked concurrently (cached ones are not asked). The first
        :class:`EndpointError` stops the run; answers received before it stay cached.
        ``readable(i, answer)``: whether the answer to request ``i`` can be read (see
        :meth:`complete`)."""
        if not requests:
            return []

        def check(i: int):
            return None if readable is None else (lambda answer: readable(i, answer))

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="gsae-chat") as pool:
            futures = [
                pool.submit(self.complete, messages, check(i))
                for i, messages in enumerate(requests)
            ]
            answers = []
            try:
                for future in futures:
                    answers.append(future.result())
                    if done is not None:
                        done(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return answers

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps(self._request(messages)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, problem))
            self.limiter.acquire()
            with self._count:
                self.sent += 1
            request = urllib.request.Request(self.url, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read().decode(errors="replace")
                try:
                    payload = json.loads(raw)
                except json.JSONDecodeError:
                    raise EndpointError(f"{self.url} did not answer JSON: {raw[:200]!r}") from None
                return _answer_text(payload, self.url)
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:300]
                if err.code not in RETRY_STATUS:
                    raise EndpointError(f"{self.url} answered HTTP {err.code}: {detail}") from None
                problem = f"HTTP {err.code}" + _retry_after(err)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise EndpointError(
            f"{self.url}: no answer after {self.retries + 1} attempts (last: {problem})"
        )

    def _delay(self, attempt: int, problem: str) -> float:
        if "retry-after=" in problem:
            try:
                return float(problem.split("retry-after=")[1])
            except ValueError:
                pass
        return self.backoff * 2 ** (attempt - 1)


def clients(
    endpoint: str,
    model: str,
    *,
    scorer_endpoint: str | None = None,
    scorer_model: str | None = None,
    **options,
) -> tuple[ChatClient, ChatClient]:
    """The explainer's and the scorer's clients; the scorer is the explainer's model at its
    endpoint unless named. ``options``: :class:`ChatClient`'s (api_key, rate, cache, ...)."""
    explainer = ChatClient(endpoint, model, **options)
    scorer = ChatClient(scorer_endpoint or endpoint, scorer_model or model, **options)
    return explainer, scorer


def _retry_after(err: urllib.error.HTTPError) -> str:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return f" retry-after={float(value)}" if value is not None else ""
    except ValueError:
        return ""


def _answer_text(payload: dict, url: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(
            f"{url} did not answer in the chat-completions format: {json.dumps(payload)[:300]}"
        ) from None
    return content or ""
