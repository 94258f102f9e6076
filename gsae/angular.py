"""Sums of angular distances between layers: the C++ extension (``csrc/gsae_csrc/``) and its
torch path.

``angular_distance_sums(hidden [L, N, d]) -> (sums [L, L] float64, count)`` where
``sums[i, j] = sum_n arccos(cos(hidden[i, n], hidden[j, n])) / pi``. This module is the only one
that touches ``csrc``: the extension is compiled on first use with ``torch.utils.cpp_extension``
and ninja, and cached (per CPU model, since it is built with ``-march=native``). If it cannot be
built, a warning is given once and the torch path is used; ``GSAE_REQUIRE_EXT=1`` makes a failed
build an error instead (CI sets it, so the extension is what CI tests). GPU tensors always take
the torch path, on their device.

For nearly parallel vectors, where ``arccos`` of an fp32 dot product loses most of its digits,
both paths take the angle from the chord between unit vectors, ``2 asin(|u_i - u_j| / 2)``: the
torch path for every pair, the extension for pairs with cos > 0.995 (an arccos of the Gram
entries elsewhere, cheaper and as accurate there).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import platform
import warnings

import torch

ENV_REQUIRE = "GSAE_REQUIRE_EXT"
ENV_DISABLE = "GSAE_DISABLE_EXT"  # force the torch path (benchmarks, debugging)


def _cpu_tag() -> str:
    """Identifies the instruction set the extension is compiled for (shared home directories
    on clusters would otherwise hand one node's -march=native build to another)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


NATIVE_FLAGS = ("-march=native", "-mprefer-vector-width=512")


def build_extension(name: str, arch_flags: tuple[str, ...] = NATIVE_FLAGS) -> None:
    """Compile (or load the cached build of) ``csrc/gsae_csrc/angular.cpp`` under ``name``, which
    registers ``torch.ops.gsae.angular_distance_sums``. Without AVX-512 in ``arch_flags`` the
    portable ``omp simd`` kernel is compiled instead of the intrinsics one (tests build both)."""
    from torch.utils import cpp_extension

    source = importlib.resources.files("gsae_csrc") / "angular.cpp"
    with importlib.resources.as_file(source) as path:
        cpp_extension.load(
            name=name,
            sources=[str(path)],
            # -fopenmp: at::parallel_for is OpenMP inlined from the headers (serial without it)
            extra_cflags=["-O3", *arch_flags, "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )


@functools.cache
def load_extension() -> bool:
    """Build (or load the cached build of) the extension; True when its op is registered."""
    if os.environ.get(ENV_DISABLE, "0") not in ("", "0"):
        return False
    try:
        build_extension(f"gsae_ext_{_cpu_tag()}")
        return hasattr(torch.ops.gsae, "angular_distance_sums")
    except Exception as err:  # a missing compiler, headers or ninja all land here
        if os.environ.get(ENV_REQUIRE, "0") not in ("", "0"):
            message = f"{ENV_REQUIRE} is set but the gsae C++ extension failed to build: {err}"
            raise RuntimeError(message) from err
        warnings.warn(
            f"gsae: the C++ angular-distance extension could not be built ({err}); "
            "using the slower torch path",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def check_hidden(hidden: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden states must be a [L, N, d] tensor, got {shape}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hidden states must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.shape[0] < 1 or hidden.shape[2] < 1:
        raise ValueError(f"hidden states need L >= 1 and d >= 1, got {tuple(hidden.shape)}")


def angular_distance_sums_torch(
    hidden: torch.Tensor, chunk_bytes: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch path (GPU tensors, or when the extension is unavailable), chunked over tokens so
    its extra memory does not grow with N."""
    layers, n, d = hidden.shape
    sums = torch.zeros(layers, layers, dtype=torch.float64, device=hidden.device)
    step = max(1, chunk_bytes // (4 * layers * d))
    for s in range(0, n, step):
        x = hidden[:, s : s + step].float()  # [L, c, d]
        norms = x.norm(dim=2, keepdim=True)
        zero = norms.squeeze(2) == 0  # [L, c]: no direction, so cos is taken as 0
        u = x / torch.where(zero.unsqueeze(2), torch.ones_like(norms), norms)
        for i in range(layers - 1):
            chord = (u[i + 1 :] - u[i]).norm(dim=2)  # [L - i - 1, c]
            angle = 2 * torch.asin((chord / 2).clamp(max=1.0))
            angle = torch.where(zero[i + 1 :] | zero[i], torch.pi / 2, angle)
            sums[i, i + 1 :] += angle.sum(1, dtype=torch.float64)
    sums = (sums + sums.T) / torch.pi
    return sums, torch.tensor(n, dtype=torch.int64, device=hidden.device)


def angular_distance_sums(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [L, L] float64, count)`` for hidden states ``[L, N, d]`` on any device."""
    check_hidden(hidden)
    if hidden.device.type == "cpu" and load_extension():
        return torch.ops.gsae.angular_distance_sums(hidden.contiguous())
    return angular_distance_sums_torch(hidden)
