"""The GPU-first parts of the SAE step: the encoder matmul's precision, AuxK whose work
follows the number of dead latents, sync-free segments, and the trainer's plumbing of both."""

import functools
import importlib

import pytest
import torch
from conftest import TRITON_DEVICE
from gsae_kernels import reference, topk_encode
from gsae_kernels.sparse_ops import latent_segments
from gsae_kernels.topk_encode import resolve_precision, round_operand
from test_kernels import dead_mask_for, dense, encoder_args, make_params
from tiny import flags

from gsae.sae import Sae, SaeConfig
from gsae.train.step import SaeTrainer, resolve_sae_precision

GPU = torch.cuda.is_available()
te = importlib.import_module("gsae_kernels.topk_encode")  # the module (the package exports the op)


# ------------------------------------------------------------------------------- the precision


def test_round_operand_rounds_to_nearest_even():
    ulp = 2.0**-10  # tf32: 10 mantissa bits
    t = torch.tensor([1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.75 * ulp, -(1 + 1.5 * ulp), 3.0])
    want = torch.tensor([1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp), 3.0])
    assert torch.equal(round_operand(t, "tf32"), want)
    bf = round_operand(t, "bf16")
    assert bf.dtype == torch.float32 and torch.equal(bf, t.bfloat16().float())
    assert torch.equal(round_operand(t, "fp32"), t)


def test_resolve_precision():
    x = torch.zeros(2, 2)
    assert resolve_precision(None, x) == "fp32"  # a CPU: torch's TF32 setting is CUDA's
    assert resolve_precision("bf16", x) == "bf16" and resolve_precision("tf32", x) == "tf32"
    assert resolve_precision("bf16", x.double()) == "fp32"  # only fp32 is rounded
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", x)
    assert resolve_sae_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_sae_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_sae_precision("half", torch.device("cpu"))


def rounded_reference(p, k, dead, k_aux, precision):
    """The reference on operands rounded as the precision rounds them (exact products)."""
    xc = round_operand((p["x"] - p["b_dec"]).detach(), precision)
    w = round_operand(p["W_enc"].detach(), precision)
    zero = torch.zeros_like(p["b_dec"])
    return reference.topk_encode(xc, w, p["b_enc"].detach(), zero, k, dead, k_aux)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_torch_path_rounds_operands_and_sums_in_fp32(precision):
    """The torch path in bf16/tf32 selects and returns what fp32 sums of the rounded operands
    give (what a tensor core computes), not the fp32 result: on rows whose top-k boundary is
    clear of the rounding."""
    n, d, m, k, k_aux = 64, 96, 300, 8, 16
    p = make_params(n, d, m)
    dead = dead_mask_for(m, 40, "cpu")
    out = topk_encode(*encoder_args(p), k, dead, k_aux, backend="torch", precision=precision)
    want = rounded_reference(p, k, dead, k_aux, precision)
    got_dense = dense(out.values.detach(), out.indices, m)
    want_dense = dense(want[0], want[1], m)
    torch.testing.assert_close(got_dense, want_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        dense(out.aux_values.detach(), out.aux_indices, m),
        dense(want[2], want[3], m),
        rtol=1e-5,
        atol=1e-5,
    )
    fp32 = topk_encode(*encoder_args(p), k, backend="torch")
    assert not torch.equal(dense(fp32.values.detach(), fp32.indices, m), got_dense)
    # the backward is the fp32 one: gradients reach the fp32 weights
    out.values.sum().backward()
    assert p["W_enc"].grad is not None and p["W_enc"].grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32"])
