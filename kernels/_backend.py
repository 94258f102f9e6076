"""Backend choice and input checks shared by every op of gsae_kernels.

Each public op has three implementations:

- ``triton``: fused Triton kernels, for GPU tensors (CUDA and ROCm both appear as ``cuda``);
- ``torch``: torch-native sparse ops (``embedding_bag``, ``sampled_addmm``), what runs on a CPU;
- ``reference``: the dense autograd ground truth of ``reference.py``.

The backend follows the tensors' device unless ``GSAE_KERNELS=reference|torch|triton`` or the
op's ``backend=`` argument forces one. Triton on CPU tensors only works under
``TRITON_INTERPRET=1`` (the tests use that to run the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency; elsewhere the torch path is all there is
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _Shim:
        """Just enough of ``triton``/``tl`` for the kernel definitions to import."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Shim()  # type: ignore[assignment]

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "GSAE_KERNELS"

__all__ = ["BACKENDS", "HAS_TRITON", "resolve_backend", "triton", "tl"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The implementation to run for tensors on ``device``."""
    choice = backend or os.environ.get(ENV_VAR) or None
    if choice is None:
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
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
    return choice


def check_matrix(name: str, t: torch.Tensor, rows: int | None, cols: int | None) -> None:
    """A 2-D floating tensor of the given shape (None = any)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    want = (rows if rows is not None else t.shape[0], cols if cols is not None else t.shape[1])
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_vector(name: str, t: torch.Tensor | None, size: int) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` shares ``ref``'s dtype and device."""
    if not ref.is_floating_point():
        raise ValueError(f"{ref_name} must be a floating tensor, got {ref.dtype}")
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_indices(name: str, idx: torch.Tensor, rows: int) -> None:
    """Shape and dtype only: checking the range here would cost a GPU sync every call."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, k), got {tuple(idx.shape)}")
