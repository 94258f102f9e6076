"""gsae_kernels against the dense reference: every output and every gradient, by name.

The Triton cases run in the interpreter on a CPU-only machine (see conftest.py), so their
shapes are kept small; odd sizes (d = 63, m = 200, N = 37) make every tile partial.
"""

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE
from gsae_kernels import TopKSAE, fvu_auxk_loss, reference, resolve_backend, sparse_decode
from gsae_kernels import topk_encode as encode
from gsae_kernels.sparse_ops import latent_segments, sparse_transpose, transpose_split
from tolerances import RELATIVE, TOL
from torch.utils._python_dispatch import TorchDispatchMode

GPU = torch.cuda.is_available()
BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("triton", "cuda" if GPU else "cpu", id="triton"),
]
# the Triton backend with its GEMM forward (its default outside the tests: see conftest.py)
ENCODE_BACKENDS = [*BACKENDS, pytest.param("triton-gemm", "cuda" if GPU else "cpu", id="gemm")]


def make_params(n, d, m, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(m, d, generator=g)
    params = {
        "x": torch.randn(n, d, generator=g) + 0.5,  # a non-zero mean, as residual streams have
        "W_enc": torch.randn(m, d, generator=g) / d**0.5,
        "b_enc": 0.1 * torch.randn(m, generator=g),
        "b_dec": 0.1 * torch.randn(d, generator=g),
        "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True),
    }
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in params.items()}


ENCODER = ("x", "W_enc", "b_enc", "b_dec")  # topk_encode's tensors, in its order


def encoder_args(p: dict) -> tuple:
    return tuple(p[n] for n in ENCODER)


def fresh(params):
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


def dense(values, indices, m):
    # scatter_add: an AuxK row's spare slots (value 0) may repeat an id that is also selected
    out = torch.zeros(values.shape[0], m, dtype=torch.float32, device=values.device)
    return out.scatter_add(1, indices.long(), values.float())


def by_index(values, indices):
    """Rows sorted by latent id, so two selections can be compared slot by slot."""
    order = indices.argsort(dim=1)
    return values.gather(1, order), indices.gather(1, order)


def dead_mask_for(m, n_dead, device):
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m)[:n_dead]] = True
    return mask.to(device)


def assert_named_close(got: dict, want: dict, dtype):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, f"{name} is missing"
        torch.testing.assert_close(
            got[name].float().cpu(),
            want[name].float().cpu(),
            **TOL[dtype],
            msg=lambda s, n=name: f"{n}: {s}",
        )


# ---------------------------------------------------------------------------------- topk_encode


def run_encode(backend, params, k, dead_mask, k_aux, grads):
    p = fresh({n: params[n] for n in ENCODER})
    backend, _, encoder = backend.partition("-")
    out = encode(*encoder_args(p), k, dead_mask, k_aux, backend=backend, encoder=encoder or None)
    # an upstream gradient per output slot, keyed by latent id so it does not depend on slot order
    loss = (out.values * grads[0].gather(1, out.indices)).sum()
    if k_aux:
        loss = loss + (out.aux_values * grads[1].gather(1, out.aux_indices)).sum()
    loss.backward()
    m = params["W_enc"].shape[0]
    results = {"latents": dense(out.values, out.indices, m)}
    if k_aux:
        results["aux_latents"] = dense(out.aux_values, out.aux_indices, m)
    results.update({f"grad_{n}": t.grad for n, t in p.items()})
    return out, results


ENCODE_SHAPES = [  # (N, d, m, k): m is never a multiple of a block, N never of BLOCK_N
    (37, 48, 200, 1),
    (37, 63, 200, 7),
    (50, 128, 333, 32),
    (37, 63, 100, 32),
]


@pytest.mark.parametrize("backend,device", ENCODE_BACKENDS)
@pytest.mark.parametrize("n,d,m,k", ENCODE_SHAPES)
def test_topk_encode_matches_reference(backend, device, n, d, m, k):
    params = make_params(n, d, m, device=device)
    grads = (torch.randn(n, m, device=device), None)
    out, got = run_encode(backend, params, k, None, 0, grads)
    ref_out, want = run_encode("reference", params, k, None, 0, grads)
    assert out.values.shape == out.indices.shape == (n, k)
    assert out.indices.dtype == torch.int64
    v, i = by_index(out.values, out.indices)
    rv, ri = by_index(ref_out.values, ref_out.indices)
    torch.testing.assert_close(i, ri, rtol=0, atol=0, msg="indices")
    torch.testing.assert_close(v, rv, **TOL[torch.float32], msg="values")
    assert_named_close(got, want, torch.float32)


