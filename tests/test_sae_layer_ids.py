"""Per-token layer ids that the SAE does not cover are refused, never given another layer's
scale (they used to get the last layer's, or an IndexError / device assert above the largest)."""

import pytest
import torch

import gsae.sae
from gsae.sae import Sae, SaeConfig
from gsae.train.step import SaeTrainer


def make_sae():
    sae = Sae(SaeConfig(d=8, num_latents=32, k=4), layers=[2, 5, 3])
    for layer, scale in ((2, 0.5), (5, 2.0), (3, 4.0)):
        sae.set_scale(layer, scale)
    return sae


def test_covered_ids_get_their_own_scale():
    sae = make_sae()
    for dtype in (torch.int64, torch.int32):
        ids = torch.tensor([3, 2, 5, 5, 3], dtype=dtype)
        got = sae.scale_for(ids).squeeze(1)
        torch.testing.assert_close(got, torch.tensor([4.0, 0.5, 2.0, 2.0, 4.0]))


@pytest.mark.parametrize("bad", [4, 0, 6, 100, -1], ids=["gap", "below", "above", "far", "neg"])
def test_uncovered_ids_are_refused_with_their_names(bad):
    sae = make_sae()
    x = torch.randn(4, 8)
    ids = torch.tensor([2, bad, 3, 5])
    with pytest.raises(ValueError, match=rf"layer ids \[{bad}\] are not covered .*\[2, 5, 3\]"):
        sae.encode(x, layer=ids)
    with pytest.raises(ValueError, match="not covered"):
        SaeTrainer(sae).step(x, ids)


def test_float_ids_are_refused():
    with pytest.raises(TypeError, match="integer tensor"):
        make_sae().scale_for(torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("check_finite", [True, False])
def test_unchecked_ids_poison_the_step_instead(monkeypatch, check_finite):
    """Where ids are not checked (a GPU, to avoid a host sync every step), an uncovered id gets
    a NaN scale: the step is refused or skipped, the weights stay as they were."""
    monkeypatch.setattr(gsae.sae, "_check_layer_ids", lambda device: False)
    sae = make_sae()
    trainer = SaeTrainer(sae)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    ids = torch.tensor([2, 4, 3, 5, 9, 2])
    assert torch.isnan(sae.scale_for(ids)[[1, 4]]).all()
    if check_finite:
        with pytest.raises(FloatingPointError):
            trainer.step(torch.randn(6, 8), ids)
    else:
        trainer.step(torch.randn(6, 8), ids, check_finite=False)
        assert int(trainer.skipped_steps) == 1
    for n, p in sae.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_debug_mode_checks_every_device(monkeypatch):
    monkeypatch.setenv("GSAE_CHECK_LAYERS", "1")
    assert gsae.sae._check_layer_ids(torch.device("cuda"))
    monkeypatch.delenv("GSAE_CHECK_LAYERS")
    assert not gsae.sae._check_layer_ids(torch.device("cuda"))
    assert gsae.sae._check_layer_ids(torch.device("cpu"))
