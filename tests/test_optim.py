"""The schedule-free sign-SGD optimiser (signum): against the schedulefree package, its
average, non-finite steps, and the trainer's use of it."""

import math

import pytest
import torch
from test_init import config

from gsae.optim import ScheduleFreeSignSGD
from gsae.sae import Sae, SaeConfig
from gsae.synthetic import SparseFeatures
from gsae.train.step import SaeTrainer


def _quadratic(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=g)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    return p, target


def _sign_steps(opt, p, target, steps):
    for _ in range(steps):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()


@pytest.mark.parametrize("r", [0.0, 1.0, 2.0])
def test_signum_matches_the_schedulefree_package(r):
    """r = 0: sparsify's plain mean; r > 0: the package's polynomial weights (gsae's default 1)."""
    schedulefree = pytest.importorskip("schedulefree", reason="schedulefree not installed")

    class SignSGD(torch.optim.Optimizer):  # the base optimiser sparsify wraps
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for q in group["params"]:
                    q.add_(q.grad.sign(), alpha=-group["lr"])

    p, target = _quadratic()
    q = torch.nn.Parameter(p.detach().clone())
    ours = ScheduleFreeSignSGD([p], lr=0.01, momentum=0.95, average_power=r)
    theirs = schedulefree.ScheduleFreeWrapper(SignSGD([q], lr=0.01), momentum=0.95, r=r)
    theirs.train()
    _sign_steps(ours, p, target, 25)
    _sign_steps(theirs, q, target, 25)
    torch.testing.assert_close(p, q, atol=1e-6, rtol=0)  # y, where gradients are taken
    with ours.averaged():
        theirs.eval()
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)  # x, the averaged weights


def test_signum_averaged_restores_bit_exactly_and_learns():
    p, target = _quadratic()
    opt = ScheduleFreeSignSGD([p], lr=0.01)
    _sign_steps(opt, p, target, 1000)
    y = p.detach().clone()
    with opt.averaged():
        x = p.detach().clone()
    assert torch.equal(p, y) and not torch.equal(x, y)
    start = float(((_quadratic()[0].detach() - target) ** 2).sum())
    assert float(((x - target) ** 2).sum()) < 0.02 * start


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_signum_skips_a_non_finite_step_on_the_device(r):
    p, target = _quadratic()
    opt = ScheduleFreeSignSGD([p], lr=0.01, average_power=r)
    _sign_steps(opt, p, target, 3)
    before = (p.detach().clone(), opt.state[p]["z"].clone(), int(opt.state[p]["step"]))
    total = opt.state[p].get("weight_sum", torch.zeros(())).clone()
    p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(p, before[0]) and torch.equal(opt.state[p]["z"], before[1])
    assert int(opt.state[p]["step"]) == before[2]
    assert torch.equal(opt.state[p].get("weight_sum", torch.zeros(())), total)
    opt.found_inf = torch.zeros(())
    _sign_steps(opt, p, target, 1)
    assert int(opt.state[p]["step"]) == before[2] + 1


def test_bad_optimizer_and_init_names_are_refused():
    for kw, match in (
        ({"optimizer": "sgd"}, "optimizer"),
        ({"init_encoder": "x"}, "init_encoder"),
        ({"init_b_dec": "max"}, "init_b_dec"),
    ):
        with pytest.raises(ValueError, match=match):
            Sae(config(**kw))


def test_the_default_is_signum_at_half_sparsify_s_learning_rate_with_weighted_averaging():
    cfg = SaeConfig(d=768)
    assert cfg.optimizer == "signum" and cfg.average_power == 2.0
    assert cfg.lr_value == pytest.approx(2.5e-3 / math.sqrt(cfg.m / 2**14))
    opt = SaeTrainer(Sae(SaeConfig(d=8, num_latents=16, k=2))).optimizer
    assert isinstance(opt, ScheduleFreeSignSGD) and opt.param_groups[0]["r"] == 2.0
    assert SaeConfig(d=768, optimizer="adam").lr_value == pytest.approx(2e-4 / math.sqrt(0.75))


def test_signum_trainer_saves_the_average_and_resumes_exactly(tmp_path):
    data = SparseFeatures(d=32, seed=1000)
    batches = [data.batch(128) for _ in range(8)]
    trainer = SaeTrainer(Sae(config(optimizer="signum"), layers=[3]))
    for b in batches[:4]:
        trainer.step(b, layer=3)
    trainer.save(tmp_path / "ckpt")
    saved = Sae.load(tmp_path / "ckpt")
    with trainer.averaged():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(saved, name), getattr(trainer.sae, name)), name
    assert not torch.equal(saved.W_enc, trainer.sae.W_enc)  # outside: the training point y
    resumed = SaeTrainer.load(tmp_path / "ckpt")
    for b in batches[4:]:
        trainer.step(b, layer=3)
        resumed.step(b, layer=3)
    for name, p in trainer.sae.named_parameters():
        assert torch.equal(p, dict(resumed.sae.named_parameters())[name]), name
