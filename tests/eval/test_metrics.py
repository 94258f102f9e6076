"""The evaluation metrics (:mod:`gsae.eval.metrics`) on cases worked by hand, and against brute
force."""

import math

import pytest
import torch

from gsae.eval.metrics import (
    LossSums,
    ReconstructionStats,
    ce_recovered,
    delta_ce,
    downstream,
    fvu,
    kl_score,
    next_token_losses,
    pooled,
    reference_logprobs,
    scored_positions,
)

# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
X_HAT = torch.tensor([[1.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
# top-2 latents of m = 5 per token; a value of 0 means the latent did not fire
INDICES = torch.tensor([[0, 1], [1, 2], [2, 3]])
VALUES = torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.0, 0.0]])


def test_reconstruction_on_three_tokens_by_hand():
    # errors [0,1], [0,1], [1,0]: 3; mean x = [3, 2], squared deviations 4+0, 0+4, 4+4: 16
    stats = ReconstructionStats(d=2, m=5)
    stats.update(X, X_HAT, INDICES, VALUES)
    r = stats.result()
    assert r.tokens == 3
    assert r.fvu == pytest.approx(3 / 16, abs=1e-12)
    assert r.explained_variance == pytest.approx(13 / 16, abs=1e-12)
    cosines = [3 / math.sqrt(5 * 2), 21 / (5 * math.sqrt(18)), 20 / (5 * 4)]
    assert r.cosine == pytest.approx(sum(cosines) / 3, abs=1e-12)
    assert r.l0 == pytest.approx(3 / 3)  # 1 + 2 + 0 latents with value > 0
    assert r.never_fired == pytest.approx(2 / 5)  # latents 3 and 4
    assert stats.fired.tolist() == [1, 1, 1, 0, 0]
    assert fvu(X, X_HAT) == pytest.approx(3 / 16, abs=1e-12)


def test_fvu_is_over_the_whole_set_not_a_mean_of_batches():
    whole = ReconstructionStats(2, 5)
    whole.update(X, X_HAT, INDICES, VALUES)
    parts = ReconstructionStats(2, 5)
    parts.update(X[:1], X_HAT[:1], INDICES[:1], VALUES[:1])
    parts.update(X[1:], X_HAT[1:], INDICES[1:], VALUES[1:])
    parts.update(X[:0], X_HAT[:0], INDICES[:0], VALUES[:0])  # an empty batch changes nothing
    for a, b in zip(whole.result(), parts.result(), strict=True):
        assert a == pytest.approx(b, rel=1e-12)
    # the mean of per-batch FVUs differs (the first batch alone has no variance at all)
    assert parts.result().fvu == pytest.approx(3 / 16)


def test_reconstruction_streamed_matches_the_kernels_fvu_on_large_offset_data():
    """Seeded fuzz: random batch sizes, a mean far from 0 (cancellation), the reference FVU."""
    from gsae_kernels.reference import fvu_auxk_loss

    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 7, generator=g) * 0.1 + 1000.0
    x_hat = x + torch.randn(500, 7, generator=g) * 0.05
    idx = torch.randint(0, 11, (500, 3), generator=g)
    val = torch.rand(500, 3, generator=g)
    stats = ReconstructionStats(7, 11)
    cuts = sorted(torch.randint(0, 500, (6,), generator=g).tolist())
    for a, b in zip([0, *cuts], [*cuts, 500], strict=True):
        stats.update(x[a:b], x_hat[a:b], idx[a:b], val[a:b])
    want = float(
        ((x.double() - x_hat.double()) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
    )
    assert stats.result().fvu == pytest.approx(want, rel=1e-9)
    # the kernels' reference (what training minimises) computes in fp32
    assert stats.result().fvu == pytest.approx(float(fvu_auxk_loss(x, x_hat)[1]), rel=1e-5)
    assert stats.result().tokens == 500


def test_reconstruction_of_no_tokens_is_nan_not_an_error():
    r = ReconstructionStats(2, 3).result()
    assert r.tokens == 0 and math.isnan(r.fvu)


# ---------------------------------------------------------------------------------------------
# Downstream
# ---------------------------------------------------------------------------------------------


def test_next_token_cross_entropy_and_kl_by_hand():
    ids = torch.tensor([[0, 1, 0]])
    # position 0: p = [1/2, 1/2], next token 1; position 1: p = [3/4, 1/4], next token 0
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    valid = scored_positions(torch.ones(1, 3))
    ce, kl = next_token_losses(logits, ids, valid, reference_logprobs(logits, valid))
    assert ce.tolist() == pytest.approx([math.log(2), math.log(4 / 3)], abs=1e-6)
    assert kl.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    # KL(p || q), p = [1/2, 1/2], q = [3/4, 1/4]: (ln(2/3) + ln 2) / 2
    other = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]]])
    _, kl = next_token_losses(other, ids, valid, reference_logprobs(logits, valid))
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # the last real token has nothing to predict; a padded position is not scored
    valid = scored_positions(torch.tensor([[1, 1, 0]]))
    ce, _ = next_token_losses(logits, ids, valid)
    assert ce.tolist() == pytest.approx([math.log(2)], abs=1e-6)


def test_normalised_scores_by_hand():
    assert delta_ce(3.3, 3.0) == pytest.approx(0.1)  # Eq. 7
    assert ce_recovered(3.3, 3.0, 6.0) == pytest.approx(0.9)
    assert ce_recovered(3.0, 3.0, 6.0) == 1.0 and ce_recovered(6.0, 3.0, 6.0) == 0.0
    assert kl_score(0.2, 2.0) == pytest.approx(0.9)
    assert math.isnan(ce_recovered(1.0, 2.0, 2.0)) and math.isnan(kl_score(1.0, 0.0))
    sums = [LossSums() for _ in range(3)]
    for s, ce, kl in zip(sums, (3.3, 3.0, 6.0), (0.2, 0.0, 2.0), strict=True):
        s.update(torch.full((4,), ce), torch.full((4,), kl))
    d = downstream(*sums)
    assert d.positions == 4 and d.delta_ce_pct == pytest.approx(10.0)
    assert d.ce_recovered == pytest.approx(0.9) and d.kl_score == pytest.approx(0.9)


def test_pooled_is_the_group_weighted_mean_and_std_over_layers():
    p = pooled([[1.0, 2.0, 3.0], [10.0]])
    assert p.mean == pytest.approx(4.0)  # (3 * 2 + 1 * 10) / 4
    assert p.std == pytest.approx(math.sqrt(12.5))  # population std of 1, 2, 3, 10
    assert p.groups == [(3, 2.0, pytest.approx(math.sqrt(2 / 3))), (1, 10.0, 0.0)]
    assert pooled([[float("nan"), 2.0]]).mean == 2.0
    assert math.isnan(pooled([[None]]).mean)
