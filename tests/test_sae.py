"""The SAE (:mod:`gsae.sae`): its config and defaults, each layer's scale inside encode and
decode, per-token layer ids that it does not cover refused (never given another layer's scale),
save/load and bad input."""

import math
import os

import pytest
import torch
from gsae_kernels import sparse_decode, topk_encode
from tiny import small_config

import gsae.sae
from gsae.sae import Sae, SaeConfig
from gsae.synthetic import SparseFeatures as SparseData
from gsae.train.step import SaeTrainer


def test_default_hyperparameters_follow_the_paper():
    cfg = SaeConfig(d=768)
    assert cfg.m == 768 * 16 and cfg.k == 128 and cfg.auxk_alpha == 1 / 32
    # the optimiser is gsae's (signum, tests/train/test_recipe.py); Adam's lr is the paper's
    paper_lr = SaeConfig(d=768, optimizer="adam").lr_value
    assert paper_lr == pytest.approx(2e-4 / math.sqrt(cfg.m / 2**14))
    assert cfg.k_aux_value == 384 and cfg.dead_threshold == 10_000_000
    assert cfg.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=129, num_latents=128), r"k must be in \[1, m=128\], got 129"),
        (dict(k=0), r"k must be in"),
        (dict(scale_mode="max"), r"scale_mode"),
        (dict(lr=-1.0), r"lr must be > 0"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sae(SaeConfig(**{"d": 8, **kwargs}))


def test_scales_are_applied_inside_encode_and_decode():
    sae = Sae(small_config(), layers=[3, 5])
    sae.set_scale(3, 0.5)
    sae.set_scale(5, 0.25)
    x = torch.randn(10, 32)
    enc = sae.encode(x, layer=5)
    ref = topk_encode(x * 0.25, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    torch.testing.assert_close(enc.values, ref.values)
    x_hat = sae.decode(enc.values, enc.indices, layer=5)
    raw = sparse_decode(enc.values, enc.indices, sae.W_dec, sae.b_dec)  # in the SAE's units
    torch.testing.assert_close(x_hat, raw / 0.25)
    # per-token layers: each row gets its own layer's scale
    layer = torch.tensor([3, 5] * 5)
    out = sae(x, layer=layer)
    rows3 = sae(x[layer == 3], layer=3).x_hat
    torch.testing.assert_close(out.x_hat[layer == 3], rows3)
    with pytest.raises(ValueError, match="layer 4 is not covered"):
        sae.encode(x, layer=4)
    with pytest.raises(ValueError, match="say which with layer="):
        sae.encode(x)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 32\)"):
        sae.encode(x[:, :7], layer=3)


def test_save_load_round_trip(tmp_path):
    data = SparseData()
    sae = Sae(small_config(), layers=[2, 7])
    sae.set_scale(7, 0.123456789)
    trainer = SaeTrainer(sae)
    trainer.step(data.batch(64), layer=7)
    sae.save(tmp_path / "sae")
    assert sorted(os.listdir(tmp_path / "sae")) == ["cfg.json", "sae.safetensors"]
    back = Sae.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "scales"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert back.cfg == sae.cfg and back.layers == [2, 7]
    x = data.batch(16)
    assert torch.equal(back(x, layer=7).x_hat, sae(x, layer=7).x_hat)
    with pytest.raises(FileNotFoundError, match="holds no SAE"):
        Sae.load(tmp_path / "nothing")


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
