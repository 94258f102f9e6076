"""The SAE's training step (:class:`gsae.train.step.SaeTrainer`): it learns known directions,
keeps decoder rows at unit norm, counts dead latents, resumes exactly and skips non-finite steps;
and the decoder-gradient projection of ``SaeTrainer._update``.

Renormalising the rows after the step keeps them at unit norm whether or not the gradient's
component along each row is removed first, so a test of norms alone stays green without the
projection. These tests look at the gradient the optimiser actually steps with, and at the
step's result, which Adam's per-element scaling makes depend on the projection.
"""

import pytest
import torch
from tiny import small_config

from gsae.init import activation_scale
from gsae.sae import Sae, SaeConfig
from gsae.synthetic import SparseFeatures as SparseData
from gsae.train.step import SaeTrainer


def make_trainer(seed=0):
    # the paper's init: the first step then starts from the weights the clone below copies (a
    # data-dependent init would rescale W_enc and move b_dec inside the step); Adam, whose first
    # step test_step_result_depends_on_the_projection writes out
    cfg = SaeConfig(
        d=16,
        num_latents=64,
        k=4,
        seed=seed,
        init_encoder="paper",
        init_b_dec="zeros",
        optimizer="adam",
    )
    sae = Sae(cfg)
    return SaeTrainer(sae)


def raw_decoder_grad(trainer, x):
    """The W_dec gradient of the step's loss, before any projection."""
    sae = trainer.sae
    clone = Sae(sae.cfg)
    clone.load_state_dict(sae.state_dict())
    clone.zero_grad()
    clone(x).loss.fvu.backward()  # step 1: nothing is dead yet, the loss is the FVU
    return clone.W_dec.grad.detach().clone()


def stepped_with(trainer, x):
    """Run one step, recording W_dec and its gradient as the optimiser sees them."""
    seen = {}
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen["w"] = trainer.sae.W_dec.detach().clone()
        seen["grad"] = trainer.sae.W_dec.grad.detach().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.step(x)
    return seen


def test_optimizer_steps_with_the_tangent_part_of_the_decoder_gradient():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    trainer = make_trainer()
    raw = raw_decoder_grad(trainer, x)
    seen = stepped_with(trainer, x)
    w, grad = seen["w"], seen["grad"]
    rows = raw.norm(dim=1) > 0  # latents that fired
    assert rows.sum() >= 8
    # the raw gradient has a real component along its row: the projection has work to do
    along = (raw * w).sum(1)
    assert (along[rows].abs() > 1e-3 * raw[rows].norm(dim=1)).float().mean() > 0.5
    # what the optimiser got: the raw gradient minus exactly that component
    torch.testing.assert_close(grad, raw - along[:, None] * w, rtol=1e-5, atol=1e-7)
    assert ((grad * w).sum(1).abs() <= 1e-5 * grad.norm(dim=1) + 1e-9).all()


