"""Auto-interpretability against a local stub of the chat-completions protocol (started on a free
port): the prompts and how answers are read, the client's retries, concurrency, rate limit and
cache, the whole pipeline scored by an oracle that knows the truth from the collection alone,
resuming an interrupted run without re-asking, and the gsae-eval report. These check the
pipeline, not the quality of explanations."""

import json
import random
import re

import pytest
import torch
from chat_stub import EXPLANATION, ChatStub, scripted

from gsae.autointerp import AnswerCache, AutoInterpConfig, ChatClient, EndpointError
from gsae.autointerp.prompts import parse_explanation, parse_labels, render
from gsae.autointerp.score import run_autointerp
from gsae.browse.collect import CollectConfig, collect
from gsae.cli.autointerp import main, parse_args, parser
from gsae.cli.eval import main as eval_main
from gsae.hf.models import load_tokenizer
from gsae.hf.tokens import TokenText

HELLO = [{"role": "user", "content": "hello"}]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_render_marks_runs_of_tokens():
    tokens = ["The", " quick", " brown", " fox", "\n", "jumps"]
    assert render(tokens) == "The quick brown fox jumps"
    assert render(tokens, {1, 2, 5}) == "The<< quick brown>> fox <<jumps>>"
    assert render(tokens, {0}) == "<<The>> quick brown fox jumps"


def test_answers_are_read_leniently_and_refused_when_malformed():
    assert parse_explanation("hmm\n[EXPLANATION]: a first\n[explanation]:  colours ") == "colours"
    assert parse_explanation("no tag here") is None and parse_explanation("[EXPLANATION]: ") is None
    assert parse_labels("Sure! [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("[0,1] then finally [1, 1, 0]", 3) == [1, 1, 0]
    assert parse_labels('["1", "0", true]', 3) == [1, 0, 1]
    assert parse_labels("[1, 0]", 3) is None and parse_labels("[1, 2, 0]", 3) is None
    assert parse_labels("one, zero, one", 3) is None


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The pipeline, scored by an oracle
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def words_corpus(tmp_path_factory):
    """Random words: windows of text are distinct, so an excerpt's text names its window."""
    rng = random.Random(0)
    words = (
        "fox dog hacker kludge layer group sparse dense token stream window latent model "
        "feature text code bug fix compile run test data weight bias scale"
    ).split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(150)]
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def words_collection(trained_runs, words_corpus, one_thread):
    return collect(
        trained_runs["grouped"],
        tokens=3072,
        batch_tokens=512,
        device="cpu",
        dataset=str(words_corpus),
        config=CollectConfig(window=16, top=8, random=6, pool=48),
    )


class Oracle:
    """Knows, from the collection's tensors alone, which windows each latent fires on: it
    recognises a latent by the top windows its explainer prompt shows, answers an explanation
    naming it, and scores each excerpt with the truth."""

    def __init__(self, col, tokenizer, explain: int, invert: bool = False):
        self.invert, self.latents = invert, {}
        text = TokenText(tokenizer)  # what the prompts show of each token

        for name, t in col.saes.items():
            layers, m = col.layers(name), col.meta["saes"][name]["m"]
            for pos, layer in enumerate(layers):
                pool = t["pool.tokens"][pos]
                fires_in_pool = (t["pool.indices"][pos] >= 0) & (t["pool.values"][pos] > 0)
                for latent in range(m):
                    row = pos * m + latent
                    on, marked = set(), set()
                    shown = []
                    for prefix in ("top", "random"):
                        for slot in range(t[f"{prefix}.keys"].shape[1]):
                            if not torch.isfinite(t[f"{prefix}.keys"][row, slot]):
                                break
                            ids = t[f"{prefix}.tokens"][row, slot]
                            acts = t[f"{prefix}.acts"][row, slot][ids >= 0]
                            words = text(ids[ids >= 0].tolist())
                            lit = {j for j, a in enumerate(acts.tolist()) if a > 0}
                            on.add(render(words))
                            marked.add(render(words, lit))
                            if prefix == "top" and slot < explain:
                                shown.append(render(words, lit))
                    off = set()
                    for p in range(pool.shape[0]):
                        hit = (t["pool.indices"][pos, p] == latent) & fires_in_pool[p]
                        ids = pool[p][pool[p] >= 0].tolist()
                        if ids and not bool(hit.any()):
                            off.add(render(text(ids)))
                    key = (name, layer, latent)
                    self.latents[key] = {"on": on, "marked": marked, "off": off}
                    self.latents[tuple(shown)] = key

    def __call__(self, messages) -> str:
        user = messages[-1]["content"]
        if "[EXPLANATION]" in messages[0]["content"]:
            shown = tuple(re.findall(r"^Excerpt \d+: (.*)$", user, flags=re.M))
            name, layer, latent = self.latents[shown]
            return f"[EXPLANATION]: {name}|{layer}|{latent}"
        name, layer, latent = re.search(r"Explanation: (.*)\|(\d+)\|(\d+)", user).groups()
        truth = self.latents[(name, int(layer), int(latent))]
        labels = []
        for line in re.findall(r"^Excerpt \d+: (.*)$", user, flags=re.M):
            if "marks were placed at random" in messages[0]["content"]:  # fuzzing
                labels.append(int(line in truth["marked"]))
            else:
                assert (line in truth["on"]) != (line in truth["off"]), line
                labels.append(int(line in truth["on"]))
        return json.dumps([1 - x for x in labels] if self.invert else labels)


