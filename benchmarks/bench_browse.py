"""Issue 12: the latent browser's streamed collection.

1. The collection's own cost per 1M tokens: every latent's heaps (top 20 and 10 random windows
   of 32 tokens), firing counts, histogram and the random pool, updated from the top-k latents of
   1M tokens (synthetic top-k of an SAE with d = 256, m = 4096, k = 32: each latent fires on
   k/m of the tokens), against the encode that produced them (the SAE's forward, which any
   consumer of latents pays; on a CPU timed on a prefix and extrapolated). Peak memory at two
   token counts: it must not grow with the tokens.
2. gsae-browse's collection on a demo run (model forward, encode, collection) against the
   model's plain forward over the same tokens.

With --benchmark-disable (CI) the sizes shrink so that the file only has to run.
"""

import time

import torch
from conftest import forward_seconds, peak_extra_bytes

from gsae.browse.collect import CollectConfig, SaeCollector, _Batch
from gsae.sae import Sae, SaeConfig

D, M, K, CTX, BATCH = 256, 4096, 32, 1024, 8  # 8 sequences of 1024 tokens per batch


def synthetic_batch(g: torch.Generator, device="cpu"):
    """A batch's top-k latents ([B*T, K], distinct per token; ~90% firing) and its layout."""
    n = BATCH * CTX
    idx = torch.rand(n, M, generator=g).topk(K, dim=1, sorted=False).indices
    val = (torch.rand(n, K, generator=g) * 2 - 0.2).clamp_min(0)
    ids = torch.randint(0, 50000, (BATCH, CTX), generator=g)
    mask = torch.ones(BATCH, CTX, dtype=torch.long)
    return idx.to(device), val.to(device), ids.to(device), mask.to(device)


def collect_tokens(n: int, batches: list, device="cpu") -> tuple[float, SaeCollector]:
    sae = Sae(SaeConfig(d=D, num_latents=M, k=K), layers=[0], device=device)
    cfg = CollectConfig(window=32, top=20, random=10, pool=128)
    collector = SaeCollector("bench", sae, cfg, device, torch.Generator(device).manual_seed(0))
    seen = 0
    start = time.perf_counter()
    while seen < n:
        idx, val, ids, mask = batches[(seen // (BATCH * CTX)) % len(batches)]
        view = _Batch.make(ids, mask, seen // CTX, cfg.window)
        collector.add(0, val, idx, view)
        seen += BATCH * CTX
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start, collector


def encode_seconds(n: int, device="cpu") -> float:
    sae = Sae(SaeConfig(d=D, num_latents=M, k=K), layers=[0], device=device)
    x = torch.randn(BATCH * CTX, D, device=device)
    sae.encode(x, layer=0)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(max(1, n // (BATCH * CTX))):
            sae.encode(x, layer=0)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def test_collection_cost_per_million_tokens(benchmark, report):
    benchmark.group = "browse-collect"
    n = 2 * BATCH * CTX if benchmark.disabled else 1_048_576
    prefix = BATCH * CTX if benchmark.disabled else 8 * BATCH * CTX
    g = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(g) for _ in range(4)]  # cycled: generating them is not timed
    result = {}

    def run():
        result["collect"] = collect_tokens(n, batches)
        result["encode"] = encode_seconds(prefix)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    (t_collect, collector), t_encode = result["collect"], result["encode"]
    per_million = t_collect / n * 1e6
    encode_per_million = t_encode / prefix * 1e6
    case = f"collection d={D} m={M} k={K}, {n:,} tokens"
    report(case, "collection s per 1M tokens (CPU)", f"{per_million:.1f}")
    report(
        case, "SAE encode s per 1M tokens (CPU)", f"{encode_per_million:.1f} (timed on {prefix:,})"
    )
    report(case, "collection / encode", f"{per_million / encode_per_million:.2f}x")
    report(case, "state held (fixed)", f"{collector.nbytes / 2**20:.0f} MiB")
    assert int(collector.fired.sum()) > 0


SETUP = """
import torch, sys
sys.path.insert(0, {here!r})
from bench_browse import synthetic_batch, collect_tokens
g = torch.Generator().manual_seed(0)
batches = [synthetic_batch(g) for _ in range(2)]
"""


def test_collection_memory_does_not_grow_with_tokens(benchmark, report):
    benchmark.group = "browse-collect"
    from pathlib import Path

    small, large = (BATCH * CTX, 3 * BATCH * CTX) if benchmark.disabled else (131_072, 1_048_576)
    setup = SETUP.format(here=str(Path(__file__).parent))
    peaks = {}

    def run():
        for n in (small, large):
            peaks[n] = peak_extra_bytes(setup, f"collect_tokens({n}, batches)")

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    case = f"collection d={D} m={M} k={K}"
    report(case, f"peak extra memory, {small:,} tokens", f"{peaks[small] / 2**20:.0f} MiB")
    report(case, f"peak extra memory, {large:,} tokens", f"{peaks[large] / 2**20:.0f} MiB")
    report(case, "peak ratio (1 = independent of tokens)", f"{peaks[large] / peaks[small]:.2f}")


def test_browse_collection_on_a_demo_run(benchmark, report, tmp_path):
    """gsae-browse's pass (forward, encode, collection) against the plain forward."""
    benchmark.group = "browse-demo"
    from gsae.browse.collect import collect
    from gsae.cli.train import main as train_main
    from gsae.hf.models import load_model
    from gsae.hf.texts import iter_texts
    from gsae.hf.tokens import TokenStream

    tokens = 4096 if benchmark.disabled else 131_072
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--model",
                "demo",
                "--dataset",
                "demo",
                "--out",
                str(run),
                "--groups",
                "even:2",
                "--tokens",
                "4k",
                "--scale-tokens",
                "2k",
                "--batch-tokens",
                "1024",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    result = {}

    def forward():
        loaded = load_model("demo", "fp32", "cpu")
        with TokenStream(
            lambda: iter_texts("demo"), loaded.tokenizer, ctx_len=128, batch_size=64
        ) as stream:
            return forward_seconds(loaded, stream, tokens)

    def run_both():
        result["forward"] = forward()
        start = time.perf_counter()
        result["collection"] = collect(run, tokens=tokens, batch_tokens=8192, device="cpu")
        result["browse"] = time.perf_counter() - start

    benchmark.pedantic(run_both, rounds=1, warmup_rounds=0)
    case = f"gsae-browse collection, demo run (6 layers, m=2048, k=32), {tokens:,} tokens"
    report(case, "tokens/s", f"{tokens / result['browse']:,.0f}")
    report(case, "plain forward tokens/s", f"{tokens / result['forward']:,.0f}")
    report(case, "cost vs the forward alone", f"{result['browse'] / result['forward']:.1f}x")
