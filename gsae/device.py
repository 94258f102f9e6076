"""Where a command runs and in what dtype: the one policy for ``--device`` and the model forward's
dtype (every command resolves them here), and host-to-device copies that do not block."""

from __future__ import annotations

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(name: str) -> str:
    """``auto``: the GPU when there is one (CUDA or ROCm), else the CPU; other names as given,
    once checked: a name torch does not know, or a GPU this torch cannot use (a CPU-only build,
    no driver, an index beyond the GPUs there are), is a ValueError naming it, before any work."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"--device {name}: gsae runs on cpu or a GPU (cuda, cuda:N)")
    if not backend.is_available():
        cpu_build = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
        why = "it is a CPU-only build" if cpu_build else "it finds no GPU or driver"
        raise ValueError(
            f"--device {name}: this torch cannot use a {device.type} device "
            f"({why}); pass --device cpu, or auto"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: this machine has {count} {device.type} device(s) "
            f"({device.type}:0..{device.type}:{count - 1})"
        )
    return name


def default_dtype(device: str) -> str:
    """The model forward's dtype when none is asked for, the same for every command: bf16 on a
    GPU, fp32 on a CPU (which has no fast bf16 matmul, and where fp32 is the paper's setting)."""
    return "fp32" if torch.device(resolve_device(device)).type == "cpu" else "bf16"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a GPU from pinned memory, so the copy is
    asynchronous (from pageable memory ``non_blocking=True`` is a synchronous staged copy)."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
