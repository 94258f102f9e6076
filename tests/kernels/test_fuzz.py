"""Seeded fuzz test: every backend of gsae_kernels against reference.py on many small random
cases, for every input the signatures accept.

Each case draws N, d, m, k, k_aux (up to m, so the encoder's wide AuxK buffer is hit), the
fraction of dead latents, the dtypes (fp32; fp64 on the torch path; bf16/fp16 activations with
fp32 weights, which compute in fp32), a memory layout for every tensor argument (contiguous,
transposed, a strided slice of a larger buffer, or a transposed slice), whether b_enc/b_dec are
None, int32 or int64 indices. It then compares the outputs and every gradient, by name, of
``topk_encode``, ``sparse_decode`` (upstream gradients arrive in the layout of a strided tensor,
so the backward sees non-contiguous ``grad_out``), ``fvu_auxk_loss`` and a whole SAE step.

Inputs are drawn so that no selection is a near tie (every row's k-th and (k+1)-th
pre-activations, and its AuxK boundary, are >= 1e-3 apart, and no selected pre-activation is
within 1e-3 of the ReLU's kink): two correct backends summing in different orders must then
agree exactly on what they select, and every difference is a bug.

``GSAE_FUZZ_SEED`` and ``GSAE_FUZZ_CASES`` (a multiplier) run other or more cases.
"""

import os
import random

import pytest
import torch
from conftest import TRITON_DEVICE
from gsae_kernels import fvu_auxk_loss, sparse_decode, topk_encode
from tolerances import TOL

SEED = int(os.environ.get("GSAE_FUZZ_SEED", "0"))
SCALE = int(os.environ.get("GSAE_FUZZ_CASES", "1"))
CASES = {"torch": 48 * SCALE, "triton": 16 * SCALE}  # the interpreter is slow: fewer, smaller
LAYOUTS = ("contiguous", "transposed", "sliced", "sliced-transposed")
GAP = 1e-3


# ------------------------------------------------------------------------------------ layouts


