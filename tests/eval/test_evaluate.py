"""The splice and record hooks on real (tiny) models of each family, and gsae.eval.evaluate with
SAEs whose answers are known: an exact identity and an all-zero reconstruction."""

import math

import pytest
import torch
from tiny import build_family

from gsae.eval import RunSaes, evaluate
from gsae.hf.hooks import lm_logits, record, splice
from gsae.hf.models import load_model
from gsae.hf.texts import iter_texts
from gsae.hf.tokens import TokenStream
from gsae.sae import Sae, SaeConfig


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    yield


def _causal(kind, tiny_model_dir, tmp_path):
    if kind == "gpt_neox":
        return load_model(str(tiny_model_dir), "fp32", lm_head=True)
    return load_model(
        str(build_family(kind, tmp_path / kind, tiny_model_dir)), "fp32", lm_head=True
    )


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt2", "llama"])
def test_splice_changes_only_its_layer(kind, tiny_model_dir, tmp_path):
    loaded = _causal(kind, tiny_model_dir, tmp_path)
    assert loaded.lm_head
    n = loaded.num_layers
    ids = torch.randint(0, len(loaded.tokenizer), (2, 12))
    with record(loaded, range(n)) as before:
        clean = lm_logits(loaded, ids)
    with splice(loaded, {1: lambda h: h * 0.5}), record(loaded, range(n)) as during:
        spliced = lm_logits(loaded, ids)
    assert torch.equal(during[0], before[0])  # the layer before it sees the same activations
    assert torch.equal(during[1], before[1] * 0.5)  # the layer itself: the replacement
    assert not torch.allclose(during[n - 1], before[n - 1])  # the rest of the forward runs on it
    assert not torch.allclose(spliced, clean)
    assert torch.equal(lm_logits(loaded, ids), clean)  # removed on exit: clean logits again
    with pytest.raises(RuntimeError, match="boom"), splice(loaded, {1: torch.zeros_like}):
        raise RuntimeError("boom")
    assert torch.equal(lm_logits(loaded, ids), clean)  # removed on an error too
    with pytest.raises(ValueError, match="out of range"), splice(loaded, {n: torch.zeros_like}):
        pass
    with pytest.raises(ValueError, match="keep the shape"), splice(loaded, {0: lambda h: h[:1]}):
        lm_logits(loaded, ids)


def identity_sae(d: int, layers) -> Sae:
    """A real TopK SAE that reconstructs exactly: latents relu(x) and relu(-x), all kept."""
    sae = Sae(SaeConfig(d=d, num_latents=2 * d, k=2 * d), layers)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def zero_sae(d: int, layers) -> Sae:
    """An SAE whose reconstruction is 0 everywhere: splicing it is a zero ablation."""
    sae = Sae(SaeConfig(d=d, num_latents=4 * d, k=4), layers)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def token_batches(loaded, corpus, ctx_len=32, batch_size=4):
    def batches():
        with TokenStream(
            lambda: iter_texts(str(corpus)),
            loaded.tokenizer,
            ctx_len=ctx_len,
            batch_size=batch_size,
        ) as stream:
            yield from stream

    return batches


