"""Counts and sizes as users type them: ``10M`` tokens, ``4G`` of memory (read by the commands'
flags and by the run settings, so they live below both)."""

from __future__ import annotations

import math


def parse_count(text: str | int) -> int:
    """``"10M"`` -> 10_000_000; also k/K, M, B/G, T suffixes and plain or scientific numbers."""
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(s[-1:].lower())
    try:
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (try 10M, 500k, 1B or 1e6)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a count: {text!r}")
    return int(round(value))


def parse_bytes(text: str, flag: str | None = None) -> int:
    """``4G`` -> 4 GiB; also K, M, T and plain byte counts. ``flag``: named in the errors."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        where = f"{flag}: " if flag else ""
        raise ValueError(f"{where}not a memory size: {text!r} (try 4G or 512M)") from None
    if value <= 0:
        raise ValueError(f"{flag or 'a memory size'} must be > 0, got {text!r}")
    return int(value)