def lay(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the given memory layout, as a fresh leaf tensor (same dtype)."""
    if t.dim() == 1:
        if layout == "contiguous":
            return t.clone()
        big = t.new_zeros(3 * t.shape[0] + 2)
        view = big[1 : 1 + 3 * t.shape[0] : 3]  # stride 3, offset 1
        view.copy_(t)
        return view
    if layout == "contiguous":
        return t.clone()
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        r, c = t.shape
        big = t.new_zeros(2 * r + 1, 3 * c + 2)
        view = big[1 : 1 + 2 * r : 2, 2 : 2 + 3 * c : 3]  # strides (2 (3c+2), 3), offset
        view.copy_(t)
        return view
    return lay(t.t(), "sliced").t()  # sliced-transposed


def leaf(t: torch.Tensor, layout: str, device) -> torch.Tensor:
    """A leaf that requires grad, on ``device``, in ``layout`` (laid out on the device itself:
    ``.to(device)`` would make a sliced tensor contiguous)."""
    return lay(t.detach().to(device), layout).requires_grad_()


def close(got, want, name: str) -> None:
    if want is None:
        assert got is None, f"{name}: expected None"
        return
    assert got is not None, f"{name}: missing"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = TOL[got.dtype] if got.is_floating_point() else dict(rtol=0, atol=0)
    torch.testing.assert_close(
        got.to(want.dtype).cpu(), want.cpu(), **tol, equal_nan=True, msg=lambda s: f"{name}: {s}"
    )


# -------------------------------------------------------------------------------- case drawing


class Case:
    """One random configuration; ``describe()`` names it in a failure."""

    def __init__(self, backend: str, index: int):
        rng = random.Random(f"{SEED}-{backend}-{index}")
        self.rng = rng
        self.gen = torch.Generator().manual_seed(rng.randrange(2**31))
        small = backend == "triton"
        self.n = rng.randint(2, 24 if small else 40)  # N = 1 has no variance: FVU = inf
        self.d = rng.randint(1, 40 if small else 70)
        self.m = rng.randint(2, 100 if small else 160)
        self.k = rng.randint(1, min(self.m, 24 if small else 48))
        self.k_aux = rng.choice([0, 0, rng.randint(1, self.m)])
        self.dead_fraction = rng.choice([0.0, 1.0, rng.random()])
        dtypes = [torch.float32] if small else [torch.float32, torch.float32, torch.float64]
        self.w_dtype = rng.choice(dtypes)
        half = [torch.bfloat16] if small else [torch.bfloat16, torch.float16]
        self.x_dtype = self.w_dtype if rng.random() < 0.6 else rng.choice(half)
        self.has_b_enc = rng.random() < 0.8
        self.has_b_dec = rng.random() < 0.7
        self.index_dtype = rng.choice([torch.int64, torch.int32])
        self.layouts = {
            name: rng.choice(LAYOUTS)
            for name in (
                "x",
                "W_enc",
                "b_enc",
                "b_dec",
                "W_dec",
                "values",
                "indices",
                "grad",
                "x_hat",
                "aux",
            )
        }
        self.device = TRITON_DEVICE if backend == "triton" else "cpu"

    def describe(self) -> str:
        return (
            f"N={self.n} d={self.d} m={self.m} k={self.k} k_aux={self.k_aux} "
            f"dead={self.dead_fraction:.2f} W:{self.w_dtype} x:{self.x_dtype} "
            f"b_enc={self.has_b_enc} b_dec={self.has_b_dec} idx:{self.index_dtype} "
            f"layouts={self.layouts}"
        )

    def randn(self, *shape, dtype=torch.float64):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(dtype)

    def weights(self) -> dict:
        """x, W_enc, b_enc, b_dec, W_dec and dead_mask, with no near-tie selection."""
        n, d, m = self.n, self.d, self.m
        w_dec = self.randn(m, d)
        p = {
            "W_enc": self.randn(m, d) / d**0.5,
            "b_enc": 0.3 * self.randn(m) if self.has_b_enc else None,
            "b_dec": 0.3 * self.randn(d) if self.has_b_dec else None,
            "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True),
        }
        dead = torch.rand(m, generator=self.gen) < self.dead_fraction
        x = self.randn(n, d) + 0.5
        for _ in range(200):  # redraw the rows whose selection is a near tie
            bad = self._near_ties(x, p, dead)
            if not bad.any():
                break
            x[bad] = self.randn(int(bad.sum()), d) + 0.5
        else:
            pytest.skip(f"no tie-free draw for {self.describe()}")
        p = {name: v.to(self.w_dtype) if v is not None else None for name, v in p.items()}
        p["x"] = x.to(self.x_dtype)
        p["dead_mask"] = dead
        return p

    def _near_ties(self, x, p, dead) -> torch.Tensor:
        # pre-activations as the ops see them: x rounded to its dtype, then the weights' dtype
        xs = x.to(self.x_dtype).to(self.w_dtype).double()
        w = {n: v.to(self.w_dtype).double() if v is not None else None for n, v in p.items()}
        xc = xs - w["b_dec"] if w["b_dec"] is not None else xs
        pre = xc @ w["W_enc"].T + (w["b_enc"] if w["b_enc"] is not None else 0)  # [N, m]
        bad = self._boundary(pre, self.k)
        if self.k_aux:
            dead_pre = pre[:, dead]
            if dead_pre.shape[1]:
                bad |= self._boundary(dead_pre, min(self.k_aux, dead_pre.shape[1]))
        return bad

    @staticmethod
    def _boundary(pre, k) -> torch.Tensor:
        s = pre.sort(dim=1, descending=True).values
        bad = (s[:, :k].abs() < GAP).any(1)  # a selected value at the ReLU's kink
        if k < s.shape[1]:
            bad |= (s[:, k - 1] - s[:, k]) < GAP
        return bad


# ------------------------------------------------------------------------------ the four checks


def run_encode(case, p, backend):
    leaves = {
        n: leaf(p[n], case.layouts[n], case.device)
        for n in ("x", "W_enc", "b_enc", "b_dec")
        if p[n] is not None
    }
    dead = lay(p["dead_mask"].to(case.device), case.layouts["b_enc"])
    out = topk_encode(
        leaves["x"],
        leaves["W_enc"],
        leaves.get("b_enc"),
        leaves.get("b_dec"),
        case.k,
        dead,
        case.k_aux,
        backend=backend,
    )
    g = torch.Generator().manual_seed(7)
    up = torch.randn(case.n, case.m, generator=g).to(case.device)  # by latent id: order-free
    loss = (out.values.float() * up.gather(1, out.indices)).sum()
    if case.k_aux:
        loss = loss + (out.aux_values.float() * up.flip(1).gather(1, out.aux_indices)).sum()
    loss.backward()
    res = {"indices": out.indices.sort(1).values}
    order = out.indices.argsort(1)
    res["values"] = out.values.gather(1, order)
    if case.k_aux:
        aux = torch.zeros(case.n, case.m, dtype=torch.float64, device=case.device)
        res["aux_latents"] = aux.scatter_add(1, out.aux_indices, out.aux_values.double())
        res["aux_count"] = (out.aux_values > 0).sum(1)
    for name in ("x", "W_enc", "b_enc", "b_dec"):
        res[f"grad_{name}"] = leaves[name].grad if name in leaves else None
    return res


def run_decode(case, p, backend):
    g = case.gen
    ids = torch.stack([torch.randperm(case.m, generator=g)[: case.k] for _ in range(case.n)])
    values = torch.rand(case.n, case.k, generator=g, dtype=torch.float64)
    values[torch.rand(case.n, case.k, generator=g) < 0.2] = 0.0  # ReLU zeros get gradient too
    dev = case.device
    values = leaf(values.to(case.x_dtype), case.layouts["values"], dev)
    indices = lay(ids.to(case.index_dtype).to(dev), case.layouts["indices"])
    w_dec = leaf(p["W_dec"], case.layouts["W_dec"], dev)
    b_dec = leaf(p["b_dec"], case.layouts["b_dec"], dev) if p["b_dec"] is not None else None
    grad = lay(case.randn(case.n, case.d, dtype=case.w_dtype).to(dev), case.layouts["grad"])
    x_hat = sparse_decode(values, indices, w_dec, b_dec, backend=backend)
    (x_hat * grad).sum().backward()  # grad_out arrives in grad's layout
    return {
        "x_hat": x_hat,
        "grad_values": values.grad,
        "grad_W_dec": w_dec.grad,
        "grad_b_dec": b_dec.grad if b_dec is not None else None,
    }


def run_loss(case, p, backend):
    x = p["x"]
    x_hat = (x.double() + 0.5 * case.randn(case.n, case.d)).to(case.w_dtype)
    aux = (0.3 * case.randn(case.n, case.d)).to(case.x_dtype) if case.k_aux else None
    dev = case.device
    t = {"x": leaf(x, case.layouts["x"], dev), "x_hat": leaf(x_hat, case.layouts["x_hat"], dev)}
    if aux is not None:
        t["aux_recon"] = leaf(aux, case.layouts["aux"], dev)
    out = fvu_auxk_loss(t["x"], t["x_hat"], t.get("aux_recon"), 0.25, backend=backend)
    (1.0 * out.loss + 0.5 * out.fvu - 2.0 * out.auxk).backward()
    res = {"loss": out.loss.float(), "fvu": out.fvu.float(), "auxk": out.auxk.float()}
    res.update({f"grad_{n}": v.grad for n, v in t.items()})
    return res


def run_step(case, p, backend):
    names = ("x", "W_enc", "b_enc", "b_dec", "W_dec")
    t = {n: leaf(p[n], case.layouts[n], case.device) for n in names if p[n] is not None}
    dead = p["dead_mask"].to(case.device)
    b_enc, b_dec = t.get("b_enc"), t.get("b_dec")
    enc = topk_encode(t["x"], t["W_enc"], b_enc, b_dec, case.k, dead, case.k_aux, backend=backend)
    x_hat = sparse_decode(enc.values, enc.indices, t["W_dec"], b_dec, backend=backend)
    aux = None
    if case.k_aux:
        aux = sparse_decode(enc.aux_values, enc.aux_indices, t["W_dec"], None, backend=backend)
    out = fvu_auxk_loss(t["x"], x_hat, aux, backend=backend)
    out.loss.backward()
    res = {"x_hat": x_hat, "loss": out.loss.float(), "fvu": out.fvu.float()}
    res.update({f"grad_{n}": t[n].grad if n in t else None for n in names})
    return res


CHECKS = {"encode": run_encode, "decode": run_decode, "loss": run_loss, "step": run_step}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fuzz_against_reference(backend):
    failures = []
    for index in range(CASES[backend]):
        case = Case(backend, index)
        p = case.weights()
        for check, fn in CHECKS.items():
            state = case.gen.get_state()
            got = fn(case, p, backend)
            case.gen.set_state(state)  # the reference draws the same random tensors
            want = fn(case, p, "reference")
            try:
                assert got.keys() == want.keys()
                for name in want:
                    close(got[name], want[name], name)
            except AssertionError as e:
                failures.append(f"case {index} {check}: {case.describe()}\n  {e}")
    if failures:
        raise AssertionError(f"{len(failures)} failing checks:\n" + "\n".join(failures[:12]))
