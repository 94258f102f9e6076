"""Issue 4: gsae-train on the bundled demo model (CPU).

Reports end-to-end tokens/s with the loop time split into data, model forward and SAE steps,
and checks the compute saving that grouping predicts against the one measured: the wall-clock
of --groups auto against --groups per-layer on the same tokens, compared with Delta(G) computed
(gsae.grouping.compute_savings) from the forward and SAE-step costs measured in the per-layer run.
Target: they agree within 10%.
"""

import json

import pytest
from conftest import DEMO_TRAIN, interleaved

from gsae import grouping as gp
from gsae.cli.train import main as train_main
from gsae.hf.hub import bundled_dir

DEMO = bundled_dir() / "model"


def run(tmp_path, name, extra):
    out = tmp_path / name
    argv = [*DEMO_TRAIN, "--out", str(out), "--tokens", "60k", *extra]
    assert train_main(argv) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built")
def test_demo_throughput_and_predicted_savings(benchmark, report, tmp_path):
    benchmark.group = "train-demo"
    results = {}

    def both():
        results["auto"] = run(tmp_path, "auto", ["--groups", "auto"])
        results["per-layer"] = run(tmp_path, "per-layer", ["--groups", "per-layer"])

    benchmark.pedantic(both, rounds=1, warmup_rounds=0)
    auto, per = results["auto"], results["per-layer"]
    for name, s in results.items():
        split = s["seconds_split"]
        loop = sum(split.values())
        parts = ", ".join(f"{k} {100 * v / loop:.0f}%" for k, v in split.items())
        report(
            f"demo --groups {name}",
            "tokens/s (SAEs)",
            f"{s['tokens'] / loop:,.0f} ({len(s['groups'])})",
        )
        report(f"demo --groups {name}", "loop time split", parts)
    # measured unit costs from the per-layer run: A per token, T per token per SAE
    tokens, n_layers = per["tokens"], len(per["groups"])
    a_cost = (per["seconds_split"]["forward"] + per["seconds_split"]["data"]) / tokens
    t_cost = per["seconds_split"]["sae"] / tokens / n_layers
    n_auto = len(auto["groups"])
    predicted = gp.compute_savings(n_auto, n_layers, a_cost, t_cost)
    measured = sum(auto["seconds_split"].values()) / sum(per["seconds_split"].values()) - 1
    case = f"demo: {n_auto} SAEs vs {n_layers}"
    report(case, "Delta(G) predicted from measured costs", f"{100 * predicted:.1f}%")
    report(case, "Delta(G) measured (wall-clock of the loop)", f"{100 * measured:.1f}%")
    rel = abs((1 + measured) - (1 + predicted)) / (1 + predicted)
    report(case, "|measured - predicted| / (1 + predicted) (target <= 10%)", f"{100 * rel:.1f}%")


class _OneTokenPerChar:
    eos_token_id, pad_token_id, sep_token_id = 0, None, None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _quadratic_packing(tokens: list[int], ctx: int) -> int:
    """The packer before issue 9, as the same-run baseline: a list carry cut from the front and
    copied into every chunk's position."""
    carry, chunks = list(tokens), 0
    while len(carry) >= ctx:
        chunk = carry[:ctx]
        del carry[:ctx]
        position = list(carry)  # noqa: F841 (the old StreamPosition copy)
        chunks += len(chunk) // ctx
    return chunks


def test_packing_a_long_document(benchmark, report, rounds):
    """TokenStream on one long document (a Pile document can have millions of tokens): tokens/s
    at two lengths; linear packing keeps tokens/s flat as the document grows."""
    from gsae.hf.tokens import TokenStream

    benchmark.group = "token-packing"
    ctx = 1024

    def packed(n: int):
        def run():
            stream = TokenStream(
                lambda: iter(["x" * n]), _OneTokenPerChar(), ctx_len=ctx, batch_size=32
            )
            with stream:
                return sum(b.input_ids.shape[0] for b in stream)

        return run

    def old(n: int):
        tokens = [120] * n
        return lambda: _quadratic_packing(tokens, ctx)

    sizes = (250_000, 1_000_000)
    fns = {f"{kind} {n:,}": f(n) for n in sizes for kind, f in (("new", packed), ("old", old))}
    times = interleaved(fns, max(1, rounds // 3))
    benchmark.pedantic(lambda: None, rounds=1)
    for n in sizes:
        new_t, old_t = times[f"new {n:,}"]["median"], times[f"old {n:,}"]["median"]
        report(
            f"pack one {n:,}-token document",
            "tokens/s new (old: list carry)",
            f"{n / new_t:,.0f} ({n / old_t:,.0f}); {old_t / new_t:.1f}x",
        )
