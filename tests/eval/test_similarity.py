"""The similarity of SAEs (:mod:`gsae.eval.similarity`): MMCS and MMCO on cases worked by hand
and against brute force, and the feature distribution."""

import pytest
import torch

from gsae.eval.metrics import ReconstructionStats
from gsae.eval.similarity import CoOccurrence, feature_distribution, mmcs
from gsae.sae import Sae, SaeConfig

# ---------------------------------------------------------------------------------------------
# MMCS (Eq. 18)
# ---------------------------------------------------------------------------------------------


def _sae(seed, d=32, m=128, k=8, layers=(0,)):
    return Sae(SaeConfig(d=d, num_latents=m, k=k, seed=seed), layers)


def test_mmcs_of_an_sae_with_itself_is_one_and_of_random_saes_well_below():
    a, b = _sae(0), _sae(1)
    assert mmcs(a.W_dec, a.W_dec).mean == pytest.approx(1.0, abs=1e-6)
    assert mmcs(a.W_dec, a.W_dec).index.tolist() == list(range(128))
    other = mmcs(a.W_dec, b.W_dec).mean
    assert other < 0.7, other


def test_mmcs_in_blocks_matches_the_dense_definition():
    g = torch.Generator().manual_seed(2)
    w_a = torch.randn(37, 9, generator=g) * 3  # rows not unit-norm: normalised inside
    w_b = torch.randn(23, 9, generator=g)
    w_a[5] = 0  # a zero row has cosine 0 with everything
    a = w_a / w_a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = w_b / w_b.norm(dim=1, keepdim=True)
    want = (a @ b.T).max(dim=1)
    for block in (1, 5, 37, 100, None):
        got = mmcs(w_a, w_b, block=block)
        assert torch.allclose(got.score, want.values, atol=1e-6)
        assert torch.equal(got.index, want.indices)
        assert got.mean == pytest.approx(float(want.values.double().mean()), abs=1e-6)
    assert mmcs(w_a, w_b).mean != pytest.approx(mmcs(w_b, w_a).mean)  # direction matters
    with pytest.raises(ValueError, match="same d"):
        mmcs(w_a, torch.randn(3, 8))


# ---------------------------------------------------------------------------------------------
# MMCO (Eqs. 12-17)
# ---------------------------------------------------------------------------------------------

# A fires {0}, {0,1}, {1}, {2}; B fires {0}, {1}, {1}, {} on four tokens (top-2, 3 latents)
IDX_A = torch.tensor([[0, 1], [0, 1], [1, 0], [2, 0]])
ON_A = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)
IDX_B = torch.tensor([[0, 1], [1, 2], [1, 0], [0, 1]])
ON_B = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("method", ["scatter", "dense"])
def test_mmco_on_four_tokens_and_three_latents_by_hand(method):
    co = CoOccurrence(3, 3, method=method)
    co.update(IDX_A, ON_A, IDX_B, ON_B)
    # AND (Eq. 14): a0 with b0 on token 1, a0 with b1 on token 2, a1 with b1 on tokens 2, 3
    assert co.and_counts.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert co.count_a.tolist() == [2, 2, 1] and co.count_b.tolist() == [1, 2, 0]
    # OR (Eq. 15) row a0: 2, 3, 2; a1: 3, 2, 2; a2: 2, 3, 1 -> Jaccard (Eq. 16)
    want = torch.tensor([[1 / 2, 1 / 3, 0], [0, 1, 0], [0, 0, 0]])
    assert torch.allclose(co.jaccard(), want, atol=1e-6)
    m = co.mmco()  # Eq. 17: (1/2 + 1 + 0) / 3
    assert m.mmco == pytest.approx(0.5, abs=1e-6) and m.mmco_fired == pytest.approx(0.5, abs=1e-6)
    back = CoOccurrence(3, 3, method=method)  # B against A: b2 never fired
    back.update(IDX_B, ON_B, IDX_A, ON_A)
    m = back.mmco()
    assert m.mmco == pytest.approx(0.5, abs=1e-6)
    assert m.mmco_fired == pytest.approx(0.75, abs=1e-6) and m.fired == pytest.approx(2 / 3)


def _fuzz_latents(g, n, m, k):
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])  # distinct per row
    on = torch.rand(n, k, generator=g) > 0.3
    return idx, on