def test_identity_costs_nothing_and_zero_is_the_zero_ablation(tiny_model_dir, tiny_corpus):
    loaded = load_model(str(tiny_model_dir), "fp32", lm_head=True)
    runs = [
        RunSaes("identity", {"g01": identity_sae(32, [0, 1]), "g23": identity_sae(32, [2, 3])}),
        RunSaes("zero", {f"l{i}": zero_sae(32, [i]) for i in range(4)}),
    ]
    result = evaluate(loaded, runs, token_batches(loaded, tiny_corpus), tokens=300)
    assert result.tokens == 300  # the budget is cut inside a batch
    assert result.positions > 0 and result.notes == []
    rows = {(r.run, r.layer): r for r in result.layers}
    for layer in range(4):
        same, zero = rows[("identity", layer)], rows[("zero", layer)]
        assert same.group == ("g01" if layer < 2 else "g23")
        assert same.reconstruction.fvu == 0.0 and same.reconstruction.cosine == pytest.approx(1)
        d = same.downstream
        assert d.delta_ce_pct == 0.0 and d.kl == 0.0  # spliced = original: not even rounding
        assert d.ce_recovered == 1.0 and d.kl_score == 1.0
        assert d.ce_zero != d.ce_clean  # (a random model: zero ablation may even help)
        z = zero.downstream
        assert z.ce_sae == z.ce_zero and z.ce_recovered == 0.0 and z.kl_score == pytest.approx(0)
        assert z.delta_ce_pct != 0 and zero.reconstruction.cosine == 0.0
    # no baseline: no similarity; the group SAE's distribution covers both its layers
    assert result.mmco == {} and result.mmcs == {}
    dist = result.features["identity"]["g01"]
    assert dist.layers == [0, 1] and int(dist.counts.sum()) > 0


def test_mmco_in_several_passes_equals_one_pass(tiny_model_dir, tiny_corpus):
    loaded = load_model(str(tiny_model_dir), "fp32", lm_head=True)
    base = RunSaes("base", {f"l{i}": _trained_like(i, [i]) for i in range(4)})
    group = RunSaes("group", {"g012": _trained_like(9, [0, 1, 2]), "l3": _trained_like(3, [3])})
    batches = token_batches(loaded, tiny_corpus)
    one = evaluate(loaded, [base, group], batches, 200, baseline="base", downstream=False)
    many = evaluate(
        loaded, [base, group], batches, 200, baseline="base", downstream=False, mmco_memory=1
    )
    assert one.passes == 1 and many.passes == 16  # one pair per pass
    assert set(one.mmco["group"]) == {(a, b) for a in range(4) for b in range(4)}
    assert one.mmco == many.mmco
    # layer 3: the same SAE in both runs, so every latent that fires matches itself exactly
    assert one.mmco["group"][(3, 3)].mmco_fired == pytest.approx(1.0, abs=1e-6)
    assert one.mmcs["group"][(3, "l3")] == pytest.approx(1.0, abs=1e-6)
    # MMCS at initialisation: the same seed and shape start from the same decoder
    assert one.mmcs_init["group"][(3, "l3")] == pytest.approx(1.0, abs=1e-6)
    assert one.mmcs_init["group"][(0, "g012")] < 0.9  # seeds 0 and 9
    row3 = next(r for r in one.layers if r.run == "group" and r.layer == 3)
    assert row3.mmcs_init == one.mmcs_init["group"][(3, "l3")]
    assert "downstream metrics not asked for" in one.notes[0]
    assert all(r.downstream is None for r in one.layers)
    diag = evaluate(
        loaded, [base, group], batches, 200, baseline="base", downstream=False, pairs="diagonal"
    )
    assert set(diag.mmco["group"]) == {(i, i) for i in range(4)}
    assert diag.mmco["group"][(1, 1)] == one.mmco["group"][(1, 1)]
    row = next(r for r in diag.layers if r.run == "group" and r.layer == 1)
    assert row.mmco == diag.mmco["group"][(1, 1)] and row.mmcs == diag.mmcs["group"][(1, "g012")]


def _trained_like(seed: int, layers) -> Sae:
    """A random SAE with a pre-bias near the tiny model's activations (so latents do fire)."""
    sae = Sae(SaeConfig(d=32, num_latents=64, k=4, seed=seed), layers)
    torch.nn.init.normal_(sae.b_enc, std=0.1, generator=torch.Generator().manual_seed(seed))
    return sae


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_other_causal_families(kind, tiny_model_dir, tiny_corpus, tmp_path):
    loaded = _causal(kind, tiny_model_dir, tmp_path)
    runs = [RunSaes("identity", {"all": identity_sae(32, [0, 1, 2])})]
    result = evaluate(loaded, runs, token_batches(loaded, tiny_corpus, ctx_len=16), tokens=100)
    for row in result.layers:
        assert row.downstream.delta_ce_pct == 0.0 and row.downstream.ce_recovered == 1.0


