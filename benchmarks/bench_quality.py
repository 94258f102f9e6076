"""Issue 8: SAE quality at equal tokens, gsae against sparsify's SparseCoder on the same batches.

Real activations: every layer of the bundled demo model, 200k training tokens (98 steps of 2,048,
in stream order), k = 32, m = 2,048, held-out FVU on 50k later tokens. Synthetic: d = 256, 200
steps of 4,096 (gsae.synthetic.SparseFeatures, whose true directions are known). Each SAE is
trained by the same loop on the same batches, normalised the same way: gsae's own
``SaeTrainer``, and for sparsify (``pip install eai-sparsify``; skipped without it) its
``SparseCoder`` with the loss, AuxK, gradient projection, decoder renormalisation and
first-batch ``b_dec`` of sparsify's own trainer, and the same optimiser and learning rate.

Targets (issue 8): gsae's FVU <= sparsify's on every demo layer and <= 0.9x on average, with Adam
at the paper's learning rate; synthetic FVU <= 0.134 with >= 90% of directions recovered.
Printed, never asserted. With ``--benchmark-disable`` (the CI smoke run) the budgets shrink.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import pytest
import torch

from gsae.activations import ActivationReader, TokenStream, bundled_dir, iter_texts, load_model
from gsae.sae import Sae, SaeConfig, SaeTrainer, activation_scale
from gsae.synthetic import SparseFeatures

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
DEMO = bundled_dir() / "model"
DEMO_BATCH, DEMO_STEPS, DEMO_HELD_OUT = 2048, 98, 50_000
DEMO_M, DEMO_K, DEMO_DEAD = 2048, 32, 100_000
SYN_D, SYN_BATCH, SYN_STEPS = 256, 4096, 200
SYN_M, SYN_K, SYN_FEATURES, SYN_ACTIVE = 4096, 4, 64, 4  # k = the true sparsity


class Quality(NamedTuple):
    """Held-out FVU, mean L0, fraction of latents dead at the end, and (synthetic) the
    fraction of true directions some decoder row matches at cosine > 0.9."""

    fvu: float
    l0: float
    dead: float
    recovered: float | None = None


# ---- the two trainers, one interface: step(x), evaluate(x) -> (fvu, l0), dead(), W_dec


class GsaeRun:
    def __init__(self, d, m, k, dead_threshold, **cfg):
        cfg = SaeConfig(d=d, num_latents=m, k=k, dead_threshold=dead_threshold, **cfg)
        self.trainer = SaeTrainer(Sae(cfg))

    def step(self, x):
        self.trainer.step(x)

    @torch.no_grad()
    def evaluate(self, x):
        with self.trainer.averaged():
            out = self.trainer.sae(x)
            return float(out.loss.fvu), float((out.latents.values > 0).sum(1).float().mean())

    def dead(self):
        return float(self.trainer.dead_mask().float().mean())

    def decoder(self):
        with self.trainer.averaged():
            return self.trainer.sae.W_dec.detach().clone()


class SparsifyRun:
    """sparsify's SparseCoder in sparsify's own training step (sparsify/trainer.py, 1.3)."""

    def __init__(self, d, m, k, dead_threshold, optimizer="adam", seed=0):
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(seed)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), dtype=torch.float32)
        self.threshold, self.m, self.steps = dead_threshold, m, 0
        self.since = torch.zeros(m, dtype=torch.long)
        if optimizer == "adam":  # the paper's learning rate, as gsae's default
            lr = 2e-4 / math.sqrt(m / 2**14)
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        else:  # sparsify's default: schedule-free sign-SGD
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            lr = 5e-3 / math.sqrt(m / 2**14)
            self.opt = ScheduleFreeWrapper(SignSGD(self.sae.parameters(), lr=lr), momentum=0.95)
            self.opt.train()

    def step(self, x):
        sae = self.sae
        if self.steps == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))  # sparsify's trainer: b_dec from the first batch
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=self.since > self.threshold)
        (out.fvu + out.auxk_loss / 32).backward()  # gsae's AuxK weight, the paper's
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        fired = torch.zeros(self.m, dtype=torch.long)
        fired.index_add_(0, out.latent_indices.flatten(), (out.latent_acts > 0).flatten().long())
        self.since += x.shape[0]
        self.since[fired > 0] = 0
        self.steps += 1

    @torch.no_grad()
    def evaluate(self, x):
        if hasattr(self.opt, "eval"):
            self.opt.eval()  # schedule-free: the averaged weights
        out = self.sae(x)
        if hasattr(self.opt, "train"):
            self.opt.train()
        return float(out.fvu), float((out.latent_acts > 0).sum(1).float().mean())

    def dead(self):
        return float((self.since >= self.threshold).float().mean())

    def decoder(self):
        return self.sae.W_dec.detach().clone()


def train(run, batches, held_out, directions=None) -> Quality:
    for x in batches:
        run.step(x)
    fvu, l0 = run.evaluate(held_out)
    recovered = None
    if directions is not None:
        w = run.decoder()
        cos = (directions @ w.T) / w.norm(dim=1)  # [features, m]
        recovered = float((cos.max(dim=1).values > 0.9).float().mean())
    return Quality(fvu, l0, run.dead(), recovered)


def has_sparsify() -> bool:
    try:
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


# ---- data


@pytest.fixture(scope="module")
def demo_activations():
    """{layer: (train [98 * 2048, d], held-out [50k, d])} from the demo model, in stream order,
    each layer scaled to mean squared norm 1 (gsae's scale; both trainers see the same x)."""
    loaded = load_model("demo", "fp32", "cpu")
    layers = list(range(loaded.num_layers))
    reader = ActivationReader(loaded, layers)
    need, parts, seen = DEMO_BATCH * DEMO_STEPS + DEMO_HELD_OUT, [], 0
    stream = TokenStream(lambda: iter_texts("demo"), loaded.tokenizer, ctx_len=128, batch_size=16)
    with stream:
        for batch in stream:
            parts.append(reader(batch.input_ids, batch.attention_mask).float())
            seen += parts[-1].shape[1]
            if seen >= need:
                break
    acts = torch.cat(parts, 1)  # [L, tokens, d]
    train_n = DEMO_BATCH * DEMO_STEPS
    out = {}
    for layer in layers:
        x = acts[layer]
        x = x * activation_scale([x[:20_000]], 20_000)
        out[layer] = (x[:train_n], x[train_n : train_n + DEMO_HELD_OUT])
    return out


def demo_batches(train_x, steps):
    return [train_x[i * DEMO_BATCH : (i + 1) * DEMO_BATCH] for i in range(steps)]


# ---- benchmarks

DEMO_CANDIDATES = {  # name -> (runner, kwargs)
    "gsae (default: adam, init fit, b_dec mean)": (GsaeRun, {}),
    "gsae --init paper --init-b-dec zeros": (
        GsaeRun,
        {"init_encoder": "paper", "init_b_dec": "zeros"},
    ),
    "sparsify SparseCoder, adam": (SparsifyRun, {"optimizer": "adam"}),
    "gsae --optimizer signum": (GsaeRun, {"optimizer": "signum"}),
    "sparsify SparseCoder, signum": (SparsifyRun, {"optimizer": "signum"}),
}


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built")
def test_quality_demo_layers(benchmark, report, demo_activations):
    smoke = benchmark.disabled
    layers = [3] if smoke else sorted(demo_activations)
    steps = 10 if smoke else DEMO_STEPS
    names = [n for n, (cls, _) in DEMO_CANDIDATES.items() if cls is GsaeRun or has_sparsify()]
    results: dict[str, dict[int, Quality]] = {name: {} for name in names}

    def run_all():
        for layer in layers:
            train_x, held = demo_activations[layer]
            for name in names:
                cls, kwargs = DEMO_CANDIDATES[name]
                run = cls(train_x.shape[1], DEMO_M, DEMO_K, DEMO_DEAD, **kwargs)
                results[name][layer] = train(run, demo_batches(train_x, steps), held)

    benchmark.group = "quality-demo"
    benchmark.pedantic(run_all, rounds=1, warmup_rounds=0)
    tokens = steps * DEMO_BATCH
    for name in names:
        for layer in layers:
            q = results[name][layer]
            report(f"demo layer {layer}, {tokens:,} tokens", name,
                   f"FVU {q.fvu:.4f}  L0 {q.l0:.1f}  dead {q.dead:.3f}")  # fmt: skip
    # the targets are the default's (Adam); signum is compared for information
    pairs = (("gsae (default: adam, init fit, b_dec mean)", "sparsify SparseCoder, adam",
              "  max (target <= 1) / mean (target <= 0.9)"),
             ("gsae --optimizer signum", "sparsify SparseCoder, signum",
              "  max / mean (no target)"))  # fmt: skip
    for ours, theirs, label in pairs:
        if theirs not in results:
            report("demo", f"{ours} / sparsify", "skipped: eai-sparsify not installed")
            continue
        ratios = [results[ours][la].fvu / results[theirs][la].fvu for la in layers]
        case = f"demo, {len(layers)} layers"
        report(case, f"FVU {ours} / {theirs}", " ".join(f"{r:.3f}" for r in ratios))
        report(case, label,
               f"{max(ratios):.3f} / {sum(ratios) / len(ratios):.3f}")  # fmt: skip
    old = "gsae --init paper --init-b-dec zeros"
    gain = [results[old][la].fvu / results[names[0]][la].fvu for la in layers]
    report(f"demo, {len(layers)} layers", "FVU paper init / default init (mean)",
           f"{sum(gain) / len(gain):.2f}x")  # fmt: skip


SYN_CANDIDATES = {
    "gsae (default)": (GsaeRun, {}),
    "gsae --init paper": (GsaeRun, {"init_encoder": "paper"}),
    "gsae --init paper --init-b-dec zeros": (
        GsaeRun,
        {"init_encoder": "paper", "init_b_dec": "zeros"},
    ),
    "sparsify SparseCoder, adam": (SparsifyRun, {"optimizer": "adam"}),
}


def test_quality_synthetic(benchmark, report):
    smoke = benchmark.disabled
    d, n, steps = (64, 512, 10) if smoke else (SYN_D, SYN_BATCH, SYN_STEPS)
    m, k = (1024, SYN_K) if smoke else (SYN_M, SYN_K)
    data = SparseFeatures(d=d, n_features=SYN_FEATURES, active=SYN_ACTIVE, seed=1000)
    scale = activation_scale([data.batch(8192)], 8192)
    batches = [scale * data.batch(n) for _ in range(steps)]
    held = scale * data.batch(8192)
    names = [n for n, (cls, _) in SYN_CANDIDATES.items() if cls is GsaeRun or has_sparsify()]
    results = {}

    def run_all():
        for name in names:
            cls, kwargs = SYN_CANDIDATES[name]
            run = cls(d, m, k, 10 * n * steps, **kwargs)  # nothing dies in so short a run
            results[name] = train(run, batches, held, data.directions)

    benchmark.group = "quality-synthetic"
    benchmark.pedantic(run_all, rounds=1, warmup_rounds=0)
    case = f"synthetic d={d} m={m} k={k}, {steps} x {n}"
    for name in names:
        q = results[name]
        report(case, name, f"FVU {q.fvu:.4f}  L0 {q.l0:.1f}  found {q.recovered:.0%}")
    report(case, "target: default FVU <= 0.134, found >= 90%",
           f"{results[names[0]].fvu:.4f}, {results[names[0]].recovered:.0%}")  # fmt: skip