def test_triton_precision_matches_the_torch_path(precision):
    """One policy on both backends (the interpreter mishandles bf16 dots: GPU only)."""
    n, d, m, k = 512, 256, 2048, 32
    p = {n_: t.detach().cuda() for n_, t in make_params(n, d, m).items()}
    args = (*encoder_args(p), k)
    a = topk_encode(*args, backend="triton", precision=precision)
    b = topk_encode(*args, backend="torch", precision=precision)
    got, want = dense(a.values, a.indices, m), dense(b.values, b.indices, m)
    agree = (got == 0) == (want == 0)
    assert agree.all(1).float().mean() > 0.95  # summation order may flip a near-tie
    # bf16 operands are exact either way; Triton's TF32 conversion is not the torch path's
    # round-to-nearest-even (an H200 differed by up to 1.7e-3 relative at d = 256): TF32's scale
    tol = 1e-2 if precision == "tf32" else 1e-3
    torch.testing.assert_close(got[agree.all(1)], want[agree.all(1)], rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------- AuxK


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_auxk_on_gpu_candidates_matches_exact(monkeypatch, backend):
    """The GPU's sync-free candidates (dead latents first by a stable sort, bounded by
    aux_limit, live ones masked) give the exact selection when the bound covers every dead
    latent, and only the first aux_limit dead latents (by id) when it does not."""
    n, d, m, k, k_aux, n_dead = 37, 63, 200, 7, 24, 30
    p = make_params(n, d, m, device=TRITON_DEVICE)
    dead = dead_mask_for(m, n_dead, TRITON_DEVICE)
    args = (*encoder_args(p), k, dead, k_aux)
    exact = topk_encode(*args, backend=backend)
    monkeypatch.setattr(te, "_aux_candidates", functools.partial(te._aux_candidates, exact=False))
    covered = topk_encode(*args, backend=backend, aux_limit=n_dead + 13)  # 13 live ones masked
    torch.testing.assert_close(
        dense(covered.aux_values, covered.aux_indices, m),
        dense(exact.aux_values, exact.aux_indices, m),
    )
    cut = topk_encode(*args, backend=backend, aux_limit=10)
    first = dead.nonzero().squeeze(1)[:10]
    chosen = cut.aux_indices[cut.aux_values > 0]
    assert chosen.numel() > 0 and torch.isin(chosen, first).all()
    assert (cut.aux_values[:, 10:] == 0).all()  # 10 candidates fill at most 10 slots


def spy_encode(monkeypatch):
    """Record the k_aux, precision and aux_limit of every topk_encode call the SAE makes."""
    calls = []
    real = te.topk_encode

    def spy(*args, **kwargs):
        calls.append(
            (
                args[6] if len(args) > 6 else kwargs.get("k_aux", 0),
                kwargs.get("precision"),
                kwargs.get("aux_limit"),
            )
        )
        return real(*args, **kwargs)

    import gsae_kernels.module as module

    monkeypatch.setattr(module, "topk_encode", spy)
    return calls


def test_auxk_width_follows_the_dead_count(monkeypatch):
    """min(k_aux, dead latents): no AuxK work at all while none is dead, and the same step
    with a k_aux far above the dead count as with k_aux = that count."""
    cfg = dict(d=16, num_latents=64, k=4, k_aux=48, dead_threshold=100)
    x = torch.randn(256, 16)

    def trainer(**extra):
        t = SaeTrainer(Sae(SaeConfig(**{**cfg, **extra})))
        t.step(x)  # init
        t.tokens_seen = 10_000  # past the threshold
        return t

    calls = spy_encode(monkeypatch)
    t = trainer()
    t.tokens_since_fired.zero_()  # nothing dead
    t.step(x)
    assert calls[-1][0] == 0
    wide, narrow = trainer(), trainer(k_aux=5)
    for tr in (wide, narrow):
        tr.tokens_since_fired.zero_()
        tr.tokens_since_fired[:5] = 10_000  # 5 dead latents
    a, b = wide.step(x), narrow.step(x)
    assert calls[-2][0] == calls[-1][0] == 5
    assert torch.equal(a.loss, b.loss) and torch.equal(a.auxk, b.auxk) and float(a.auxk) > 0
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(wide.sae, name), getattr(narrow.sae, name)), name


def test_trainer_passes_its_precision(monkeypatch):
    calls = spy_encode(monkeypatch)
    x = torch.randn(64, 16)
    for asked, used in (("auto", "fp32"), ("bf16", "bf16"), ("tf32", "tf32"), ("fp32", "fp32")):
        t = SaeTrainer(Sae(SaeConfig(d=16, num_latents=64, k=4)), precision=asked)
        assert t.precision == used
        t.step(x)
        assert calls[-1][1] == used
    with pytest.raises(ValueError, match="precision must be one of"):
        SaeTrainer(Sae(SaeConfig(d=16, num_latents=64, k=4)), precision="fp16")


# ------------------------------------------------------------------------------------ segments