@pytest.mark.parametrize("head", [False, True])
def test_an_encoder_skips_downstream_with_a_note(head, tiny_model_dir, tiny_corpus, tmp_path):
    import transformers as tf

    path = build_family("bert", tmp_path / "bert", tiny_model_dir)
    if head:  # a masked-LM head does not predict the next token: still no downstream metrics
        config = tf.BertConfig.from_pretrained(path)
        tf.BertForMaskedLM(config).save_pretrained(path)
    loaded = load_model(str(path), "fp32", lm_head=True)
    assert not loaded.lm_head and "no causal-LM head" in loaded.no_head_reason
    runs = [RunSaes("identity", {"all": identity_sae(32, [0, 1, 2])})]
    result = evaluate(loaded, runs, token_batches(loaded, tiny_corpus, ctx_len=16), tokens=100)
    assert len(result.notes) == 1 and "downstream metrics (ΔCE" in result.notes[0]
    assert all(r.downstream is None for r in result.layers)
    assert all(r.reconstruction.fvu == 0.0 for r in result.layers)
    assert result.positions == 0
    assert not math.isnan(result.layers[0].reconstruction.l0)


def test_bad_arguments(tiny_model_dir, tiny_corpus):
    loaded = load_model(str(tiny_model_dir), "fp32", lm_head=True)
    runs = [RunSaes("a", {"l0": identity_sae(32, [0])})]
    batches = token_batches(loaded, tiny_corpus)
    with pytest.raises(ValueError, match="a budget of 0 tokens"):
        evaluate(loaded, runs, batches, 0)
    with pytest.raises(ValueError, match="not one of the runs"):
        evaluate(loaded, runs, batches, 10, baseline="b")
    with pytest.raises(ValueError, match="mmco pairs must be one of"):
        evaluate(loaded, runs, batches, 10, baseline="a", pairs="some")
    with pytest.raises(ValueError, match="holds no tokens"):
        evaluate(loaded, runs, lambda: [], 10)


def test_mmco_pairs_per_mode():
    from gsae.eval.evaluate import mmco_pairs

    base = RunSaes("base", {f"l{i}": _trained_like(i, [i]) for i in range(3)})
    group = RunSaes("group", {"g01": _trained_like(5, [0, 1]), "l2": _trained_like(6, [2])})
    small = RunSaes("small", {f"l{i}": _trained_like(i, [i]) for i in range(3)})
    runs = [base, group, small]
    everything = mmco_pairs(runs, base, "all")
    assert [p for p in everything if p[0] == "group"] == [
        ("group", a, b) for a in range(3) for b in range(3)
    ]
    # another per-layer run (smaller SAEs): its SAE at a layer only ever saw that layer
    assert [p for p in everything if p[0] == "small"] == [("small", i, i) for i in range(3)]
    same = mmco_pairs(runs, base, "same-group")
    assert [(a, b) for r, a, b in same if r == "group"] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]
    assert mmco_pairs(runs, base, "none") == [] and mmco_pairs(runs, None, "all") == []


@pytest.mark.gpu
def test_identity_costs_nothing_on_a_gpu_in_bf16(tiny_model_dir, tiny_corpus):
    loaded = load_model(str(tiny_model_dir), "bf16", device="cuda", lm_head=True)
    sae = identity_sae(32, [0, 1, 2, 3]).cuda()
    runs = [RunSaes("identity", {"all": sae})]
    result = evaluate(loaded, runs, token_batches(loaded, tiny_corpus), tokens=300)
    for row in result.layers:  # bf16 -> fp32 SAE -> bf16 is exact for the identity
        assert row.downstream.delta_ce_pct == 0.0 and row.downstream.kl == 0.0
        assert row.reconstruction.fvu == 0.0
