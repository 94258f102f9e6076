"""Issue 10: gsae-eval.

1. MMCO counts (Eqs. 12-15) over 1M tokens at m = 4096, k = 32 (synthetic top-k indices, as an
   SAE with d = 256 and 16x latents gives), against the obvious baseline, a chunked matmul of
   dense 0/1 matrices, in the same run: tokens/s, and peak memory at two token counts (it must
   not grow with the tokens). The dense baseline costs 2 n m^2: on a CPU it is timed on a prefix
   and its rate extrapolated (GSAE_BENCH_FULL=1 times it over all 1M tokens).
2. A full gsae-eval of a demo run (downstream, MMCO, figures) against the model's plain forward
   over the same tokens: tokens/s, the cost ratio, and peak memory at two token counts.

With --benchmark-disable (CI) the sizes shrink so that the file only has to run.
"""

import os
import time

import pytest
import torch
from conftest import forward_seconds, gpu_available, peak_extra_bytes

from gsae.eval.similarity import CoOccurrence

M, K, CHUNK = 4096, 32, 16384


def synthetic_latents(n: int, seed: int):
    """Top-k indices of ``n`` tokens (distinct per token) and which fired (90%), in chunks."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, CHUNK):
        c = min(CHUNK, n - start)
        idx = torch.rand(c, M, generator=g).topk(K, dim=1, sorted=False).indices  # [c, K]
        yield idx, torch.rand(c, K, generator=g) < 0.9


def count(method: str, n: int, device="cpu") -> tuple[float, CoOccurrence]:
    co = CoOccurrence(M, M, device=device, method=method)
    data = [(a, b) for a, b in zip(synthetic_latents(n, 1), synthetic_latents(n, 2), strict=True)]
    if device != "cpu":
        data = [
            ((a[0].to(device), a[1].to(device)), (b[0].to(device), b[1].to(device)))
            for a, b in data
        ]
        torch.cuda.synchronize()
    start = time.perf_counter()
    for (ia, oa), (ib, ob) in data:
        co.update(ia, oa, ib, ob)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, co


def test_mmco_counts_one_million_tokens(benchmark, report):
    benchmark.group = "eval-mmco"
    n = 4096 if benchmark.disabled else 1_000_000
    full = os.environ.get("GSAE_BENCH_FULL") == "1"
    prefix = n if full or benchmark.disabled else 65536
    result = {}

    def run():
        result["scatter"] = count("scatter", n)
        result["dense"] = count("dense", prefix)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    (t_sparse, co), (t_dense, dense) = result["scatter"], result["dense"]
    # both count the same thing: compare on the dense run's tokens
    same = CoOccurrence(M, M, method="scatter")
    for (ia, oa), (ib, ob) in zip(
        synthetic_latents(prefix, 1), synthetic_latents(prefix, 2), strict=True
    ):
        same.update(ia, oa, ib, ob)
    assert torch.equal(same.and_counts, dense.and_counts)
    case = f"MMCO counts m={M} k={K}, {n:,} tokens"
    sparse_rate, dense_rate = n / t_sparse, prefix / t_dense
    report(case, "scatter (gsae, CPU) tokens/s", f"{sparse_rate:,.0f} ({t_sparse:.1f} s)")
    note = "" if prefix == n else f", timed on {prefix:,} tokens"
    report(case, "dense 0/1 matmul (baseline) tokens/s", f"{dense_rate:,.0f}{note}")
    report(case, "scatter / dense speed", f"{sparse_rate / dense_rate:.1f}x")
    start = time.perf_counter()
    value = co.mmco()
    report(case, "MMCO from the counts (Eq. 17) s", f"{time.perf_counter() - start:.2f}")
    assert 0 < value.mmco < 1


_MMCO_SETUP = """
import torch
from gsae.eval.similarity import CoOccurrence
co = CoOccurrence({m}, {m}, method="scatter")
g = torch.Generator().manual_seed(0)
"""
_MMCO_WORK = """
for _ in range({chunks}):
    a = torch.randint(0, {m}, ({chunk}, {k}), generator=g)
    b = torch.randint(0, {m}, ({chunk}, {k}), generator=g)
    on = torch.ones({chunk}, {k}, dtype=torch.bool)
    co.update(a, on, b, on)
