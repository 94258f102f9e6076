"""Backend choice, dtype policy, device guard and input checks shared by every op of gsae_kernels.

Each public op has three implementations:

- ``triton``: fused Triton kernels, for GPU tensors (CUDA and ROCm both appear as ``cuda``);
- ``torch``: torch-native sparse ops (``embedding_bag``, ``sampled_addmm``), what runs on a CPU;
- ``reference``: the dense autograd ground truth of ``reference.py``.

The backend follows the tensors' device unless ``GSAE_KERNELS=reference|torch|triton`` or the
op's ``backend=`` argument forces one. Triton on CPU tensors only works under
``TRITON_INTERPRET=1`` (the tests use that to run the kernels without a GPU). float64 runs the
torch path on every device: the Triton kernels compute in fp32 (inputs fp32, bf16 or fp16).

Dtype policy (see :func:`compute_dtype`): ``topk_encode`` and ``sparse_decode`` compute in the
autocast dtype inside ``torch.autocast`` for the tensors' device type, and otherwise in their
weight's dtype; the other floating inputs are cast to it at the boundary, so their gradients
come back in their own dtype. ``fvu_auxk_loss`` is never autocast: it reads each input in its
own dtype and sums in fp32 (fp64 if an input is fp64).
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is a Linux-only dependency; elsewhere the torch path is all there is
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # exercised by tests/kernels/test_ops.py (test_imports_and_runs_without_triton)
    HAS_TRITON = False

    class _Shim:
        """Just enough of ``triton``/``tl`` for the kernel definitions to import: module-level
        ``tl.constexpr(value)`` constants and ``@triton.jit`` decorators."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Shim()  # type: ignore[assignment]

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "GSAE_KERNELS"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["BACKENDS", "HAS_TRITON", "compute_dtype", "resolve_backend", "triton", "tl"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(
    device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The implementation to run for ``dtype`` tensors on ``device``."""
    choice = backend or os.environ.get(ENV_VAR) or None
    if choice is None:
        fits = dtype is None or dtype in TRITON_DTYPES
        return "triton" if device.type == "cuda" and HAS_TRITON and fits else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}/backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("the triton backend was asked for but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"the triton backend needs GPU tensors, got {device.type} tensors "
                "(set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)"
            )
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise ValueError(
                f"the triton backend computes in fp32/bf16/fp16, not {dtype}: "
                "use the torch backend for it"
            )
    return choice


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype ``topk_encode``/``sparse_decode`` compute in: the autocast dtype inside
    ``torch.autocast`` for the weight's device type, else the weight's own dtype."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (differentiable: the gradient comes back in t's own dtype)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def launch_guard(t: torch.Tensor):
    """Run what follows on ``t``'s device: Triton launches on the *current* CUDA device, so a
    tensor on cuda:1 while cuda:0 is current needs this around every launch. Also turns autocast
    off inside an op's implementation (its inputs were cast already; its internal fp32 sums
    must stay fp32)."""
    stack = contextlib.ExitStack()
    if t.device.type == "cuda":
        stack.enter_context(torch.cuda.device(t.device))
    if torch.is_autocast_enabled(t.device.type):
        stack.enter_context(torch.autocast(t.device.type, enabled=False))
    return stack


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def empty_like_none(t: torch.Tensor) -> torch.Tensor:
    """A 0-element stand-in for an absent output (custom ops cannot return None)."""
    return t.new_empty(0)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_matrix(name: str, t: torch.Tensor, rows: int | None, cols: int | None) -> None:
    """A 2-D tensor of the given shape (None = any)."""
    check_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    want = (rows if rows is not None else t.shape[0], cols if cols is not None else t.shape[1])
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_vector(name: str, t: torch.Tensor | None, size: int) -> None:
    """None, or a 1-D tensor of ``size`` elements."""
    if t is None:
        return
    check_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")


def check_floating(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor is floating point and on ``ref``'s device (dtypes may differ: see
    :func:`compute_dtype` for what each op computes in)."""
    for name, t in {ref_name: ref, **others}.items():
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_indices(name: str, idx: torch.Tensor, rows: int, num_latents: int) -> None:
    """Shape and dtype always; the range only for CPU tensors, where it is cheap (on a GPU it
    would cost a host sync every call: out-of-range ids there are undefined behaviour)."""
    check_tensor(name, idx)
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int64 or int32 tensor, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, k), got {tuple(idx.shape)}")
    if idx.device.type == "cpu" and idx.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_latents:
            raise ValueError(f"{name} must lie in [0, {num_latents}), got ids from {lo} to {hi}")