def test_step_result_depends_on_the_projection():
    """After one Adam step and renormalisation, the rows are where the projected gradient
    takes them, measurably not where the raw one would."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    trainer = make_trainer()
    w0 = trainer.sae.W_dec.detach().clone()
    raw = raw_decoder_grad(trainer, x)
    trainer.step(x)
    lr, eps = trainer.optimizer.param_groups[0]["lr"], trainer.optimizer.param_groups[0]["eps"]

    def adam_first_step(g):  # Adam's first step: m_hat = g, v_hat = g^2
        w = w0 - lr * g / (g.abs() + eps)
        return w / w.norm(dim=1, keepdim=True)

    projected = adam_first_step(raw - (raw * w0).sum(1, keepdim=True) * w0)
    unprojected = adam_first_step(raw)
    got = trainer.sae.W_dec.detach()
    assert (projected - unprojected).abs().max() > 1e-2 * lr
    torch.testing.assert_close(got, projected, rtol=0, atol=1e-3 * lr)


@pytest.mark.parametrize("seed", [1, 2])
def test_rows_stay_unit_norm(seed):
    torch.manual_seed(seed)
    trainer = make_trainer(seed)
    for _ in range(3):
        trainer.step(torch.randn(32, 16))
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(64))


@pytest.mark.slow
def test_learns_known_directions():
    data = SparseData(seed=1000)  # not the SAE's seed: its init would copy the directions
    sae = Sae(small_config(), layers=[0])
    assert data.recovered(sae, threshold=0.9) < 0.1  # nothing is found before training
    sae.set_scale(0, activation_scale([data.batch(4096)], 4096))
    trainer = SaeTrainer(sae)
    for _ in range(1200):  # ~15 s on 2 CPU cores
        trainer.step(data.batch(512))
    with torch.no_grad():
        fvu = float(sae(data.batch(4096)).loss.fvu)
    recovered = data.recovered(sae, threshold=0.9)
    assert fvu < 0.1, fvu
    assert recovered >= 0.9, recovered


def test_decoder_rows_stay_unit_norm_and_dead_latents_are_counted():
    data = SparseData()
    trainer = SaeTrainer(Sae(small_config(dead_threshold=2048), layers=[0]))
    for _ in range(20):
        out = trainer.step(data.batch(256))
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(128))
    dead = trainer.dead_mask()
    assert 0 < int(dead.sum()) < 128  # 128 latents for 64 directions: some must die
    assert float(out.dead_fraction) == pytest.approx(float(dead.float().mean()), abs=0.1)
    assert float(out.auxk) > 0  # AuxK is on once latents are dead


def _train(trainer, data, steps):
    for _ in range(steps):
        trainer.step(data.batch(256))


def test_resume_gives_the_same_weights(tmp_path):
    cfg = small_config(dead_threshold=4096)  # AuxK active in both halves
    straight = SaeTrainer(Sae(cfg))
    _train(straight, SparseData(seed=1), 30)

    data = SparseData(seed=1)
    first = SaeTrainer(Sae(cfg))
    _train(first, data, 15)
    first.save(tmp_path / "ckpt")
    resumed = SaeTrainer.load(tmp_path / "ckpt")
    _train(resumed, data, 15)

    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed.sae, name), getattr(straight.sae, name)), name
    assert torch.equal(resumed.tokens_since_fired, straight.tokens_since_fired)
    assert resumed.tokens_seen == straight.tokens_seen and resumed.steps == 30


def test_non_finite_step_changes_nothing():
    data = SparseData()
    trainer = SaeTrainer(Sae(small_config()))
    trainer.step(data.batch(64))
    before = {n: p.detach().clone() for n, p in trainer.sae.named_parameters()}
    counters = trainer.tokens_since_fired.clone()
    bad = data.batch(64)
    bad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.step(bad)
    trainer.step(bad, check_finite=False)  # the hot-loop mode: skipped on the device, counted
    assert int(trainer.skipped_steps) == 1
    for name, p in trainer.sae.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(trainer.tokens_since_fired, counters)
    trainer.step(data.batch(64))  # and training goes on
    assert not torch.equal(trainer.sae.W_enc, before["W_enc"])


def test_batch_warm_up_steps_through_the_parts_of_each_batch():
    """During the warm-up a batch is split into steps of at most ``warmup_batch`` tokens, rows
    j::parts each (so every step holds every part of the batch), the init from the whole batch;
    after ``warmup_tokens`` a batch is one step again. Bit-identical to those steps taken one by
    one by a trainer without the warm-up."""
    data = SparseData(seed=3)
    batches = [data.batch(64) for _ in range(4)]
    warm = SaeTrainer(Sae(small_config(warmup_tokens=128, warmup_batch=20)))  # 4 parts: 16 rows
    plain = SaeTrainer(Sae(small_config(warmup_tokens=0)))
    plain.sae.load_state_dict(warm.sae.state_dict())
    outs = [warm.step(x) for x in batches]
    plain.initialized = plain.sae.init_from_batch(batches[0]) is not None
    for x in batches[:2]:  # tokens 0 and 64 are inside the warm-up
        for j in range(4):
            plain.step(x[j::4])
    for x in batches[2:]:
        plain.step(x)
    assert warm.steps == plain.steps == 2 * 4 + 2
    assert warm.tokens_seen == plain.tokens_seen == 256
    for name, p in warm.sae.named_parameters():
        assert torch.equal(p, dict(plain.sae.named_parameters())[name]), name
    assert torch.equal(warm.tokens_since_fired, plain.tokens_since_fired)
    assert all(torch.isfinite(torch.stack(list(o))).all() for o in outs)


def test_batch_warm_up_splits_every_layer_of_a_layer_major_batch():
    """A batch of two layers per token, layer-major ``[2 * N, d]``: each warm-up step gets
    rows of both layers, and counts its share of the tokens."""
    from gsae.train.step import warmup_split

    x = torch.arange(16.0).view(8, 2)  # 2 layers x 4 tokens
    layer = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    xs, layers, tokens = warmup_split(x, layer, tokens=4, parts=2)
    assert [t.tolist() for t in layers] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert torch.equal(torch.cat(xs).sort(0).values, x.sort(0).values)
    assert tokens == [2, 2]
    assert warmup_split(x, 3, tokens=5, parts=2)[1:] == ([3, 3], [3, 2])
