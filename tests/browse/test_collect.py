"""The browser's collection (:mod:`gsae.browse.collect`) of a real run against a direct count, in
fixed memory, saved and loaded, and against the run itself as its baseline."""

import json

import pytest
import torch

from gsae.browse.collect import HIST_BINS, CollectConfig, Collection, collect
from gsae.hf.hooks import ActivationReader
from gsae.hf.models import load_model
from gsae.hf.texts import iter_texts
from gsae.hf.tokens import TokenStream
from gsae.run import load_run


@pytest.fixture(scope="module")
def collection(trained_runs, one_thread):
    return collect(
        trained_runs["grouped"],
        tokens=1536,
        batch_tokens=512,
        device="cpu",
        config=CollectConfig(window=16, top=5, random=3, pool=16),
    )


def direct_counts(trained_runs, tokens=1536):
    """Per layer, every latent's firing count, activation sum and largest value over the same
    tokens, with the run's SAEs applied to one plain pass of activations."""
    run = load_run(trained_runs["grouped"])
    loaded = load_model(str(trained_runs["model"]), "fp32", "cpu")
    reader = ActivationReader(loaded, [0, 1, 2, 3])
    fired, sums, best = {}, {}, {}
    seen = 0
    with TokenStream(
        lambda: iter_texts(str(trained_runs["corpus"])), loaded.tokenizer, ctx_len=64, batch_size=8
    ) as stream:
        for batch in stream:
            hidden = reader(batch.input_ids, batch.attention_mask)
            for layer in range(4):
                sae = run.sae_for(layer).load()
                enc = sae.encode(hidden[layer], layer=layer)
                on = enc.values > 0
                counts = torch.bincount(enc.indices[on], minlength=sae.m)
                fired[layer] = fired.get(layer, 0) + counts
                act = torch.zeros(sae.m, dtype=torch.float64).index_add_(
                    0, enc.indices.flatten(), enc.values.flatten().double()
                )
                sums[layer] = sums.get(layer, 0) + act
                top = torch.zeros(sae.m).scatter_reduce(
                    0, enc.indices.flatten(), enc.values.flatten(), "amax"
                )
                best[layer] = torch.maximum(best.get(layer, top), top)
            seen += batch.num_tokens
            if seen >= tokens:
                break
    assert seen == tokens
    return fired, sums, best


def test_collection_counts_match_a_direct_count(collection, trained_runs):
    fired, sums, best = direct_counts(trained_runs)
    assert collection.meta["tokens"] == 1536
    for name, t in collection.saes.items():
        layers = collection.layers(name)
        m = collection.meta["saes"][name]["m"]
        assert t["tokens"].tolist() == [1536] * len(layers)
        for pos, layer in enumerate(layers):
            assert torch.equal(t["fired"][pos], fired[layer])
            torch.testing.assert_close(t["act_sum"][pos], sums[layer])
            torch.testing.assert_close(t["top.value"][pos * m : (pos + 1) * m, 0], best[layer])
        assert torch.equal(t["hist"].sum(1), t["fired"].sum(0))  # every firing in one bin
        assert t["hist"].shape == (m, HIST_BINS)
        share = collection.distribution(name).share
        fired_any = t["fired"].sum(0) > 0
        torch.testing.assert_close(
            share[:, fired_any].sum(0), torch.ones(int(fired_any.sum()), dtype=share.dtype)
        )
        spread = collection.spread(name)[fired_any]
        assert bool(((spread >= 1 - 1e-9) & (spread <= len(layers) + 1e-9)).all())


def test_collection_memory_does_not_grow_with_tokens(collection, trained_runs):
    more = collect(
        trained_runs["grouped"],
        tokens=4096,
        batch_tokens=512,
        device="cpu",
        config=CollectConfig(window=16, top=5, random=3, pool=16),
    )
    assert more.meta["tokens"] == 4096
    for name in collection.saes:
        small = {k: (tuple(v.shape), v.dtype) for k, v in collection.saes[name].items()}
        large = {k: (tuple(v.shape), v.dtype) for k, v in more.saes[name].items()}
        assert small == large


def test_collection_saves_and_loads(collection, tmp_path):
    collection.save(tmp_path / "col")
    back = Collection.load(tmp_path / "col")
    assert back.meta == json.loads(json.dumps(collection.meta))
    for name, tensors in collection.saes.items():
        assert set(back.saes[name]) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(back.saes[name][key], value), key


def test_a_run_against_itself_as_baseline_matches_every_latent(trained_runs, one_thread):
    """Each latent's best baseline match, by decoder cosine and by Jaccard of firing, is itself
    when the baseline is the run itself (cosine 1, Jaccard 1 for latents that fired)."""
    run = trained_runs["per-layer"]
    col = collect(
        run,
        tokens=1024,
        batch_tokens=512,
        device="cpu",
        baseline=run,
        config=CollectConfig(window=16, top=2, random=2, pool=4),
    )
    for name, t in col.saes.items():
        (layer,) = col.layers(name)
        m = col.meta["saes"][name]["m"]
        assert torch.equal(t[f"baseline.{layer}.cosine_index"], torch.arange(m))
        torch.testing.assert_close(t[f"baseline.{layer}.cosine"], torch.ones(m))
        fired = t["fired"][0] > 0
        assert torch.equal(t[f"baseline.{layer}.jaccard_index"][fired], torch.arange(m)[fired])
        torch.testing.assert_close(
            t[f"baseline.{layer}.jaccard"][fired], torch.ones(int(fired.sum()))
        )
        assert not bool((t["neighbours.index"] == torch.arange(m)[:, None]).any())  # not itself
