"""Benchmark helpers. Targets are ratios against a baseline timed in the same run, printed in a
table at the end of the session (never asserted: the machine's speed is not the code's)."""

import time

import pytest
import torch

_ROWS: list[tuple[str, str, str]] = []


def interleaved(fns: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Run every function once per round, in turn, so slow spells of a shared machine hit them
    alike; return the median and the minimum seconds of each."""
    for fn in fns.values():
        fn()  # warm-up: allocator, caches, lazy init
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {n: {"median": sorted(t)[len(t) // 2], "min": min(t)} for n, t in times.items()}


@pytest.fixture
def rounds(benchmark):
    """Rounds for the interleaved comparisons: one when benchmarks are disabled (CI smoke)."""
    return 1 if benchmark.disabled else 7


@pytest.fixture(scope="session")
def report():
    def add(case: str, metric: str, value: str) -> None:
        _ROWS.append((case, metric, value))

    return add


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.section("gsae benchmark ratios (same-run baselines)")
    width = max(len(c) for c, _, _ in _ROWS)
    for case, metric, value in _ROWS:
        terminalreporter.write_line(f"{case:<{width}}  {metric:<38} {value}")


# gsae-train on the bundled demo model and corpus, as the benchmarks train it (each adds --out
# and --tokens): distances from 20k tokens, scales from 8k, on the CPU
DEMO_TRAIN = [
    "--model",
    "demo",
    "--dataset",
    "demo",
    "--grouping-tokens",
    "20k",
    "--scale-tokens",
    "8k",
    "--log-every",
    "1000",
    "--device",
    "cpu",
]


def forward_seconds(loaded, batches, tokens: int) -> float:
    """Seconds of the plain forward that a command's cost is compared with: every layer's
    residual stream read (ActivationReader) from ``batches`` until ``tokens`` tokens."""
    from gsae.hf.hooks import ActivationReader

    reader = ActivationReader(loaded, list(range(loaded.num_layers)))
    seen, start = 0, time.perf_counter()
    for batch in batches:
        reader(batch.input_ids, batch.attention_mask)
        seen += batch.num_tokens
        if seen >= tokens:
            break
    return time.perf_counter() - start


def gpu_available() -> bool:
    return torch.cuda.is_available()


_MEASURE = """
def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: set-up peaks must not count
    f.write("5")
_base = _rss()
{work}
# VmHWM, not ru_maxrss: the latter carries the parent's peak across fork + exec
with open("/proc/self/status") as f:
    _hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(_hwm - _base)
"""


def peak_extra_bytes(setup: str, work: str) -> int:
    """Peak resident memory that ``work`` adds on top of ``setup``, in a fresh process (so
    nothing this process allocated counts)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(setup) + _MEASURE.format(work=textwrap.dedent(work))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])