def test_mmco_counts_match_brute_force_for_both_methods():
    g = torch.Generator().manual_seed(3)
    m_a, m_b, k_a, k_b, n = 13, 7, 4, 3, 150
    idx_a, on_a = _fuzz_latents(g, n, m_a, k_a)
    idx_b, on_b = _fuzz_latents(g, n, m_b, k_b)
    dense_a = torch.zeros(n, m_a).scatter_(1, idx_a, on_a.float())
    dense_b = torch.zeros(n, m_b).scatter_(1, idx_b, on_b.float())
    want = (dense_a.T @ dense_b).long()
    for method in ("scatter", "dense"):
        co = CoOccurrence(m_a, m_b, method=method)
        for a, b in ((0, 1), (1, 1), (1, 64), (64, 150)):  # uneven batches, one empty
            co.update(idx_a[a:b], on_a[a:b], idx_b[a:b], on_b[a:b])
        assert torch.equal(co.and_counts.long(), want), method
        assert torch.equal(co.count_a, dense_a.sum(0).long())
        assert co.tokens == n
        jac = want / (dense_a.sum(0)[:, None] + dense_b.sum(0)[None, :] - want + 1e-8)
        assert co.best_match(block=3).mean == pytest.approx(float(jac.max(1).values.mean()))
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        co.update(idx_a, on_a, idx_b[:5], on_b[:5])


def test_mmco_of_an_sae_with_itself_is_one_on_every_latent_that_fires():
    sae = _sae(0, m=256)
    x = torch.randn(400, 32)
    enc = sae.encode(x, layer=0)
    co = CoOccurrence(256, 256)
    on = enc.values > 0
    co.update(enc.indices, on, enc.indices, on)
    m = co.mmco()
    fired = float((co.count_a > 0).double().mean())
    assert m.mmco_fired == pytest.approx(1.0, abs=1e-6)
    assert m.mmco == pytest.approx(fired, abs=1e-6) and 0 < fired <= 1


# ---------------------------------------------------------------------------------------------
# Feature distribution (Appendix F)
# ---------------------------------------------------------------------------------------------


def test_feature_distribution_sums_to_the_firing_counts():
    layers = [2, 3, 5]
    sae = _sae(4, m=64, k=4, layers=layers)
    stats, total = [], torch.zeros(64, dtype=torch.long)
    for shift, layer in enumerate(layers):
        x = torch.randn(300, 32) + shift  # each layer a little different
        enc = sae.encode(x, layer=layer)
        s = ReconstructionStats(32, 64)
        s.update(x, sae.decode(enc.values, enc.indices, layer=layer), enc.indices, enc.values)
        stats.append(s.fired)
        # independent count: a dense 0/1 matrix of the latents that fired
        total += (
            torch.zeros(300, 64).scatter_(1, enc.indices, (enc.values > 0).float()).sum(0).long()
        )
    dist = feature_distribution(torch.stack(stats), layers)
    assert torch.equal(dist.counts.sum(0), total)
    fired = total > 0
    assert torch.allclose(
        dist.share[:, fired].sum(0), torch.ones(int(fired.sum()), dtype=torch.float64)
    )
    assert sorted(dist.order.tolist()) == torch.nonzero(fired).squeeze(1).tolist()
    means = dist.mean_layer[dist.order]
    assert (
        bool((means[1:] >= means[:-1]).all())
        and float(means.min()) >= 2
        and float(means.max()) <= 5
    )
    assert torch.isnan(dist.mean_layer[~fired]).all()
    with pytest.raises(ValueError, match=r"\[3 layers, m\]"):
        feature_distribution(torch.stack(stats)[:2], layers)


@pytest.mark.gpu
def test_mmco_methods_agree_on_a_gpu():
    g = torch.Generator().manual_seed(5)
    idx_a, on_a = _fuzz_latents(g, 3000, 257, 16)
    idx_b, on_b = _fuzz_latents(g, 3000, 129, 8)
    counts = {}
    for method in ("scatter", "dense"):
        co = CoOccurrence(257, 129, device="cuda", method=method)
        co.update(idx_a.cuda(), on_a.cuda(), idx_b.cuda(), on_b.cuda())
        counts[method] = co.and_counts.cpu()
    cpu = CoOccurrence(257, 129)
    cpu.update(idx_a, on_a, idx_b, on_b)
    assert torch.equal(counts["scatter"], cpu.and_counts)
    assert torch.equal(counts["dense"], cpu.and_counts)
    assert CoOccurrence(3, 3, device="cuda").method == "dense"
    w = torch.randn(300, 64, generator=g)
    assert mmcs(w.cuda(), w.cuda()).mean == pytest.approx(1.0, abs=1e-5)
