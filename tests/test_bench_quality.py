"""benchmarks/bench_quality.py: its SAELens column (SAELens' TopK SAE stepped by its own trainer,
scored with the same held-out FVU as gsae and sparsify), and its batches at equal tokens."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
D, M, K, N = 16, 64, 4, 256


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", ROOT / "benchmarks" / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batches(scale=1.0, steps=30, seed=0):
    """Sparse sums of a few fixed directions plus an offset, as SAE data: ``steps`` batches of
    ``N`` and a held-out one, all times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(3 * D, D, generator=g)  # [features, d]
    offset = torch.randn(D, generator=g)

    def one():
        codes = torch.rand(N, 3 * D, generator=g) * (torch.rand(N, 3 * D, generator=g) < 0.1)
        return scale * (codes @ atoms + offset)  # [N, d]

    return [one() for _ in range(steps)], one()


def trained(bench, scale=1.0, steps=30, **kwargs):
    pytest.importorskip("sae_lens")
    run = bench.SaelensRun(D, M, K, dead_threshold=10 * N, seed=0, **kwargs)
    train, held = batches(scale, steps)
    for x in train:
        run.step(x)
    return run, held


def test_saelens_trains_and_its_fvu_is_saelens_own(bench):
    """The FVU printed for SAELens is 1 - the explained variance its trainer logs, on the same
    batch; its trainer lowers it; a latent's tokens since it fired are the batch size times
    SAELens' own count of steps since."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import TrainStepInput

    fresh = bench.SaelensRun(D, M, K, dead_threshold=10 * N, seed=0)
    _, held = batches()
    before = fresh.evaluate(held)[0]
    run, held = trained(bench, steps=100)  # Adam at 3e-4 from b_dec = 0: slow to start
    fvu, l0 = run.evaluate(held)
    t = run.trainer
    with torch.no_grad():
        t.sae.eval()
        step = TrainStepInput(held, {}, None, n_training_steps=0, is_logging_step=False)
        logged = t.build_train_step_log_dict(t.sae.training_forward_pass(step), N)
    assert fvu == pytest.approx(1 - logged["metrics/explained_variance"], rel=1e-5)
    assert fvu < 0.95 * before
    assert l0 <= K
    assert torch.equal(run.since, N * t.n_forward_passes_since_fired.long())
    assert 0 < run.dead() < 1


def test_saelens_own_normalisation_is_undone_for_the_fvu(bench):
    """With ``expected_average_only_in`` SAELens trains on sqrt(d)-normalised inputs; the
    reconstruction is mapped back, so the same data at 7x scale gives the same FVU."""
    plain, held = trained(bench, normalize="expected_average_only_in")
    scaled, held7 = trained(bench, scale=7.0, normalize="expected_average_only_in")
    assert scaled.evaluate(held7)[0] == pytest.approx(plain.evaluate(held)[0], rel=1e-4)
    assert plain.trainer.activation_scaler.scaling_factor == pytest.approx(
        7 * scaled.trainer.activation_scaler.scaling_factor, rel=1e-5
    )


class Recorder:
    """A run that keeps what it is fed and scores 0."""

    def __init__(self):
        self.seen = []

    def step(self, x):
        self.seen.append(x)

    def evaluate(self, x):
        return 0.0, 0.0

    def dead(self):
        return 0.0


@pytest.mark.parametrize("batch", [512, 1024])
def test_smaller_batches_see_the_same_tokens_in_the_same_order(bench, batch):
    """Budgets of 2 and 5 batches of 2,048 (from a pool of 3 and a bit: the second budget wraps
    around it) give a smaller batch the same tokens, in order, continued across budgets."""
    pool = torch.arange(7000, dtype=torch.float32)[:, None]  # [tokens, 1]: each row its index
    big, small = Recorder(), Recorder()
    budgets = [2 * 2048 + 100, 5 * 2048]
    out = bench.train_budgets(big, pool, budgets, pool[:1])
    assert sorted(out) == sorted(bench.train_budgets(small, pool, budgets, pool[:1], batch))
    assert sorted(out) == [2 * 2048, 5 * 2048]
    assert len(small.seen) == 5 * 2048 // batch
    assert torch.equal(torch.cat(small.seen), torch.cat(big.seen))
    first = torch.cat(big.seen)[:, 0]
    assert torch.equal(first[: 3 * 2048], torch.arange(3 * 2048.0))  # in order, then wraps
    assert torch.equal(first[3 * 2048 :], torch.arange(2 * 2048.0))
