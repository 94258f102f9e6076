"""The decoder-gradient projection of ``SaeTrainer._update``.

Renormalising the rows after the step keeps them at unit norm whether or not the gradient's
component along each row is removed first, so a test of norms alone stays green without the
projection. These tests look at the gradient the optimiser actually steps with, and at the
step's result, which Adam's per-element scaling makes depend on the projection.
"""

import pytest
import torch

from gsae.sae import Sae, SaeConfig
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
