"""Issue 18: the cost in held-out FVU of the bf16 encoder matmul (gsae-train's default on a GPU)
against the paper's fp32, on the demo model at equal tokens and batches.

On a CPU bf16 is emulated exactly as a tensor core computes it: the operands rounded to bf16,
the products (exact in fp32) summed in fp32 (``gsae_kernels.topk_encode.round_operand``). The
held-out FVU of both is evaluated in fp32. tf32 is printed for information."""

import pytest
from bench_quality import (  # noqa: F401  (demo_activations: a fixture used by name)
    DEMO,
    DEMO_DEAD,
    DEMO_K,
    DEMO_M,
    Quality,
    demo_activations,
    demo_batches,
    train,
)

from gsae.sae import Sae, SaeConfig
from gsae.train.step import SaeTrainer

PRECISIONS = ("fp32", "bf16", "tf32")
DEMO_STEPS = 98  # 200,704 tokens per layer in batches of 2,048


class PrecisionRun:
    """gsae's default trainer with the encoder matmul in ``precision``; evaluated in fp32."""

    def __init__(self, d, precision):
        cfg = SaeConfig(d=d, num_latents=DEMO_M, k=DEMO_K, dead_threshold=DEMO_DEAD)
        self.trainer = SaeTrainer(Sae(cfg), precision=precision)

    def step(self, x):
        self.trainer.step(x)

    def evaluate(self, x):
        out = self.trainer.sae(x)  # precision None: fp32 on a CPU
        return float(out.loss.fvu), float((out.latents.values > 0).sum(1).float().mean())

    def dead(self):
        return float(self.trainer.dead_mask().float().mean())


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built")
def test_precision_cost_demo(benchmark, report, demo_activations):  # noqa: F811
    smoke = benchmark.disabled
    layers = [3] if smoke else sorted(demo_activations)
    steps = 5 if smoke else DEMO_STEPS
    results: dict[str, dict[int, Quality]] = {p: {} for p in PRECISIONS}

    def run_all():
        for layer in layers:
            train_x, held = demo_activations[layer]
            for precision in PRECISIONS:
                run = PrecisionRun(train_x.shape[1], precision)
                results[precision][layer] = train(run, demo_batches(train_x, steps), held)

    benchmark.group = "precision-demo"
    benchmark.pedantic(run_all, rounds=1, warmup_rounds=0)
    case = f"demo, {len(layers)} layers, {steps * 2048:,} tokens"
    for precision in PRECISIONS:
        fvus = [results[precision][la].fvu for la in layers]
        report(case, f"held-out FVU {precision}", " ".join(f"{f:.4f}" for f in fvus))
    for precision in ("bf16", "tf32"):
        ratios = [results[precision][la].fvu / results["fp32"][la].fvu for la in layers]
        mean = sum(ratios) / len(ratios)
        report(case, f"FVU {precision} / fp32: max / mean", f"{max(ratios):.4f} / {mean:.4f}")
