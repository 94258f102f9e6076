"""The whole auto-interpretability pipeline (:mod:`gsae.autointerp.score`) against a local stub
of the chat-completions protocol, scored by an oracle that knows the truth from the collection
alone; unreadable answers recorded, not scored. These check the pipeline, not the quality of
explanations."""

import json
import random
import re

import pytest
import torch
from chat_stub import EXPLANATION, ChatStub, scripted

from gsae.autointerp import AutoInterpConfig, ChatClient
from gsae.autointerp.prompts import render
from gsae.autointerp.score import run_autointerp
from gsae.browse.collect import CollectConfig, collect
from gsae.hf.models import load_tokenizer
from gsae.hf.tokens import TokenText


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