@pytest.mark.parametrize("seed", range(6))
def test_segments_by_search_equal_bincount(seed):
    """Offsets from a binary search in the sorted ids equal bincount's, on fuzzed selections:
    empty latents, one latent taking most entries, ids past 2^15 (the two-pass sort), k = 0."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 300, (1,), generator=g))
    k = int(torch.randint(0, 9, (1,), generator=g))
    m = [7, 300, 40_000][seed % 3]
    idx = torch.randint(0, m, (n, k), generator=g)
    if seed % 2 and idx.numel():
        idx[:, 0] = m - 1  # a hot latent
    segs = latent_segments(idx, m)
    counts = torch.bincount(idx.reshape(-1), minlength=m)
    want = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    assert torch.equal(segs.offsets, want)
    assert torch.equal(idx.reshape(-1)[segs.order], idx.reshape(-1).sort(stable=True).values)


# ---------------------------------------------------------------------------------- GPU checks


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused-sparse-auxk"])
def test_gpu_train_step_never_syncs(monkeypatch, fused):
    """A whole training step (AuxK on, with dead latents, at a dead-count refresh and between
    them) on the GPU path with no host sync, as the training loop calls it: its defaults (the
    GEMM encoder, dense AuxK) and the fused encoder with sparse AuxK."""
    monkeypatch.delenv("GSAE_ENCODER", raising=False)
    if fused:
        monkeypatch.setenv("GSAE_ENCODER", "fused")
    cfg = SaeConfig(d=256, num_latents=4096, k=32, k_aux=128, dead_threshold=1000)
    trainer = SaeTrainer(Sae(cfg, device="cuda"))
    trainer.sae.auxk = "sparse" if fused else None
    x = torch.randn(2048, 256, device="cuda")
    trainer.step(x, check_finite=False)  # the init's one sync
    trainer.tokens_since_fired[:500] = 10**6  # 500 dead latents
    trainer.tokens_seen = 10**6
    trainer.step(x, check_finite=False)  # the dead count's first (blocking) read
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * 8 + 1):  # across two refreshes (AUX_REFRESH_STEPS = 8)
            # keep them dead (a device-side fill): AuxK would otherwise revive them in a step
            trainer.tokens_since_fired[:500] = 10**6
            out = trainer.step(x, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert float(out.dead_fraction) > 0 and float(out.auxk) > 0
    assert trainer.dead_count.value is not None


@pytest.mark.gpu
def test_gpu_auxk_is_off_without_dead_latents(monkeypatch):
    """On a GPU too, no dead latent means no AuxK selection (k_aux 0), not a fixed-width one,
    and no dense AuxK either."""
    import gsae_kernels.module as module

    calls = spy_encode(monkeypatch)
    dense_calls = []
    real_recon = module.auxk_recon

    def spy_recon(*a, **kw):
        dense_calls.append(a[6])  # k_aux
        return real_recon(*a, **kw)

    monkeypatch.setattr(module, "auxk_recon", spy_recon)
    cfg = SaeConfig(d=64, num_latents=1024, k=16, k_aux=32, dead_threshold=10**7)
    trainer = SaeTrainer(Sae(cfg, device="cuda"))
    x = torch.randn(512, 64, device="cuda")
    trainer.step(x, check_finite=False)
    trainer.tokens_seen = 10**8  # past the threshold, but no counter is near it
    for _ in range(10):
        trainer.step(x, check_finite=False)
    assert calls[-1][0] == 0 and calls[-1][1] == "bf16" and not dense_calls
    trainer.tokens_since_fired[:7] = 10**8  # now 7 dead: the dense AuxK runs, 7 wide
    for _ in range(2 * 8 + 1):  # the dead count is read up to two refreshes late
        trainer.tokens_since_fired[:7] = 10**8
        trainer.step(x, check_finite=False)
    assert dense_calls and dense_calls[-1] == 7


# ---------------------------------------------------------------------------------- gsae-train


def test_sae_precision_is_a_run_setting(tiny_model_dir, tiny_corpus, tmp_path, offline, capsys):
    """--sae-precision reaches every group's trainer, is saved in run.json, and --resume refuses
    another one by name (it changes what is trained); an old run.json without it is fp32."""
    from gsae.cli.train import main as train_main
    from gsae.train import RunSettings, loop

    out = tmp_path / "run"
    made = []
    real = loop.SaeTrainer

    def spy(*args, **kwargs):
        made.append(kwargs.get("precision"))
        return real(*args, **kwargs)

    argv = flags(model=tiny_model_dir, dataset=tiny_corpus, out=out, sae_precision="tf32")
    argv += flags(tokens="1k", grouping_tokens="1k", scale_tokens="1k", batch_tokens=256)
    argv += flags(ctx_len=64, k=8, device="cpu")
    loop.SaeTrainer = spy
    try:
        assert train_main(argv) == 0
    finally:
        loop.SaeTrainer = real
    assert made and set(made) == {"tf32"}
    assert RunSettings.read(out).sae_precision == "tf32"
    capsys.readouterr()
    assert train_main(["--resume", str(out), "--sae-precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--sae-precision (the run has 'tf32')" in err, err
    old = RunSettings().to_json()
    del old["sae_precision"]
    assert RunSettings.from_json(old).sae_precision == "fp32"