@pytest.mark.parametrize("oracle, expected", [("truth", 1.0), ("inverted", 0.0), ("ones", 0.5)])
def test_pipeline_scores_what_the_scorer_answers(words_collection, trained_runs, oracle, expected):
    tokenizer = load_tokenizer(str(trained_runs["model"]))
    cfg = AutoInterpConfig(latents=5, explain=4, test=5, seed=1)
    answer = (
        scripted
        if oracle == "ones"
        else Oracle(words_collection, tokenizer, cfg.explain, invert=oracle == "inverted")
    )
    with ChatStub(answer=answer) as stub:
        c = ChatClient(stub.url, "stub", concurrency=4)
        result = run_autointerp(words_collection, tokenizer, c, c, cfg)
    assert len(result.records) >= 12  # 5 latents x 4 layers, less the skipped
    assert len(result.records) + len(result.skipped) == 5 * 4
    for r in result.records:
        for metric in ("detection", "fuzzing"):
            s = r[metric]
            assert s["accuracy"] == expected, (r["sae"], r["layer"], r["latent"], metric)
            assert s["labels"].count(1) == s["labels"].count(0) == s["n"] // 2
        if oracle == "ones":
            assert r["explanation"] == EXPLANATION
        else:
            assert r["explanation"] == f"{r['sae']}|{r['layer']}|{r['latent']}"
        assert set(r["examples"]["explain"]).isdisjoint(r["examples"]["active"])
    summary = result.summary
    assert summary["overall"]["detection"]["mean"] == pytest.approx(expected)
    assert set(summary["per_layer"]) == {"0", "1", "2", "3"}
    assert summary["per_group"]["layers_1-2"]["layers"] == [1, 2]


def test_unreadable_answers_are_recorded_not_scored(words_collection, trained_runs):
    tokenizer = load_tokenizer(str(trained_runs["model"]))

    def answer(messages):
        if "[EXPLANATION]" in messages[0]["content"]:
            return "I think it is about animals."  # no tag: the last line is taken
        return "I cannot tell."

    with ChatStub(answer=answer) as stub:
        c = ChatClient(stub.url, "stub")
        result = run_autointerp(words_collection, tokenizer, c, c, AutoInterpConfig(latents=2))
    assert result.records
    for r in result.records:
        assert r["explanation"] == "I think it is about animals."
        assert r["detection"]["accuracy"] is None and "cannot tell" in r["detection"]["unparsed"]
    assert (
        result.summary["overall"]["detection"]["mean"]
        != result.summary["overall"]["detection"]["mean"]
    )  # NaN: nothing scored


# --------------------------------------------------------------------------------------------
# The command: resume, report
# --------------------------------------------------------------------------------------------


def run_cli(stub, run, out, *extra):
    return main(
        [
            str(run),
            "--endpoint",
            stub.url,
            "--explainer-model",
            "stub",
            "--out",
            str(out),
            "--latents",
            "3",
            "--tokens",
            "1536",
            "--batch-tokens",
            "512",
            "--device",
            "cpu",
            "--window",
            "16",
            "--top",
            "6",
            "--random",
            "4",
            "--pool",
            "32",
            "--concurrency",
            "3",
            *extra,
        ]
    )


