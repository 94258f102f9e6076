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
import socket
import sys
import time
import warnings
from pathlib import Path

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


# torch's build lock ("lock" in the build folder) has no owner: a process killed while building
# (SIGTERM, OOM, a closed terminal) leaves it, and every later build waits for it forever.
# Each gsae process that builds records itself beside it, so a lock whose recorded builders have
# all died is known to be stale; one nobody recorded is waited for until it is this old.
LOCK_STALE_AFTER = 300.0  # seconds; the build takes ~30 s on 2 cores
OWNER_PREFIX = "gsae-building."  # + host.pid


class ExtensionLockError(RuntimeError):
    """A lock left in the extension's build folder by a build that did not finish."""


def build_extension(name: str, arch_flags: tuple[str, ...] = NATIVE_FLAGS) -> None:
    """Compile (or load the cached build of) ``csrc/gsae_csrc/angular.cpp`` under ``name``, which
    registers ``torch.ops.gsae.angular_distance_sums``. Without AVX-512 in ``arch_flags`` the
    portable ``omp simd`` kernel is compiled instead of the intrinsics one (tests build both).

    A lock left by a build that was killed is cleared (or named, see :func:`clear_stale_lock`);
    a Ctrl-C during the build raises KeyboardInterrupt (ninja reports it as a failed build)."""
    from torch.utils import cpp_extension

    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    clear_stale_lock(folder)
    owner = folder / f"{OWNER_PREFIX}{socket.gethostname()}.{os.getpid()}"
    owner.touch()
    if not (folder / f"{name}.so").exists():  # the first build is silent and takes a while
        print(
            f"gsae: compiling the C++ angular-distance extension into {folder} (once)",
            file=sys.stderr,
        )
    source = importlib.resources.files("gsae_csrc") / "angular.cpp"
    try:
        with importlib.resources.as_file(source) as path:
            cpp_extension.load(
                name=name,
                sources=[str(path)],
                # -fopenmp: at::parallel_for is OpenMP inlined from the headers (serial without)
                extra_cflags=["-O3", *arch_flags, "-fopenmp", "-fno-math-errno"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    except RuntimeError as err:
        if "interrupted by user" in str(err):  # ninja got the Ctrl-C (SIGINT) first
            raise KeyboardInterrupt from None
        raise
    finally:
        owner.unlink(missing_ok=True)


def clear_stale_lock(folder: Path, stale_after: float | None = None, poll: float = 0.2) -> None:
    """Wait while another process builds in ``folder``; remove a lock whose recorded gsae
    builders have all exited; raise :class:`ExtensionLockError`, naming the lock and what to
    do, for one that no builder known to run holds once it is ``stale_after`` seconds old
    (None: ``LOCK_STALE_AFTER`` as it is when called, not when this module was loaded)."""
    stale_after = LOCK_STALE_AFTER if stale_after is None else stale_after
    lock = folder / "lock"
    said = False
    while lock.exists():
        owners = {
            p: _running(p.name.removeprefix(OWNER_PREFIX)) for p in folder.glob(OWNER_PREFIX + "*")
        }
        for record, running in owners.items():
            if running is False:
                record.unlink(missing_ok=True)
        if owners and not any(r is not False for r in owners.values()):
            lock.unlink(missing_ok=True)  # its builders are gone: the lock is theirs
            return
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            return
        if age > stale_after and True not in owners.values():
            raise ExtensionLockError(
                f"{lock} was left by a build of gsae's C++ extension that did not finish "
                f"({age / 60:.0f} minutes ago); if no other process is building it, remove it "
                f"(rm {lock}) and run the command again"
            )
        if not said:
            print(
                f"gsae: waiting for another process to build the C++ extension (lock {lock})",
                file=sys.stderr,
            )
            said = True
        time.sleep(poll)


def _running(owner: str) -> bool | None:
    """Whether the builder ``host.pid`` still runs; None when it cannot be told (another
    machine sharing the folder)."""
    host, _, pid = owner.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@functools.cache
def load_extension() -> bool:
    """Build (or load the cached build of) the extension; True when its op is registered."""
    if os.environ.get(ENV_DISABLE, "0") not in ("", "0"):
        return False
    try:
        build_extension(f"gsae_ext_{_cpu_tag()}")
        return hasattr(torch.ops.gsae, "angular_distance_sums")
    except Exception as err:  # a missing compiler, headers or ninja, a stale lock all land here
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
