"""The SAE and its training step: learning, constraints, save/load, resume and bad input."""

import math
import os

import pytest
import torch
from gsae_kernels import sparse_decode, topk_encode

from gsae.init import activation_scale
from gsae.io import atomic_dir
from gsae.sae import Sae, SaeConfig
from gsae.synthetic import SparseFeatures as SparseData
from gsae.train.step import SaeTrainer


def small_config(**kw):
    base = dict(d=32, num_latents=128, k=4, dead_threshold=20_000)
    return SaeConfig(**{**base, **kw})


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


def test_default_hyperparameters_follow_the_paper():
    cfg = SaeConfig(d=768)
    assert cfg.m == 768 * 16 and cfg.k == 128 and cfg.auxk_alpha == 1 / 32
    # the optimiser is gsae's (signum, tests/test_recipe.py); Adam's lr is the paper's
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


def test_activation_scale_modes():
    x = torch.randn(1000, 16) * 5
    s = activation_scale([x[:400], x[400:]], 1000, "mean_sq")
    assert float((s * x).pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)
    s = activation_scale([x], 1000, "mean_norm")
    assert float((s * x).norm(dim=1).mean()) == pytest.approx(1.0, rel=1e-5)
    assert activation_scale([x], 10, "none") == 1.0
    with pytest.raises(ValueError, match="cannot estimate"):
        activation_scale([], 10)


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


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    sae = Sae(small_config())
    sae.save(tmp_path / "sae")
    with torch.no_grad():
        sae.W_enc.add_(1.0)

    original = Sae.save_files

    def write_then_crash(self, directory):
        original(self, directory)
        raise KeyboardInterrupt  # Ctrl-C after the files are written, before the swap

    monkeypatch.setattr(Sae, "save_files", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        sae.save(tmp_path / "sae")
    back = Sae.load(tmp_path / "sae")
    assert not torch.equal(back.W_enc, sae.W_enc)  # the old weights, intact
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temp files left behind


def test_a_users_folder_named_like_an_old_copy_is_left_alone(tmp_path):
    """Swaps are recovered from their journal only (tests/test_outputs.py kills one half-way):
    a folder ``sae.old`` of the user's is neither taken for the SAE nor deleted."""
    sae = Sae(small_config())
    sae.save(tmp_path / "sae")
    os.replace(tmp_path / "sae", tmp_path / "sae.old")  # the user's copy
    with pytest.raises(FileNotFoundError):
        Sae.load(tmp_path / "sae")
    assert (tmp_path / "sae.old" / "cfg.json").exists()
    with atomic_dir(tmp_path / "x") as d:
        (d / "f").write_text("1")
    assert (tmp_path / "x" / "f").read_text() == "1"


def test_activation_scales_accumulate_in_float64_without_float64_copies():
    """Against a float64 reference over several batches cut by the token budget; no float64
    tensor larger than one value per token is ever made (at Pythia-1B sizes a float64 copy of
    the [L, N, d] activations is 8 GiB)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gsae.init import activation_scales

    class Float64Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.largest = max(self.largest, t.numel())
            return out

    g = torch.Generator().manual_seed(3)
    spread = torch.tensor([0.5, 3.0, 40.0])[:, None, None]
    for dtype in (torch.float32, torch.bfloat16):
        batches = [(torch.randn(3, 300, 64, generator=g) * spread).to(dtype) for _ in range(4)]
        x = torch.cat(batches, 1)[:, :1000].double()  # [3, 1000, 64]: the budget cuts batch 4
        want = {"mean_sq": x.pow(2).sum(2).mean(1).rsqrt(), "mean_norm": 1 / x.norm(dim=2).mean(1)}
        for mode, reference in want.items():
            with Float64Watch() as watch:
                got = activation_scales(iter(batches), 1000, mode)
            assert watch.largest <= 3 * 300, (dtype, mode, watch.largest)
            torch.testing.assert_close(
                torch.tensor(got, dtype=torch.float64), reference, rtol=1e-6, atol=0
            )
