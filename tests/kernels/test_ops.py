"""gsae_kernels inside PyTorch's op system and on other platforms: custom ops (opcheck),
torch.compile with no graph break, the dtype/autocast policy, several GPUs, no Triton, and no
state kept between steps."""

import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import TRITON_DEVICE
from gsae_kernels import TopKSAE, fvu_auxk_loss, sparse_decode, topk_encode
from gsae_kernels.sparse_ops import stable_argsort

BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("triton", TRITON_DEVICE, id="triton"),
]
ops = torch.ops.gsae_kernels


def params(n=12, d=20, m=48, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, d, generator=g)
    p = {
        "x": torch.randn(n, d, generator=g) + 0.3,
        "W_enc": torch.randn(m, d, generator=g) / 4,
        "b_enc": 0.1 * torch.randn(m, generator=g),
        "b_dec": 0.1 * torch.randn(d, generator=g),
        "W_dec": w / w.norm(dim=1, keepdim=True),
    }
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in p.items()}


# ------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_every_op(backend, device):
    """Schema, fake implementation, autograd registration and compiled dispatch of each op."""
    p = params(device=device)
    x, we, be, bd, wd = (p[n] for n in ("x", "W_enc", "b_enc", "b_dec", "W_dec"))
    k, k_aux, m = 5, 7, we.shape[0]
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    dead[::3] = True
    # the precision and the AuxK candidate bound are op arguments too (the interpreter
    # mishandles bf16 dots, so Triton checks tf32's argument path here)
    low = "bf16" if backend == "torch" else "tf32"
    cases = [
        (ops.topk_encode, (x, we, be, bd, k, None, 0, backend, "fp32", m, True)),
        (ops.topk_encode, (x, we, be, bd, k, dead, k_aux, backend, low, m // 2, True)),
        (ops.topk_encode, (x, we, be, bd, k, dead, k_aux, backend, "fp32", m, False)),  # GEMM
        (
            ops.topk_encode,
            (x, we.detach().t().contiguous().t(), None, None, k, None, 0, backend, "fp32", m, True),
        ),
    ]
    v, i, av, ai = ops.topk_encode(
        x.detach(), we.detach(), be.detach(), bd.detach(), k, dead, k_aux, backend, "fp32", m, True
    )
    gv, ga = torch.randn_like(v), torch.randn_like(av)
    det = [t.detach() for t in (x, we, bd)]
    cases += [  # the backward ops have no backward of their own (no double backward)
        (ops.topk_encode_backward, (gv, ga, *det, v, i, av, ai, True, True, True, True, backend)),
        (
            ops.topk_encode_backward,
            (gv, None, *det, v, i, av, ai, False, True, True, False, backend),
        ),
        (ops.sparse_decode, (v.clone().requires_grad_(), i, wd, bd, backend)),
        (ops.sparse_decode, (av.clone().requires_grad_(), ai.int(), wd, None, backend)),
    ]
    g = torch.randn(x.shape, device=device)
    cases += [
        (ops.sparse_decode_backward, (g, v.detach(), i, wd.detach(), True, True, True, backend)),
        (
            ops.sparse_decode_backward,
            (g, v.detach(), i, wd.detach(), False, True, False, backend),
        ),
    ]
    xh = (x.detach() + 0.1).requires_grad_()
    aux = torch.randn(x.shape, device=device, requires_grad=True)
    cases += [
        (ops.fvu_auxk_loss, (x, xh, aux, 0.25, True, backend)),
        (ops.fvu_auxk_loss, (x, xh, None, 0.25, True, backend)),
        (ops.fvu_auxk_loss, (x, xh, None, 0.25, False, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------- torch.compile


def sae_step(sae, x, dead, k_aux):
    out = sae(x, dead, k_aux)
    out.loss.loss.backward()
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compiled_sae_step_has_no_graph_break(backend, device):
    """torch.compile(fullgraph=True) of a TopKSAE forward; its backward is compiled too (AOT
    autograd traces the registered backward, which calls the backward custom ops). The same
    gradients as eager, and exactly one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    d, m, k, k_aux = 24, 96, 6, 12
    eager = TopKSAE(d, m, k, device=device, backend=backend)
    compiled = TopKSAE(d, m, k, device=device, backend=backend)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(30, d, device=device)
    dead = torch.arange(m, device=device) % 4 == 0
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(compiled, fullgraph=True, backend=counter)
    for _ in range(2):  # the second call reuses the compiled graph
        compiled.zero_grad()
        got = forward(x, dead, k_aux)
        got.loss.loss.backward()
    want = sae_step(eager, x, dead, k_aux)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break"
    torch.testing.assert_close(got.x_hat, want.x_hat)
    torch.testing.assert_close(got.loss.loss, want.loss.loss)
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda s, n=name: f"grad {n}: {s}")


def test_compiled_with_inductor_matches_eager():
    """The default backend (inductor) on the CPU path, dynamic batch sizes included."""
    torch._dynamo.reset()
    sae = TopKSAE(16, 64, 4)
    step = torch.compile(lambda x: sae(x).loss.loss, fullgraph=True, dynamic=True)
    for n in (20, 33):
        x = torch.randn(n, 16)
        sae.zero_grad()
        step(x).backward()
        got = [p.grad.clone() for p in sae.parameters()]
        sae.zero_grad()
        sae(x).loss.loss.backward()
        for a, p in zip(got, sae.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad)


# ----------------------------------------------------------------------- dtypes and autocast


def test_mixed_dtypes_compute_in_the_weights_dtype():
    """bf16 activations with fp32 weights: the ops compute in fp32 (x is cast at the boundary)
    and hand x its gradient in bf16; the same numbers as an explicit cast."""
    p = params()
    x16 = p["x"].detach().bfloat16().requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    we, be, bd, wd = (p[n] for n in ("W_enc", "b_enc", "b_dec", "W_dec"))
    runs = []
    for x in (x16, x32):
        enc = topk_encode(x, we, be, bd, 5)
        x_hat = sparse_decode(enc.values.bfloat16(), enc.indices, wd, bd)
        loss = fvu_auxk_loss(x, x_hat)
        loss.loss.backward()
        runs.append((enc, x_hat, loss, x.grad))
    (enc, x_hat, loss, grad), (enc32, x_hat32, loss32, grad32) = runs
    assert enc.values.dtype == torch.float32 and x_hat.dtype == torch.float32
    assert loss.loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.equal(enc.indices, enc32.indices)
    torch.testing.assert_close(x_hat, x_hat32)
    # x's two gradient terms (encoder, loss) are summed in bf16 here, in fp32 there
    scale = float(grad32.abs().max())
    torch.testing.assert_close(grad.float(), grad32, rtol=2e-2, atol=1e-2 * scale)


@pytest.mark.parametrize(
    "backend,device",
    BACKENDS[:1] + [pytest.param("triton", "cuda", id="triton", marks=pytest.mark.gpu)],
)
def test_autocast_runs_encode_and_decode_in_the_autocast_dtype(backend, device):
    """Inside torch.autocast the encoder and decoder compute in the autocast dtype, like a
    matmul; the loss stays fp32; fp32 parameters get fp32 gradients."""
    p = params(device=device)
    x, we, be, bd, wd = (p[n] for n in ("x", "W_enc", "b_enc", "b_dec", "W_dec"))
    with torch.autocast(device, dtype=torch.bfloat16):
        enc = topk_encode(x, we, be, bd, 5, backend=backend)
        x_hat = sparse_decode(enc.values, enc.indices, wd, bd, backend=backend)
        loss = fvu_auxk_loss(x, x_hat, backend=backend)
    assert enc.values.dtype == x_hat.dtype == torch.bfloat16
    assert loss.loss.dtype == torch.float32
    loss.loss.backward()
    assert all(t.grad.dtype == torch.float32 for t in (x, we, be, bd, wd))
    # the same as casting by hand outside autocast
    q = {n: t.detach().bfloat16().requires_grad_() for n, t in p.items()}
    enc2 = topk_encode(q["x"], q["W_enc"], q["b_enc"], q["b_dec"], 5, backend=backend)
    x_hat2 = sparse_decode(enc2.values, enc2.indices, q["W_dec"], q["b_dec"], backend=backend)
    assert torch.equal(enc.indices, enc2.indices)
    torch.testing.assert_close(x_hat, x_hat2)


def test_float64_runs_the_torch_path_and_triton_refuses_it():
    p = params(dtype=torch.float64)
    enc = topk_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], 4)
    assert enc.values.dtype == torch.float64
    with pytest.raises(ValueError, match="triton backend computes in fp32/bf16/fp16"):
        topk_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], 4, backend="triton")


# ------------------------------------------------------------------------- several GPUs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_runs_on_the_tensors_gpu_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: every launch must go to cuda:1."""
    torch.cuda.set_device(0)
    p = params(n=64, d=64, m=256, device="cuda:1")
    dead = torch.arange(256, device="cuda:1") % 3 == 0

    def step(backend):
        q = {n: t.detach().clone().requires_grad_() for n, t in p.items()}
        enc = topk_encode(q["x"], q["W_enc"], q["b_enc"], q["b_dec"], 16, dead, 24, backend=backend)
        x_hat = sparse_decode(enc.values, enc.indices, q["W_dec"], q["b_dec"], backend=backend)
        aux = sparse_decode(enc.aux_values, enc.aux_indices, q["W_dec"], None, backend=backend)
        fvu_auxk_loss(q["x"], x_hat, aux, backend=backend).loss.backward()
        return [x_hat] + [q[n].grad for n in sorted(q)]

    got, want = step("triton"), step("reference")
    assert torch.cuda.current_device() == 0
    for a, b in zip(got, want, strict=True):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- no Triton

_NO_TRITON = """
import sys
sys.modules["triton"] = None  # every 'import triton' now raises ImportError, as on macOS
sys.modules["triton.language"] = None
import torch
import gsae_kernels
from gsae_kernels import TopKSAE, fvu_auxk_loss, sparse_decode, topk_encode
assert not gsae_kernels.HAS_TRITON
sae = TopKSAE(16, 64, 4)
x = torch.randn(10, 16)
out = sae(x, torch.ones(64, dtype=torch.bool), 6)
out.loss.loss.backward()
assert all(p.grad is not None for p in sae.parameters())
ref = TopKSAE(16, 64, 4, backend="reference")
ref.load_state_dict(sae.state_dict())
torch.testing.assert_close(out.x_hat, ref(x).x_hat)
try:
    topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 4, backend="triton")
except RuntimeError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("the triton backend ran without triton")
print("ok")
"""


def test_imports_and_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# ------------------------------------------------------------------ no state between steps


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_tensor_outlives_the_step(backend, device):
    """Nothing module-level keeps a step's indices (or anything sorted from them) alive."""
    p = params(device=device)
    enc = topk_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], 5, backend=backend)
    x_hat = sparse_decode(enc.values, enc.indices, p["W_dec"], p["b_dec"], backend=backend)
    fvu_auxk_loss(p["x"], x_hat, backend=backend).loss.backward()
    indices = weakref.ref(enc.indices)
    del enc, x_hat
    gc.collect()
    assert indices() is None, "the step's indices are still referenced after the step"


@pytest.mark.parametrize("bound", [7, 300, 1 << 15, 70_000, 1 << 31])
def test_stable_argsort_is_a_stable_sort(bound):
    g = torch.Generator().manual_seed(bound % 1000)
    keys = torch.randint(0, min(bound, 1 << 40), (5000,), generator=g)
    keys[:50] = bound - 1  # the largest key, repeated: stability and the top bits both matter
    want = torch.sort(keys, stable=True).indices
    assert torch.equal(stable_argsort(keys, bound), want)