@pytest.mark.parametrize("backend,device", ENCODE_BACKENDS)
@pytest.mark.parametrize("n_dead", [0, 5, 200], ids=["none-dead", "few-dead", "all-dead"])
def test_topk_encode_auxk(backend, device, n_dead):
    n, d, m, k, k_aux = 37, 63, 200, 7, 24  # 5 dead < k_aux: the spare aux slots must be 0
    params = make_params(n, d, m, device=device)
    dead = dead_mask_for(m, n_dead, device)
    grads = (torch.randn(n, m, device=device), torch.randn(n, m, device=device))
    out, got = run_encode(backend, params, k, dead, k_aux, grads)
    _, want = run_encode("reference", params, k, dead, k_aux, grads)
    assert out.aux_values.shape == out.aux_indices.shape == (n, k_aux)
    live_chosen = ~dead[out.aux_indices] & (out.aux_values != 0)
    assert not live_chosen.any(), "AuxK picked a live latent"
    assert int((out.aux_values > 0).sum(1).max()) <= n_dead
    assert_named_close(got, want, torch.float32)


WIDE = [  # (N, d, m, k, k_aux, dead): the paper's k, AuxK widths in the hundreds, k > 256
    pytest.param(20, 16, 160, 128, 0, 0, id="k128"),
    pytest.param(12, 16, 300, 7, 260, 280, id="k7-kaux260"),
    pytest.param(12, 16, 600, 128, 384, 500, id="k128-kaux384"),
    pytest.param(12, 16, 320, 300, 0, 0, id="k300"),
]


