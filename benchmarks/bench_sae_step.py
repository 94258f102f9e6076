"""Issue 2: the SAE train step (forward, backward, Adam, decoder renorm).

CPU: the torch path against the dense reference (target >= 3x faster), against the floor of any
TopK SAE step, the encoder matmul + top-k alone (target <= 1.5x), and peak memory (target: not
above the reference's). GPU (skipped without one): Triton against the torch path.
"""

import pytest
import torch
from conftest import gpu_available, interleaved, peak_extra_bytes

from gsae.sae import Sae, SaeConfig, SaeTrainer

CPU_CASES = [
    pytest.param(4096, 512, 8192, 32, id="N4096-d512-m8192-k32"),
    pytest.param(4096, 768, 12288, 128, id="N4096-d768-m12288-k128"),
]


def make_trainer(d, m, k, backend, device="cpu", dtype=torch.float32):
    sae = Sae(SaeConfig(d=d, num_latents=m, k=k), device=device)
    sae.backend = backend
    return SaeTrainer(sae)


def floor_fn(trainer, x):
    sae = trainer.sae
    xc = sae.normalize(x) - sae.b_dec

    def floor():
        with torch.no_grad():
            torch.addmm(sae.b_enc, xc, sae.W_enc.t()).topk(sae.k, dim=1, sorted=False)

    return floor


@pytest.mark.parametrize("n,d,m,k", CPU_CASES)
def test_cpu_train_step(benchmark, report, rounds, n, d, m, k):
    torch.manual_seed(0)
    x = torch.randn(n, d)
    fast = make_trainer(d, m, k, "torch")
    ref = make_trainer(d, m, k, "reference")
    benchmark.group = f"sae-step-cpu-{n}x{d}x{m}x{k}"
    benchmark.pedantic(lambda: fast.step(x), rounds=1 if benchmark.disabled else 5, warmup_rounds=1)
    fns = {"torch": lambda: fast.step(x), "reference": lambda: ref.step(x)}
    t = interleaved({**fns, "floor": floor_fn(fast, x)}, rounds)
    case = f"cpu N={n} d={d} m={m} k={k}"
    for stat in ("median", "min"):
        ms = {name: v[stat] * 1e3 for name, v in t.items()}
        report(case, f"torch step [{stat}] ms", f"{ms['torch']:.0f}")
        speedup, over_floor = ms["reference"] / ms["torch"], ms["torch"] / ms["floor"]
        report(case, f"reference / torch [{stat}] (target >= 3)", f"{speedup:.2f}x")
        report(case, f"torch / floor [{stat}] (target <= 1.5)", f"{over_floor:.2f}x")


_SETUP = """
import torch
from gsae.sae import Sae, SaeConfig, SaeTrainer
torch.manual_seed(0)
sae = Sae(SaeConfig(d={d}, num_latents={m}, k={k}))
sae.backend = "{backend}"
trainer = SaeTrainer(sae)
x = torch.randn({n}, {d})
"""


def step_peak_bytes(n, d, m, k, backend) -> int:
    setup = _SETUP.format(n=n, d=d, m=m, k=k, backend=backend)
    return peak_extra_bytes(setup, "for _ in range(2):\n    trainer.step(x)")


@pytest.mark.parametrize("n,d,m,k", CPU_CASES)
def test_cpu_train_step_peak_memory(benchmark, report, n, d, m, k):
    """Peak resident memory above the set-up state, over two steps, each in a fresh process."""
    benchmark.group = "sae-step-memory"
    result = {}

    def measure():
        result["torch"] = step_peak_bytes(n, d, m, k, "torch")
        result["reference"] = step_peak_bytes(n, d, m, k, "reference")

    benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    case = f"cpu N={n} d={d} m={m} k={k}"
    mib = {name: v / 2**20 for name, v in result.items()}
    report(case, "peak extra MiB torch / reference", f"{mib['torch']:.0f} / {mib['reference']:.0f}")
    report(case, "peak memory torch / reference (<= 1)", f"{mib['torch'] / mib['reference']:.2f}x")


@pytest.mark.skipif(not gpu_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_train_step(benchmark, report, rounds, dtype):
    n, d, m, k = 32768, 2048, 32768, 128
    x = torch.randn(n, d, device="cuda", dtype=dtype)
    trainers = {b: make_trainer(d, m, k, b, device="cuda") for b in ("triton", "torch")}

    def timed(trainer):
        def run():
            trainer.step(x)
            torch.cuda.synchronize()

        return run

    benchmark.group = f"sae-step-gpu-{dtype}"
    benchmark.pedantic(timed(trainers["triton"]), rounds=3, warmup_rounds=1)
    t = interleaved({b: timed(tr) for b, tr in trainers.items()}, rounds)
    ratio = t["torch"]["median"] / t["triton"]["median"]
    report(f"gpu N={n} d={d} m={m} k={k} {dtype}", "torch / triton [median]", f"{ratio:.2f}x")