co.mmco()
"""


def test_mmco_peak_memory_does_not_grow_with_tokens(benchmark, report):
    benchmark.group = "eval-mmco-memory"
    chunks = (1, 2) if benchmark.disabled else (8, 32)
    peaks = {}

    def measure():
        for c in chunks:
            work = _MMCO_WORK.format(chunks=c, chunk=8192, m=M, k=K)
            peaks[c] = peak_extra_bytes(_MMCO_SETUP.format(m=M), work)

    benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    counts_mb = CoOccurrence.nbytes(M, M) / 2**20
    for c, peak in peaks.items():
        value = f"{peak / 2**20:.0f} (counts: {counts_mb:.0f} MiB, allocated in set-up)"
        report(f"MMCO m={M} k={K}", f"peak extra MiB over {c * 8192:,} tokens", value)


@pytest.mark.skipif(not gpu_available(), reason="needs a GPU")
def test_mmco_on_gpu(benchmark, report):
    benchmark.group = "eval-mmco-gpu"
    n = 1_000_000
    result = {}

    def run():
        result["dense"] = count("dense", n, "cuda")
        result["scatter"] = count("scatter", n, "cuda")

    benchmark.pedantic(run, rounds=1, warmup_rounds=1)
    assert torch.equal(result["dense"][1].and_counts, result["scatter"][1].and_counts)
    for name, (seconds, _) in result.items():
        report(f"MMCO GPU m={M} k={K}", f"{name} tokens/s", f"{n / seconds:,.0f}")


# --------------------------------------------------------------------------------------------
# gsae-eval of a demo run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, request):
    from gsae.cli.train import main as train_main

    root = tmp_path_factory.mktemp("bench-eval")
    small = request.config.getoption("benchmark_disable")  # CI: it only has to run
    tokens = ("4k", "4k", "2k") if small else ("30k", "20k", "8k")
    common = [
        "--model",
        "demo",
        "--dataset",
        "demo",
        "--tokens",
        tokens[0],
        "--grouping-tokens",
        tokens[1],
        "--scale-tokens",
        tokens[2],
        "--log-every",
        "1000",
        "--device",
        "cpu",
    ]
    for groups in ("auto", "per-layer"):
        assert train_main([*common, "--groups", groups, "--out", str(root / groups)]) == 0
    return root


_EVAL_SETUP = """
from gsae.eval import prepare, run_plan
from gsae.eval.report import write_report
plan = prepare([r"{root}/auto"], baseline=r"{root}/per-layer", tokens={tokens},
               batch_tokens=2048, device="cpu")
"""
_EVAL_WORK = """
result = run_plan(plan)
write_report(result, plan, r"{root}/out-{tokens}")
"""


def test_gsae_eval_of_a_demo_run(benchmark, report, demo_runs):
    from gsae.eval import prepare, run_plan
    from gsae.eval.report import write_report

    benchmark.group = "eval-demo"
    tokens = 1024 if benchmark.disabled else 32768
    seconds = {}

    def evaluate(**kwargs):
        plan = prepare(
            [demo_runs / "auto"],
            baseline=demo_runs / "per-layer",
            tokens=tokens,
            batch_tokens=2048,
            device="cpu",
            **kwargs,
        )
        start = time.perf_counter()
        result = run_plan(plan)
        write_report(result, plan, demo_runs / "out")
        return time.perf_counter() - start, plan

    def forward_only():
        plan = prepare(
            [demo_runs / "auto"], tokens=tokens, batch_tokens=2048, device="cpu", downstream=False
        )
        return forward_seconds(plan.loaded, plan.batches(), tokens)

    def run():
        seconds["full"], plan = evaluate()
        seconds["no downstream"], _ = evaluate(downstream=False)
        seconds["forward only"] = forward_only()
        layers = plan.loaded.num_layers  # clean + zero ablations + one per SAE layer
        seconds["forwards per batch"] = 1 + layers + sum(len(r.layers) for r in plan.runs)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    case = f"gsae-eval demo: auto vs per-layer, {tokens:,} tokens"
    for name in ("full", "no downstream", "forward only"):
        report(case, f"{name} tokens/s", f"{tokens / seconds[name]:,.0f}")
    report(
        case,
        "full / one plain forward (time)",
        f"{seconds['full'] / seconds['forward only']:.1f}x "
        f"({seconds['forwards per batch']} forwards per batch)",
    )
    if benchmark.disabled:
        return
    peaks = {
        t: peak_extra_bytes(
            _EVAL_SETUP.format(root=demo_runs, tokens=t),
            _EVAL_WORK.format(root=demo_runs, tokens=t),
        )
        for t in (tokens // 4, tokens)
    }
    for t, peak in peaks.items():
        report(case, f"peak extra MiB, {t:,} tokens", f"{peak / 2**20:.0f}")