def test_an_interrupted_run_resumes_without_asking_again(
    trained_runs, tmp_path, one_thread, capsys
):
    run = trained_runs["grouped"]
    with ChatStub() as stub:  # the same run, never interrupted
        assert run_cli(stub, run, tmp_path / "whole") == 0
        total = len(stub.requests)
    assert total > 10
    with ChatStub(fail=lambda n: (400, {}) if n >= total // 2 else None) as stub:
        assert run_cli(stub, run, tmp_path / "cut") == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    cached = len(AnswerCache(tmp_path / "cut" / "cache.jsonl"))
    assert 0 < cached < total
    with ChatStub() as stub:
        assert run_cli(stub, run, tmp_path / "cut") == 0
        assert len(stub.requests) == total - cached  # nothing answered is asked again
    assert "reusing the collection" in capsys.readouterr().out
    whole = (tmp_path / "whole" / "autointerp.jsonl").read_text()
    assert (tmp_path / "cut" / "autointerp.jsonl").read_text() == whole
    with ChatStub() as stub:  # done: a third run asks nothing
        assert run_cli(stub, run, tmp_path / "cut") == 0
        assert stub.requests == []


def test_scores_go_into_the_gsae_eval_report(trained_runs, tmp_path, one_thread, monkeypatch):
    eval_dir = tmp_path / "eval"
    runs = [str(trained_runs["grouped"]), "--baseline", str(trained_runs["per-layer"])]
    assert (
        eval_main(
            [
                *runs,
                "--out",
                str(eval_dir),
                "--tokens",
                "256",
                "--batch-tokens",
                "256",
                "--no-downstream",
                "--mmco-pairs",
                "none",
            ]
        )
        == 0
    )
    monkeypatch.setenv("GSAE_TEST_KEY", "sk-secret")
    with ChatStub() as stub:
        for name in ("grouped", "per-layer"):
            assert (
                run_cli(
                    stub,
                    trained_runs[name],
                    tmp_path / name,
                    "--report",
                    str(eval_dir),
                    "--api-key-env",
                    "GSAE_TEST_KEY",
                )
                == 0
            )
        assert set(stub.keys) == {"Bearer sk-secret"}
    entries = [json.loads(x) for x in (eval_dir / "autointerp.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in entries) == ["grouped", "per-layer"]
    page = (eval_dir / "report.html").read_text()
    assert page.count("<h2>Auto-interpretability</h2>") == 1
    assert "fig4_autointerp.png" in page and (eval_dir / "fig4_autointerp.png").stat().st_size
    summary = json.loads((tmp_path / "grouped" / "summary.json").read_text())
    assert summary["overall"]["detection"]["mean"] == pytest.approx(0.5)  # the all-ones stub
    # gsae-eval run again keeps the auto-interp section
    assert (
        eval_main(
            [
                *runs,
                "--out",
                str(eval_dir),
                "--tokens",
                "256",
                "--batch-tokens",
                "256",
                "--no-downstream",
                "--mmco-pairs",
                "none",
            ]
        )
        == 0
    )
    assert "<h2>Auto-interpretability</h2>" in (eval_dir / "report.html").read_text()


def test_autointerp_refuses_bad_input(trained_runs, tmp_path, capsys):
    with ChatStub() as stub:
        cases = [
            (["--report", str(tmp_path)], "holds no gsae-eval report.html"),
            (["--latents", "0"], "--latents must be >= 1"),
            (["--collection", str(tmp_path)], "holds no collection"),
        ]
        for extra, message in cases:
            assert run_cli(stub, trained_runs["grouped"], tmp_path / "o", *extra) == 2
            assert message in capsys.readouterr().err
        assert stub.requests == []


def test_explainer_model_flag_and_its_deprecated_alias(capsys):
    """--explainer-model names the explainer LLM; --model, its old name (the transformer in
    every other command), still works, hidden from --help, with one line of warning."""
    base = ["RUN", "--endpoint", "http://localhost:8000/v1", "--out", "OUT"]
    assert parse_args([*base, "--explainer-model", "qwen"]).explainer_model == "qwen"
    assert capsys.readouterr().err == ""
    assert parse_args([*base, "--model", "qwen"]).explainer_model == "qwen"
    err = capsys.readouterr().err
    assert err == "gsae-autointerp: warning: --model is deprecated, use --explainer-model\n"
    for extra in ([], ["--model", "a", "--explainer-model", "b"]):
        with pytest.raises(SystemExit) as stop:
            parse_args([*base, *extra])
        assert stop.value.code == 2 and "--explainer-model" in capsys.readouterr().err
    usage = parser().format_help()
    assert "--explainer-model" in usage and not re.search(r"(?<![\w-])--model(?![\w-])", usage)


def test_endpoint_mistakes_get_one_clear_message():
    with pytest.raises(ValueError, match="not an http"):
        ChatClient("localhost:8000/v1", "m")
    with ChatStub(answer=lambda m: b"<html>a web page</html>") as stub:
        wrong = ChatClient(stub.url.replace("/v1", "/v2"), "m", retries=0)
        with pytest.raises(EndpointError, match="HTTP 404"):  # a wrong path is not retried
            wrong.complete(HELLO)
        with pytest.raises(EndpointError, match="did not answer JSON"):
            ChatClient(stub.url, "m").complete(HELLO)
