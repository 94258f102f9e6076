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


def gpu_available() -> bool:
    return torch.cuda.is_available()
