"""benchmarks/bench_quality.py's SAELens column: SAELens' TopK SAE stepped by its own trainer,
scored with the same held-out FVU as gsae and sparsify."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_lens")
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
    run = bench.SaelensRun(D, M, K, dead_threshold=10 * N, seed=0, **kwargs)
    train, held = batches(scale, steps)
    for x in train:
        run.step(x)
    return run, held


def test_saelens_trains_and_its_fvu_is_saelens_own(bench):
    """The FVU printed for SAELens is 1 - the explained variance its trainer logs, on the same
    batch; its trainer lowers it; a latent's tokens since it fired are the batch size times
    SAELens' own count of steps since."""
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
