"""AuxK by dense GEMMs (gsae_kernels.auxk, the GPU's AuxK) against the sparse AuxK of
topk_encode + sparse_decode, and the Triton backend's choice of encoder forward."""

import functools

import pytest
import torch
from gsae_kernels import TopKSAE, sparse_decode, topk_encode
from gsae_kernels import auxk as auxk_mod
from gsae_kernels.auxk import auxk_recon
from gsae_kernels.topk_encode import _aux_candidates, resolve_encoder
from test_kernels import dead_mask_for, encoder_args, fresh, make_params
from tolerances import TOL

NAMES = ("x", "W_enc", "b_enc", "b_dec", "W_dec")


def sparse_auxk(p, k, dead, k_aux, precision):
    enc = topk_encode(*encoder_args(p), k, dead, k_aux, backend="torch", precision=precision)
    return sparse_decode(enc.aux_values, enc.aux_indices, p["W_dec"], None, backend="torch")


def grads_of(recon_fn, params, g):
    p = fresh({n: params[n] for n in NAMES})
    recon = recon_fn(p)
    (recon * g).sum().backward()
    return recon.detach(), {n: p[n].grad for n in NAMES}


@pytest.mark.parametrize("n_dead", [5, 120, 200], ids=["fewer-than-k_aux", "many", "all"])
@pytest.mark.parametrize("exact", [True, False], ids=["nonzero", "gpu-candidates"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dense_auxk_matches_the_sparse_one(monkeypatch, n_dead, exact, precision):
    """Same reconstruction and the same gradient for x, both weights and both biases; with the
    GPU's way of choosing candidates (a stable sort, live ones masked) as well as nonzero."""
    n, d, m, k, k_aux = 37, 63, 200, 7, 24
    params = make_params(n, d, m)
    dead = dead_mask_for(m, n_dead, "cpu")
    monkeypatch.setattr(
        auxk_mod, "_aux_candidates", functools.partial(_aux_candidates, exact=exact)
    )
    limit = min(m, n_dead + 17)  # a bound above the dead count, as the trainer's is
    g = torch.randn(n, d)
    want, want_g = grads_of(lambda p: sparse_auxk(p, k, dead, k_aux, precision), params, g)
    got, got_g = grads_of(
        lambda p: auxk_recon(
            *encoder_args(p), p["W_dec"], dead, k_aux, precision=precision, aux_limit=limit
        ),
        params,
        g,
    )

    # the same selection either way (the encoder GEMM rounds alike); in bf16 the dense decode is
    # a bf16 GEMM too, where the sparse decode sums fp32 rows: bf16's 2^-8, on the tensor's scale
    def close(a, b, name):
        scale = 1.0 if precision == "fp32" else float(b.abs().max())
        tol = TOL[torch.float32] if precision == "fp32" else dict(rtol=0, atol=8e-3)
        torch.testing.assert_close(a / scale, b / scale, **tol, msg=lambda s: f"{name}: {s}")

    close(got, want, "recon")
    for name in NAMES:
        close(got_g[name], want_g[name], name)


def test_dense_auxk_with_nothing_to_choose_is_none():
    params = make_params(8, 16, 32)
    p = [params[n] for n in NAMES]
    none_dead = torch.zeros(32, dtype=torch.bool)
    assert auxk_recon(*p, none_dead, 4) is None
    assert auxk_recon(*p, ~none_dead, 0) is None


@pytest.mark.parametrize("n_dead", [3, 100])
def test_topksae_forward_is_the_same_with_either_auxk(n_dead):
    """The module's loss and every parameter's gradient, AuxK dense (a GPU's default) or sparse
    (a CPU's); and without AuxK the choice changes nothing."""
    torch.manual_seed(1)
    sae = TopKSAE(24, 160, 6)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 24)
    dead = dead_mask_for(160, n_dead, "cpu")
    results = {}
    for impl in ("sparse", "dense"):
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead, 16, auxk=impl)
        out.loss.loss.backward()
        results[impl] = (out.loss, {n: p.grad.clone() for n, p in sae.named_parameters()})
        assert (out.latents.aux_values is None) == (impl == "dense")
    (ls, gs), (ld, gd) = results["sparse"], results["dense"]
    assert float(ls.auxk) > 0
    for a, b in zip(ls, ld, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in gs:
        torch.testing.assert_close(gd[name], gs[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="auxk must be"):
        sae(x, dead, 16, auxk="both")


def test_the_triton_backend_defaults_to_the_gemm_forward(monkeypatch):
    monkeypatch.delenv("GSAE_ENCODER", raising=False)
    assert resolve_encoder(None) == "gemm"
    assert resolve_encoder("fused") == "fused"
    monkeypatch.setenv("GSAE_ENCODER", "fused")
    assert resolve_encoder(None) == "fused"
    monkeypatch.setenv("GSAE_ENCODER", "fast")
    with pytest.raises(ValueError, match="GSAE_ENCODER"):
        resolve_encoder(None)
