"""The chat-completions client (:mod:`gsae.autointerp.client`) against a local stub server: the
model and key it sends, retries, concurrency, rate limit, its cache, and endpoint mistakes."""

import pytest
from chat_stub import ChatStub

from gsae.autointerp import AnswerCache, ChatClient, EndpointError

HELLO = [{"role": "user", "content": "hello"}]


def client(stub, **kw):
    kw.setdefault("backoff", 0.01)
    return ChatClient(stub.url, "stub-model", **kw)


def test_client_sends_the_model_and_key_and_reads_the_answer():
    with ChatStub(answer=lambda m: "hi " + m[-1]["content"]) as stub:
        assert client(stub, api_key="sk-test").complete(HELLO) == "hi hello"
        assert stub.models == ["stub-model"] and stub.keys == ["Bearer sk-test"]
        assert client(stub).complete([{"role": "user", "content": "x"}]) == "hi x"
        assert stub.keys[-1] is None  # no key, no header
    assert (
        ChatClient("http://h:1/v1/chat/completions/", "m").url == "http://h:1/v1/chat/completions"
    )


def test_client_retries_429_and_5xx_and_stops_on_other_errors():
    fails = {1: (429, {"Retry-After": "0"}), 2: (503, {}), 3: (500, {})}
    with ChatStub(fail=fails.get) as stub:
        c = client(stub)
        assert c.complete(HELLO).startswith("[") and c.sent == 4  # 3 failures, then an answer
    with ChatStub(fail=lambda n: (400, {})) as stub:
        with pytest.raises(EndpointError, match="HTTP 400"):
            client(stub).complete(HELLO)
        assert len(stub.times) == 1  # not retried
    with ChatStub(fail=lambda n: (502, {})) as stub:
        with pytest.raises(EndpointError, match="no answer after 3 attempts"):
            client(stub, retries=2).complete(HELLO)
        assert len(stub.times) == 3
    with ChatStub() as stub:
        url = stub.url
    with pytest.raises(EndpointError, match="no answer after 2 attempts"):  # nothing listens
        ChatClient(url, "m", retries=1, backoff=0.01).complete(HELLO)


def test_client_is_concurrent_and_rate_limited():
    requests = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    with ChatStub(answer=lambda m: m[-1]["content"], delay=0.2) as stub:
        answers = client(stub, concurrency=4).complete_many(requests)
        assert answers == [f"q{i}" for i in range(8)]  # in order, whatever the arrival order
        assert stub.max_in_flight >= 2
    with ChatStub(answer=lambda m: "ok") as stub:
        client(stub, concurrency=6, rate=20).complete_many(requests[:6])
        span = max(stub.times) - min(stub.times)
        assert span >= 5 / 20 * 0.8  # 6 starts at most 20 per second apart


def test_cache_answers_once_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    requests = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    with ChatStub(answer=lambda m: m[-1]["content"].upper()) as stub:
        first = client(stub, cache=AnswerCache(path)).complete_many(requests)
        again = client(stub, cache=AnswerCache(path)).complete_many(requests)
        assert first == again == [f"Q{i}" for i in range(5)] and len(stub.requests) == 5
        with open(path, "a") as f:
            f.write('{"key": "abc", "ans')  # a write cut off by a crash
        cache = AnswerCache(path)
        assert len(cache) == 5
        assert client(stub, cache=cache).complete_many(requests) == first
        assert len(stub.requests) == 5
        other = ChatClient(stub.url, "another-model", cache=cache)  # the model is in the key
        other.complete(requests[0])
        assert len(stub.requests) == 6


def test_endpoint_mistakes_get_one_clear_message():
    with pytest.raises(ValueError, match="not an http"):
        ChatClient("localhost:8000/v1", "m")
    with ChatStub(answer=lambda m: b"<html>a web page</html>") as stub:
        wrong = ChatClient(stub.url.replace("/v1", "/v2"), "m", retries=0)
        with pytest.raises(EndpointError, match="HTTP 404"):  # a wrong path is not retried
            wrong.complete(HELLO)
        with pytest.raises(EndpointError, match="did not answer JSON"):
            ChatClient(stub.url, "m").complete(HELLO)