@pytest.mark.parametrize("backend,device", ENCODE_BACKENDS)
@pytest.mark.parametrize("n,d,m,k,k_aux,n_dead", WIDE)
def test_topk_encode_wide_selections(backend, device, n, d, m, k, k_aux, n_dead):
    """The encoder's wide buffers: K_PAD = 128 (the paper's k), a KA_PAD of 512 (the "widen"
    branch every default AuxK takes: k_aux = d / 2 >= 384), and K_PAD = 512 > BLOCK_M."""
    params = make_params(n, d, m, device=device)
    dead = dead_mask_for(m, n_dead, device) if k_aux else None
    grads = (torch.randn(n, m, device=device), torch.randn(n, m, device=device))
    out, got = run_encode(backend, params, k, dead, k_aux, grads)
    ref, want = run_encode("reference", params, k, dead, k_aux, grads)
    assert torch.equal(out.indices.sort(1).values, ref.indices.sort(1).values)
    if k_aux:
        assert out.aux_indices.shape == (n, k_aux)
        assert not (~dead[out.aux_indices] & (out.aux_values != 0)).any(), "AuxK took a live one"
    assert_named_close(got, want, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("which", ["b_enc", "b_dec", "both"])
def test_absent_biases_mean_zero(backend, device, which):
    """b_enc/b_dec None: the same as zeros, and no gradient for what is absent."""
    n, d, m, k = 21, 24, 90, 6
    params = make_params(n, d, m, device=device)
    none = {"b_enc", "b_dec"} if which == "both" else {which}

    def step(backend, zeros):
        p = fresh(params)
        b = {
            name: (torch.zeros_like(p[name]) if zeros else None) if name in none else p[name]
            for name in ("b_enc", "b_dec")
        }
        dead = torch.arange(m, device=device) % 5 == 0
        enc = encode(p["x"], p["W_enc"], b["b_enc"], b["b_dec"], k, dead, 4, backend=backend)
        x_hat = sparse_decode(enc.values, enc.indices, p["W_dec"], b["b_dec"], backend=backend)
        aux = sparse_decode(enc.aux_values, enc.aux_indices, p["W_dec"], backend=backend)
        fvu_auxk_loss(p["x"], x_hat, aux, backend=backend).loss.backward()
        return {"x_hat": x_hat, **{f"grad_{n}": p[n].grad for n in p}}

    got = step(backend, zeros=False)
    for name in none:
        assert got.pop(f"grad_{name}") is None, name
    want = step("reference", zeros=True)
    assert_named_close(got, {n: v for n, v in want.items() if n in got}, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    """N = 0 rows encode and decode to empty outputs (and empty gradients); the loss of an
    empty batch is refused by name."""
    p = make_params(5, 16, 40, device=device)
    x = p["x"][:0]
    enc = encode(
        x,
        p["W_enc"],
        p["b_enc"],
        p["b_dec"],
        4,
        torch.ones(40, dtype=torch.bool, device=device),
        3,
        backend=backend,
    )
    assert enc.values.shape == enc.indices.shape == (0, 4) and enc.aux_values.shape == (0, 3)
    x_hat = sparse_decode(enc.values, enc.indices, p["W_dec"], p["b_dec"], backend=backend)
    assert x_hat.shape == (0, 16)
    x_hat.sum().backward()
    assert p["W_dec"].grad.abs().sum() == 0 and p["W_enc"].grad.abs().sum() == 0
    torch.testing.assert_close(p["b_dec"].grad, torch.zeros(16, device=device))
    with pytest.raises(ValueError, match="x has no rows"):
        fvu_auxk_loss(x, x_hat, backend=backend)


# -------------------------------------------------------------------------------- sparse_decode


def random_selection(n, m, k, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    values = torch.rand(n, k, generator=g)
    values[:, -1] = 0.0  # zero values (ReLU'd slots) must still get their gradient
    return values.to(device).requires_grad_(), indices.to(device)


def run_decode(backend, values, indices, w_dec, b_dec, grad_out):
    v = values.detach().clone().requires_grad_()
    w = w_dec.detach().clone().requires_grad_()
    b = b_dec.detach().clone().requires_grad_() if b_dec is not None else None
    x_hat = sparse_decode(v, indices, w, b, backend=backend)
    (x_hat * grad_out).sum().backward()
    return {
        "x_hat": x_hat,
        "grad_values": v.grad,
        "grad_W_dec": w.grad,
        "grad_b_dec": b.grad if b is not None else None,
    }


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,d,m,k", ENCODE_SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_sparse_decode_matches_reference(backend, device, n, d, m, k, bias):
    params = make_params(n, d, m, device=device)
    values, indices = random_selection(n, m, k, device)
    b_dec = params["b_dec"] if bias else None
    grad_out = torch.randn(n, d, device=device)
    got = run_decode(backend, values, indices, params["W_dec"], b_dec, grad_out)
    want = run_decode("reference", values, indices, params["W_dec"], b_dec, grad_out)
    assert_named_close(got, want, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sparse_decode_int32_indices(backend, device):
    params = make_params(20, 48, 100, device=device)
    values, indices = random_selection(20, 100, 7, device)
    grad_out = torch.randn(20, 48, device=device)
    got = run_decode(backend, values, indices.int(), params["W_dec"], params["b_dec"], grad_out)
    want = run_decode("reference", values, indices, params["W_dec"], params["b_dec"], grad_out)
    assert_named_close(got, want, torch.float32)


# -------------------------------------------------------------------------------- fvu_auxk_loss


def run_loss(backend, x, x_hat, aux, coefs):
    named = (("x", x), ("x_hat", x_hat), ("aux_recon", aux))
    t = {n: v.detach().clone().requires_grad_() for n, v in named if v is not None}
    out = fvu_auxk_loss(t["x"], t["x_hat"], t.get("aux_recon"), auxk_alpha=0.25, backend=backend)
    # weight every output differently, so each one's gradient path is checked
    (coefs[0] * out.loss + coefs[1] * out.fvu + coefs[2] * out.auxk).backward()
    res = {"loss": out.loss, "fvu": out.fvu, "auxk": out.auxk}
    res.update({f"grad_{n}": v.grad for n, v in t.items()})
    return res


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,d", [(37, 63), (64, 128), (5, 48)])
@pytest.mark.parametrize("with_aux", [True, False], ids=["auxk", "fvu-only"])
def test_fvu_auxk_loss_matches_reference(backend, device, n, d, with_aux):
    x = torch.randn(n, d, device=device) * 3 + 1
    x_hat = x + 0.5 * torch.randn(n, d, device=device)
    aux = 0.3 * torch.randn(n, d, device=device) if with_aux else None
    coefs = (1.0, 0.5, -2.0)
    got = run_loss(backend, x, x_hat, aux, coefs)
    want = run_loss("reference", x, x_hat, aux, coefs)
    assert_named_close(got, want, torch.float32)


def test_fvu_is_fraction_of_variance():
    x = torch.randn(100, 16) * 2 + 3
    assert fvu_auxk_loss(x, x.mean(0).expand_as(x).clone()).fvu.item() == pytest.approx(1.0)
    assert fvu_auxk_loss(x, x.clone()).fvu.item() == pytest.approx(0.0)


# ------------------------------------------------------------------------- the composed SAE step


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_full_sae_step_matches_reference(backend, device):
    n, d, m, k, k_aux = 45, 63, 150, 7, 16
    params = make_params(n, d, m, device=device)
    dead = dead_mask_for(m, 20, device)

    def step(bk):
        p = fresh(params)
        enc = encode(*encoder_args(p), k, dead, k_aux, backend=bk)
        x_hat = sparse_decode(enc.values, enc.indices, p["W_dec"], p["b_dec"], backend=bk)
        aux = sparse_decode(enc.aux_values, enc.aux_indices, p["W_dec"], None, backend=bk)
        out = fvu_auxk_loss(p["x"], x_hat, aux, backend=bk)
        out.loss.backward()
        res = {"x_hat": x_hat, "aux_recon": aux, "loss": out.loss, "fvu": out.fvu, "auxk": out.auxk}
        res.update({f"grad_{n}": t.grad for n, t in p.items()})
        return res

    assert_named_close(step(backend), step("reference"), torch.float32)


def clear_rows(params, k, margin, dead=None, k_aux=0):
    """Indices of the rows whose top-k (and AuxK top-k_aux among ``dead``) is unambiguous at
    ``margin``: the k-th and (k+1)-th pre-activations (computed in fp64 from the inputs as
    given) at least ``margin`` x the row's largest apart, and no selected one within ``margin``
    of 0. Low-precision backends may then still differ in rounding, but not in what they
    select."""
    xc = params["x"].double() - params["b_dec"].double()
    pre = (xc @ params["W_enc"].double().T + params["b_enc"].double()).detach().cpu()
    top = pre.abs().max(1).values

    def clear(z, kk):
        s = z.sort(dim=1, descending=True).values
        gap = (s[:, kk - 1] - s[:, kk]) > margin * top
        return gap & (s[:, :kk].abs() > margin * top[:, None]).all(1)

    ok = clear(pre, k)
    if k_aux:
        ok &= clear(pre[:, dead.cpu()], k_aux)
    return ok.nonzero().squeeze(1)


def relative_error(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


GPU_ONLY = pytest.mark.gpu
LOW = [
    pytest.param("torch", "cpu", torch.bfloat16, id="torch-bf16"),
    pytest.param("torch", "cpu", torch.float16, id="torch-fp16"),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-bf16", marks=GPU_ONLY),
    pytest.param("triton", "cuda", torch.float16, id="triton-fp16", marks=GPU_ONLY),
]
MARGIN = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # a few units in the last place


@pytest.mark.parametrize("backend,device,dtype", LOW)
def test_low_precision_selects_and_differentiates_like_the_reference(backend, device, dtype):
    """bf16/fp16 weights and activations (the interpreter gets bf16 matmuls wrong: the Triton
    cases need a GPU). On rows whose selection is unambiguous at the dtype's resolution: the
    same latents, and values and every gradient within the dtype's tolerance of the fp32
    reference on the same (rounded) inputs."""
    n, d, m, k, k_aux = 1024, 64, 256, 16, 12
    params = make_params(n, d, m, dtype=dtype, device=device)
    dead = dead_mask_for(m, 40, device)
    rows = clear_rows(params, k, MARGIN[dtype], dead, k_aux).to(device)
    assert rows.numel() >= 64, f"only {rows.numel()} unambiguous rows to test"
    params = {name: t.detach() for name, t in params.items()}
    params["x"] = params["x"][rows]
    n = rows.numel()
    grads = (torch.randn(n, m, device=device), torch.randn(n, m, device=device))
    out, got = run_encode(backend, params, k, dead, k_aux, grads)
    wide = {name: t.float() for name, t in params.items()}
    ref, want = run_encode("reference", wide, k, dead, k_aux, grads)
    assert out.values.dtype == dtype
    assert torch.equal(out.indices.sort(1).values, ref.indices.sort(1).values), "selected sets"
    for name in want:
        err = relative_error(got[name], want[name])
        assert err < RELATIVE[dtype], f"{name}: relative error {err:.2e}"
    # the decoder on the same latents, and its gradients
    grad_out = torch.randn(n, d, device=device, dtype=dtype)
    values = out.values.detach()
    dec = run_decode(backend, values, out.indices, params["W_dec"], params["b_dec"], grad_out)
    ref = run_decode(
        "reference", values.float(), out.indices, wide["W_dec"], wide["b_dec"], grad_out.float()
    )
    for name in ref:
        err = relative_error(dec[name], ref[name])
        assert err < RELATIVE[dtype], f"{name}: relative error {err:.2e}"


# -------------------------------------------------------------------- sparsity and determinism


class _ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):  # a sparse result holds only its stored values
                size = t.numel() if t.layout == torch.strided else t.values().numel()
                self.numels.append((size, str(func)))
        return out


def test_backward_builds_no_dense_latent_matrix():
    """The torch path's backward never materialises anything of N x m elements."""
    n, d, m, k = 300, 32, 256, 8  # N m = 76800 is far above every legitimate size (m d = 8192)
    p = make_params(n, d, m)
    enc = encode(*encoder_args(p), k, backend="torch")
    x_hat = sparse_decode(enc.values, enc.indices, p["W_dec"], p["b_dec"], backend="torch")
    loss = fvu_auxk_loss(p["x"], x_hat, backend="torch").loss
    log = _ShapeLog()
    with log:
        loss.backward()
    biggest = max(log.numels)
    assert biggest[0] < n * m // 4, f"backward built a {biggest[0]}-element tensor in {biggest[1]}"
    assert p["W_enc"].grad is not None and p["W_dec"].grad is not None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradients_are_bit_identical_across_runs(backend, device):
    params = make_params(64, 48, 120, device=device)
    values, indices = random_selection(64, 120, 16, device)
    grad_out = torch.randn(64, 48, device=device)
    a = run_decode(backend, values, indices, params["W_dec"], params["b_dec"], grad_out)
    b = run_decode(backend, values, indices, params["W_dec"], params["b_dec"], grad_out)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_latent_chosen_by_every_row(backend, device):
    """Early in training one latent can fire on every row. The Triton sparse_transpose then
    splits its segment across programs (here into 2 or 3 pieces, in the encoder's and the
    decoder's backward); the whole step still matches the reference, bit-identically run to
    run."""
    n, d, m, k, k_aux = 160, 20, 128, 3, 4
    params = make_params(n, d, m, device=device)
    with torch.no_grad():
        params["b_enc"][0] = 50.0  # latent 0 tops every row
    dead = dead_mask_for(m, 30, device)
    assert transpose_split(n * k, m) < n and transpose_split(n * (k + k_aux), m) < n

    def step(bk):
        p = fresh(params)
        enc = encode(*encoder_args(p), k, dead, k_aux, backend=bk)
        assert (enc.indices == 0).any(1).all()
        x_hat = sparse_decode(enc.values, enc.indices, p["W_dec"], p["b_dec"], backend=bk)
        aux = sparse_decode(enc.aux_values, enc.aux_indices, p["W_dec"], backend=bk)
        fvu_auxk_loss(p["x"], x_hat, aux, backend=bk).loss.backward()
        return {"x_hat": x_hat, **{f"grad_{n}": t.grad for n, t in p.items()}}

    got, again = step(backend), step(backend)
    for name in got:
        assert torch.equal(got[name], again[name]), f"{name} differs between runs"
    assert_named_close(got, step("reference"), torch.float32)


@pytest.mark.parametrize("split", [32, 64, 10_000])
def test_sparse_transpose_pieces(split):
    """sparse_transpose with every piece size: one latent of 301 entries (10 pieces of 32),
    others of 0 to a few; with the pre-bias shift and the bias sums; against a dense product,
    and bit-identical run to run."""
    n, d, m = 301, 40, 70
    g = torch.Generator().manual_seed(9)
    idx = torch.stack([torch.zeros(n, dtype=torch.long), torch.randint(1, m, (n,), generator=g)], 1)
    w = torch.randn(n, 2, generator=g)
    x, shift = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    dense_w = torch.zeros(n, m).scatter_add(1, idx, w)  # [N, m]
    want, want_b = dense_w.T @ (x - shift), dense_w.sum(0)
    dev = TRITON_DEVICE
    segs = latent_segments(idx.to(dev), m)
    args = (segs, w.to(dev), x.to(dev), m, True, "triton", shift.to(dev), split)
    out, out_b = sparse_transpose(*args)
    out2, out_b2 = sparse_transpose(*args)
    assert torch.equal(out, out2) and torch.equal(out_b, out_b2)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b.cpu(), want_b, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_torch_path():
    n, d, m, k = 6, 5, 12, 3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w_enc = torch.randn(m, d, dtype=torch.float64, generator=g, requires_grad=True)
    b_enc = torch.randn(m, dtype=torch.float64, generator=g, requires_grad=True)
    b_dec = torch.randn(d, dtype=torch.float64, generator=g, requires_grad=True)
    w_dec = torch.randn(m, d, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, w_enc, b_enc, b_dec, w_dec):
        enc = encode(x, w_enc, b_enc, b_dec, k, backend="torch")
        x_hat = sparse_decode(enc.values, enc.indices, w_dec, b_dec, backend="torch")
        return fvu_auxk_loss(x, x_hat, backend="torch").loss

    assert torch.autograd.gradcheck(f, (x, w_enc, b_enc, b_dec, w_dec), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_problem():
    p = make_params(8, 16, 32)
    x, we, be, bd, wd = (p[n].detach() for n in ("x", "W_enc", "b_enc", "b_dec", "W_dec"))
    with pytest.raises(ValueError, match=r"k must be .* \[1, m=32\], got 33"):
        encode(x, we, be, bd, 33)
    with pytest.raises(ValueError, match=r"k must be"):
        encode(x, we, be, bd, 0)
    with pytest.raises(ValueError, match=r"k must be an integer .* got 4.0"):
        encode(x, we, be, bd, 4.0)
    assert encode(x, we, be, bd, np.int64(4)).values.shape == (8, 4)  # any integer type
    with pytest.raises(ValueError, match=r"W_enc must have shape \(32, 16\)|W_enc must have shape"):
        encode(x, we[:, :15], be, bd, 4)
    with pytest.raises(ValueError, match=r"b_enc must have shape \(32,\)"):
        encode(x, we, be[:5], bd, 4)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        encode(x[0], we, be, bd, 4)
    with pytest.raises(ValueError, match=r"W_enc must be a floating tensor, got torch.int64"):
        encode(x, we.long(), be, bd, 4)
    with pytest.raises(TypeError, match=r"b_dec must be a torch.Tensor, got list"):
        encode(x, we, be, [0.0] * 16, 4)
    with pytest.raises(ValueError, match=r"needs a dead_mask"):
        encode(x, we, be, bd, 4, k_aux=2)
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \(32,\)"):
        encode(x, we, be, bd, 4, dead_mask=torch.zeros(31, dtype=torch.bool), k_aux=2)
    v, i = torch.rand(8, 4), torch.randint(0, 32, (8, 4))
    with pytest.raises(ValueError, match=r"indices has shape"):
        sparse_decode(v, i[:, :3], wd, bd)
    with pytest.raises(ValueError, match=r"indices must be an int64 or int32 tensor"):
        sparse_decode(v, i.float(), wd, bd)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 32\), got ids from -1 to"):
        sparse_decode(v, torch.cat([i[:, :3], torch.full((8, 1), -1)], 1), wd, bd)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 32\), got ids from \d+ to 32"):
        sparse_decode(v, torch.cat([i[:, :3], torch.full((8, 1), 32)], 1), wd, bd)
    with pytest.raises(ValueError, match=r"b_dec must have shape \(16,\)"):
        sparse_decode(v, i, wd, bd[:3])
    with pytest.raises(ValueError, match=r"x_hat must have shape \(8, 16\)"):
        fvu_auxk_loss(x, x[:4])
    with pytest.raises(ValueError, match=r"x_hat is on meta but x is on cpu"):
        fvu_auxk_loss(x, x.to("meta"))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("GSAE_KERNELS", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("GSAE_KERNELS", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("GSAE_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend(torch.device("cpu"))


def test_reference_backend_is_the_reference(monkeypatch):
    p = make_params(10, 16, 40)
    monkeypatch.setenv("GSAE_KERNELS", "reference")
    args = (*encoder_args(p), 4)
    got = encode(*args)
    want = reference.topk_encode(*args)
    assert torch.equal(got.values, want[0]) and torch.equal(got.indices, want[1])


# -------------------------------------------------------------------------------------- module


def test_topk_sae_module():
    sae = TopKSAE(d=24, m=96, k=6)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    x = torch.randn(30, 24)
    out = sae(x, dead_mask=torch.ones(96, dtype=torch.bool), k_aux=12)
    assert out.x_hat.shape == (30, 24) and out.latents.values.shape == (30, 6)
    out.loss.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
    with pytest.raises(ValueError, match="k must be"):
        TopKSAE(d=4, m=8, k=9)
