"""The whole GPU check of issue 18 in one script, every stage time-boxed (``--budget`` seconds in
all, 540 by default: 9 minutes), printing as it goes; JSON and Markdown under ``--out``.

Stages (each in a process of its own: one that runs over its box is killed and reported, a CUDA
error cannot poison the next, and the time a stage leaves unused goes to the ones after it):

1. ``versions``: Python, torch, triton, transformers, sparsify, gsae's commit; the device, its
   peak bf16 rate and memory bandwidth (a table by device name, else measured here);
2. ``encoder``: the fused encoder (``gsae_kernels.topk_encode``) against cuBLAS ``addmm`` +
   ``torch.topk`` in the same precision (fp32, tf32, bf16), AuxK off and on (k_aux = d / 2), at
   the paper's shape (N = 32768, d = 2048, m = 32768, k = 128) and Pythia-160M's (d = 768,
   m = 12288);
3. ``sae_step``: one SAE training step (forward, backward, optimiser) of gsae's ``SaeTrainer``
   and of sparsify's ``SparseCoder`` in sparsify's own step (its Triton decoder, its bf16
   autocast) at the same shapes, each under its default optimiser (schedule-free sign-SGD for
   both) and both under Adam, each ratio against sparsify under the same optimiser, and the
   roofline: the encoder GEMM at the peak bf16 rate plus the sparse decode's bytes (forward
   gather, the backward's gather and scatter: 3 N k d elements) at the memory bandwidth;
4. ``end_to_end``: ``gsae-train --groups auto`` and ``--groups per-layer`` on randomly
   initialised GPTNeoX models of Pythia-1B's and Pythia-160M's widths and depths (the demo
   tokenizer's vocabulary, the demo corpus), against sparsify on the same model and text.
   sparsify's ``Trainer`` needs ``datasets`` (and pyarrow, pandas: far over the 64 MiB the
   device takes), so its ``SparseCoder`` runs in the training step of sparsify's Trainer (one
   SAE per layer, hooked into one full forward, its default schedule-free sign-SGD) and the
   report says so. The runs write no
   checkpoints or SAEs (their disk time is not what is measured);
5. ``tests``: ``python -m pytest -m gpu tests/`` (the host-sync test among them).

On the device (no package registry; torch, triton, transformers, pytest there), from the
repository root, with the wheels of ``benchmarks/gpu_wheels.sh`` carried in ``.gpu_wheels``::

    bash benchmarks/gpu_session.sh "$OUT"

``--rehearse`` runs every stage end to end on the CPU at tiny shapes (tests/test_gpu_session.py),
so that only the device is new on the day.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# without an install (pip install -e . failed on the device): the source tree as it is, here
# and in every process this one starts (after the installed packages: an install wins)
SOURCES = [str(ROOT / sub) for sub in ("", "kernels", "csrc")]
sys.path += [p for p in SOURCES if p not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + SOURCES
)

STAGES = ("versions", "encoder", "sae_step", "profile", "end_to_end", "tests")
SHARES = {
    "versions": 0.04,
    "encoder": 0.1,
    "sae_step": 0.2,
    "profile": 0.1,
    "end_to_end": 0.42,
    "tests": 0.14,
}

# dense bf16 tensor-core rate (TFLOP/s, fp32 accumulation) and memory bandwidth (TB/s), from the
# vendors' data sheets; matched by substring of torch.cuda.get_device_name (first match wins)
PEAKS = (
    ("GH200", 989.0, 4.0),  # before H200, which its name contains
    ("H200", 989.0, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.04),
    ("A100", 312.0, 1.56),
    ("L40S", 362.0, 0.864),
    ("RTX 4090", 165.0, 1.01),
    ("MI300X", 1307.0, 5.3),
    ("MI250X", 191.5, 1.6),  # one GCD (what torch sees as one device)
    ("MI250", 181.0, 1.6),
)

PAPER = {"name": "paper", "N": 32768, "d": 2048, "m": 32768, "k": 128}
P160M = {"name": "pythia-160m", "N": 32768, "d": 768, "m": 12288, "k": 128}
TINY = [
    {"name": "tiny-a", "N": 256, "d": 32, "m": 256, "k": 8},
    {"name": "tiny-b", "N": 128, "d": 16, "m": 128, "k": 4},
]
# GPTNeoX widths and depths (hidden, layers, heads, intermediate)
MODELS = {
    "pythia-1b": (2048, 16, 8, 8192),
    "pythia-160m": (768, 12, 12, 3072),
    "tiny": (64, 4, 4, 256),
}


# --------------------------------------------------------------------------------------------
# the parent: one child process per stage, each in its time box


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_session.json / .md")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for every stage in all")
    p.add_argument("--rehearse", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--only", help="comma-separated stages (default: all)")
    p.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="a stage's own time box (tests)",
    )
    p.add_argument("--precisions", help="the encoder stage's, comma-separated (bf16,tf32,fp32)")
    p.add_argument("--e2e-models", help="end_to_end's models (pythia-1b,pythia-160m)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # a child: run this stage
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--e2e-run", help=argparse.SUPPRESS)  # a grandchild: one end-to-end run
    args = p.parse_args(argv)
    for flag, var in (
        (args.precisions, "GSAE_SESSION_PRECISIONS"),
        (args.e2e_models, "GSAE_SESSION_MODELS"),
    ):
        if flag:
            os.environ[var] = flag  # read by the stages' child processes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.e2e_run:
        return e2e_child(json.loads(args.e2e_run), out)
    if args.stage:
        return stage_child(args.stage, out, args.rehearse, args.seconds)
    stages = args.only.split(",") if args.only else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; they are {', '.join(STAGES)}")
    boxes = {}
    for item in args.box:
        name, _, seconds = item.partition("=")
        boxes[name] = float(seconds)
    return run_session(out, stages, args.budget, args.rehearse, boxes)


def run_session(out: Path, stages, budget: float, rehearse: bool, boxes: dict) -> int:
    start = time.monotonic()
    if rehearse:  # sparsify's own switch: its Triton decoder needs a GPU, its eager one does not
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    report = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "budget_s": budget,
        "rehearse": rehearse,
        "stages": {},
    }
    say(f"gpu_session: {len(stages)} stages in {budget:.0f} s -> {out}")
    share_left = sum(SHARES[s] for s in stages)
    for name in stages:
        left = budget - (time.monotonic() - start)
        box = boxes.get(name, max(0.0, left * SHARES[name] / share_left))
        share_left -= SHARES[name]
        report["stages"][name] = run_stage(name, out, rehearse, box)
        write_report(out, report)
    report["seconds"] = round(time.monotonic() - start, 1)
    write_report(out, report)
    bad = [n for n, r in report["stages"].items() if r["status"] != "ok"]
    say(
        f"gpu_session: done in {report['seconds']} s; report in {out / 'gpu_session.md'}"
        + (f"; not ok: {', '.join(bad)}" if bad else "")
    )
    return 0 if not bad else 1


def run_stage(name: str, out: Path, rehearse: bool, box: float) -> dict:
    say(f"\n== {name} (box {box:.0f} s)")
    result_file = out / f"stage-{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stage",
        name,
        "--out",
        str(out),
        "--seconds",
        str(box),
    ] + (["--rehearse"] if rehearse else [])
    t0 = time.monotonic()
    status, code = run_boxed(cmd, box, prefix=f"[{name}] ")
    seconds = round(time.monotonic() - t0, 1)
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if status == "ok" and code != 0:
        status = f"failed (exit {code})"
    say(f"== {name}: {status} in {seconds} s")
    return {"status": status, "seconds": seconds, "box_s": round(box, 1), **result}


def run_boxed(cmd, seconds: float, prefix: str = "", env=None) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group, echoing its output with ``prefix``; killed (the
    whole group) after ``seconds``. Returns ("ok" | "over its time box", exit code)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
        bufsize=1,
        cwd=ROOT,
    )
    deadline = time.monotonic() + seconds
    reader = _Echo(proc.stdout, prefix)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
                break
        reader.join()
        return f"over its time box ({seconds:.0f} s): stopped", proc.returncode
    reader.join()
    return "ok", proc.returncode


class _Echo:
    """Copy a child's output to ours as it comes, line by line (a thread)."""

    def __init__(self, stream, prefix: str):
        import threading

        self.thread = threading.Thread(target=self._run, args=(stream, prefix), daemon=True)
        self.thread.start()

    @staticmethod
    def _run(stream, prefix):
        for line in stream:
            say(prefix + line.rstrip("\n"))

    def join(self):
        self.thread.join(timeout=5)


def say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# a child: one stage


class Stage:
    """What a stage's functions get: the device, the clock and the result being filled."""

    def __init__(self, name: str, out: Path, rehearse: bool, seconds: float | None):
        import torch

        self.name, self.out, self.rehearse = name, out, rehearse
        self.deadline = time.monotonic() + (seconds or 1e9) - 3.0  # a margin to write results
        self.device = torch.device("cpu" if rehearse or not torch.cuda.is_available() else "cuda")
        self.result: dict = {"rows": [], "notes": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, **row) -> None:
        self.result["rows"].append(row)
        say("  " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()))
        self.save()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        say(f"  note: {text}")
        self.save()

    def save(self) -> None:
        path = self.out / f"stage-{self.name}.json"
        path.write_text(json.dumps(self.result, indent=1, default=str))


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def stage_child(name: str, out: Path, rehearse: bool, seconds: float | None) -> int:
    st = Stage(name, out, rehearse, seconds)
    try:
        {
            "versions": versions,
            "encoder": encoder,
            "sae_step": sae_step,
            "profile": profile,
            "end_to_end": end_to_end,
            "tests": gpu_tests,
        }[name](st)
    except Exception as err:
        import traceback

        traceback.print_exc()
        st.result["error"] = f"{type(err).__name__}: {err}"
        st.save()
        return 1
    st.save()
    return 0


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, st: Stage, reps: int = 10, warmup: int = 2, share: float = 0.2) -> float | None:
    """Median milliseconds of ``fn()`` (synchronised), fewer repetitions when time is short
    (``share`` of what the stage has left, at most); None when not even one fits."""
    budget = st.left() * share
    reps = min(reps, 3) if st.rehearse else reps  # the rehearsal checks the path, not the speed
    t0 = time.monotonic()
    for _ in range(warmup):  # compiles, autotunes, allocates
        fn()
        sync(st.device)
        if time.monotonic() - t0 > budget:
            break
    times = []
    while len(times) < reps and time.monotonic() - t0 < budget:
        t = time.perf_counter()
        fn()
        sync(st.device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times) if times else None


def free(st: Stage) -> None:
    import gc

    import torch

    gc.collect()
    if st.device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. versions and device


def versions(st: Stage) -> None:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "commit": commit(),
    }
    for mod in ("triton", "transformers"):
        info[mod] = module_version(mod)
    sparse, how = import_sparse_coder()
    info["sparsify"] = module_version("sparsify") if sparse else f"missing ({how})"
    info["sparsify_import"] = how
    info["gsae_precision"] = precision_support()
    info["device"] = device_info(st)
    st.result["info"] = info
    for key, value in info.items():
        say(f"  {key}: {value}")


def commit() -> str:
    if os.environ.get("GSAE_COMMIT"):
        return os.environ["GSAE_COMMIT"]
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: set GSAE_COMMIT)"


def module_version(name: str) -> str:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):  # sparsify may be set up by hand
        return metadata.version({"sparsify": "eai-sparsify"}.get(name, name))
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception as err:
        return f"missing ({type(err).__name__}: {err})"


def device_info(st: Stage) -> dict:
    import torch

    if st.device.type != "cuda":
        return {
            "name": f"CPU ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads(),
        }
    props = torch.cuda.get_device_properties(st.device)
    info = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
    }
    info.update(peaks(st))
    return info


def table_peaks(name: str) -> dict | None:
    """The PEAKS entry of a device name, or None."""
    for key, tflops, tbs in PEAKS:
        if key in name:
            return {"peak_bf16_tflops": tflops, "peak_tb_s": tbs, "peaks_from": f"table ({key})"}
    return None


def peaks(st: Stage) -> dict:
    """Peak bf16 TFLOP/s and TB/s: the table's, else measured (a bf16 GEMM, a copy)."""
    import torch

    name = torch.cuda.get_device_name(st.device) if st.device.type == "cuda" else "cpu"
    known = table_peaks(name)
    if known:
        return known
    n = 4096 if st.device.type == "cuda" else 256
    a = torch.randn(n, n, device=st.device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ a, st, reps=5, share=0.05) or float("nan")
    big = torch.empty(2**26 if st.device.type == "cuda" else 2**20, device=st.device)
    dst = torch.empty_like(big)
    ms_copy = timed(lambda: dst.copy_(big), st, reps=5, share=0.05) or float("nan")
    return {
        "peak_bf16_tflops": float(f"{2 * n**3 / ms / 1e9:.4g}"),
        "peak_tb_s": float(f"{2 * big.numel() * 4 / ms_copy / 1e9:.4g}"),
        "peaks_from": "measured here (a bf16 GEMM, a copy): no table entry",
    }


def import_sparse_coder():
    """sparsify's ``(SparseCoder, SparseCoderConfig)`` and how it was imported. Its
    ``__init__`` imports its Trainer, which needs ``datasets`` (not on the device): then the
    package is set up without running ``__init__`` and ``sparse_coder`` imported alone; a
    missing ``accelerate`` (imported by sparsify.utils for one helper) gets a stand-in."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig

        return (SparseCoder, SparseCoderConfig), "import sparsify"
    except ImportError as err:
        first = err
    try:
        spec = importlib.util.find_spec("sparsify")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, f"not installed ({first})"
    how = [f"sparsify.sparse_coder alone (import sparsify: {first})"]
    if importlib.util.find_spec("accelerate") is None:
        utils = types.ModuleType("accelerate.utils")
        utils.send_to_device = lambda tensor, device, **_: tensor.to(device)
        sys.modules.setdefault("accelerate", types.ModuleType("accelerate"))
        sys.modules["accelerate.utils"] = utils
        how.append("accelerate stubbed")
    package = types.ModuleType("sparsify")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = package
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    return (SparseCoder, SparseCoderConfig), "; ".join(how)


def precision_support() -> dict:
    """Whether this gsae has the precision setting (issue 18): ``--sae-precision`` on
    gsae-train, ``precision`` in SaeConfig or SaeTrainer (see :func:`python_precision`)."""
    from gsae.cli.train import parser

    return {"python": python_precision(), "cli": "--sae-precision" in parser().format_help()}


def python_precision() -> str | None:
    """Where the Python API takes ``precision``: "SaeConfig", "SaeTrainer" or None."""
    from gsae.sae import SaeConfig
    from gsae.train.step import SaeTrainer

    if "precision" in getattr(SaeConfig, "__dataclass_fields__", {}):
        return "SaeConfig"
    if "precision" in inspect.signature(SaeTrainer).parameters:
        return "SaeTrainer"
    return None


# ---- 2. the fused encoder against cuBLAS + torch.topk


def shapes(st: Stage) -> list[dict]:
    return TINY if st.rehearse else [PAPER, P160M]


def precisions(st: Stage) -> list[str]:
    # bf16 matmuls are wrong in the Triton interpreter and tf32 is a GPU mode: fp32 on a CPU
    if st.device.type != "cuda":
        return ["fp32"]
    return os.environ.get("GSAE_SESSION_PRECISIONS", "bf16,tf32,fp32").split(",")


@contextlib.contextmanager
def tf32(on: bool):
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on  # cuBLAS and the fused encoder both follow it
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def encoder(st: Stage) -> None:
    for shape in shapes(st):
        for prec in precisions(st):
            if st.left() < 5:
                st.note(f"{shape['name']} {prec}: no time left")
                continue
            encoder_case(st, shape, prec)
            free(st)


def encoder_case(st: Stage, shape: dict, prec: str) -> None:
    """The fused encoder and cuBLAS + topk at one shape and precision, AuxK off and on."""
    import torch
    from gsae_kernels import topk_encode

    n, d, m, k = shape["N"], shape["d"], shape["m"], shape["k"]
    gen = torch.Generator(device=st.device).manual_seed(0)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    x = torch.randn(n, d, device=st.device, generator=gen).to(dtype)
    w = (torch.randn(m, d, device=st.device, generator=gen) / d**0.5).to(dtype)
    b_enc = torch.zeros(m, device=st.device, dtype=dtype)
    b_dec = torch.zeros(d, device=st.device, dtype=dtype)
    dead = torch.zeros(m, dtype=torch.bool, device=st.device)
    dead[::2] = True  # half the latents dead: AuxK has more candidates than slots
    fp32 = [t.float() for t in (x, w, b_enc, b_dec)]
    for aux in (0, d // 2):

        @torch.no_grad()
        def fused(aux=aux):
            return topk_encode(x, w, b_enc, b_dec, k, dead if aux else None, aux, encoder="fused")

        @torch.no_grad()
        def gemm(aux=aux):
            # gsae's default GPU forward as its trainer calls it: fp32 weights, the bf16
            # precision (bf16 GEMM with fp32 output) or tf32 / fp32
            pre = {"bf16": "bf16", "tf32": "tf32"}.get(prec, "fp32")
            return topk_encode(*fp32, k, dead if aux else None, aux, encoder="gemm", precision=pre)

        @torch.no_grad()
        def cublas(aux=aux):
            pre = torch.addmm(b_enc, x - b_dec, w.T).relu_()  # [N, m]
            top = pre.topk(k, dim=1)
            if aux:
                top = (top, pre.masked_fill(~dead, float("-inf")).topk(aux, dim=1))
            return top

        with tf32(prec == "tf32"):
            ms_fused = guarded(fused, st)
            ms_gemm = guarded(gemm, st)
            ms_ref = guarded(cublas, st)
        st.row(
            shape=shape["name"],
            precision=prec,
            k_aux=aux,
            fused_ms=ms_fused,
            gemm_ms=ms_gemm,
            cublas_topk_ms=ms_ref,
            fused_tflops=tflops(2 * n * d * m, ms_fused),
            speedup=ratio(ms_ref, ms_fused),
            gemm_speedup=ratio(ms_ref, ms_gemm),
        )


def guarded(fn, st: Stage):
    """``timed(fn)``, or the error in words (an OutOfResources at launch, an OOM)."""
    try:
        return timed(fn, st)
    except Exception as err:
        free(st)
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def tflops(flops: float, ms) -> float | None:
    return flops / ms / 1e9 if isinstance(ms, float) and ms > 0 else None


def ratio(a, b) -> float | None:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


# ---- 3. one SAE training step, gsae and sparsify, and the roofline


def gsae_trainer(shape: dict, device, precision: str | None, aux: bool, optimizer=None):
    """gsae's SaeTrainer for ``shape``; ``precision`` where this gsae takes one; ``optimizer``
    None for gsae's default."""
    from gsae.sae import Sae, SaeConfig
    from gsae.train.step import SaeTrainer

    kwargs = dict(
        d=shape["d"], num_latents=shape["m"], k=shape["k"], dead_threshold=1 if aux else 10**15
    )
    if optimizer:
        kwargs["optimizer"] = optimizer
    if "warmup_tokens" in SaeConfig.__dataclass_fields__:  # the steady-state step is timed
        kwargs["warmup_tokens"] = 0
    where = python_precision() if precision else None
    if where == "SaeConfig":
        kwargs["precision"] = precision
    sae = Sae(SaeConfig(**kwargs), [0], device=device)
    if where == "SaeTrainer":
        return SaeTrainer(sae, precision=precision)
    return SaeTrainer(sae)


def gsae_step(trainer, x, aux: bool):
    def step():
        if aux:  # half the latents dead, every step: AuxK at full width (k_aux = d / 2)
            trainer.tokens_since_fired.fill_(0)
            trainer.tokens_since_fired[::2] = 10**12
        trainer.step(x, layer=0, check_finite=False)  # as the training loop calls it: no sync

    return step


@contextlib.contextmanager
def variant_env(variant: str):
    """gsae's fused encoder for a ``fused`` variant (``GSAE_ENCODER``), else its default."""
    before = os.environ.pop("GSAE_ENCODER", None)
    if "fused" in variant:
        os.environ["GSAE_ENCODER"] = "fused"
    try:
        yield
    finally:
        os.environ.pop("GSAE_ENCODER", None)
        if before is not None:
            os.environ["GSAE_ENCODER"] = before


def sparsify_step(coder, opt, x, dead, auxk_alpha: float = 1 / 32):
    """One step as sparsify's Trainer takes it (sparsify/trainer.py, 1.3): the forward under
    its own bf16 autocast, FVU + AuxK, backward, the decoder-parallel gradient removed, the
    optimiser's step, the decoder rows back to unit norm."""

    def step():
        out = coder(x, dead_mask=dead)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()

    return step


def sparsify_optimizer(params, m: int, name: str):
    """The optimiser sparsify's Trainer builds (sparsify/trainer.py, 1.3): ``signum``, its
    default, is schedule-free sign-SGD at 5e-3 / sqrt(m / 2^14) with momentum 0.95; ``adam``
    is the paper's, at 2e-4 / sqrt(m / 2^14)."""
    import torch

    scale = (m / 2**14) ** 0.5
    if name == "adam":
        return torch.optim.Adam(params, lr=2e-4 / scale, fused=torch.cuda.is_available())
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    opt = ScheduleFreeWrapper(SignSGD([dict(params=params, lr=5e-3 / scale)]), momentum=0.95)
    opt.train()
    return opt


def roofline_ms(shape: dict, peak_tflops: float, peak_tb_s: float, elem: int = 2) -> dict:
    """The step's limit: the encoder GEMM (2 N d m FLOP) at the peak bf16 rate plus the sparse
    decode's bytes (3 N k d elements: the forward gather, the backward's gather for the values'
    gradient and scatter into W_dec's) at the memory bandwidth."""
    n, d, m, k = shape["N"], shape["d"], shape["m"], shape["k"]
    gemm = 2 * n * d * m / (peak_tflops * 1e12) * 1e3
    decode = 3 * n * k * d * elem / (peak_tb_s * 1e12) * 1e3
    return {"gemm_ms": gemm, "decode_ms": decode, "limit_ms": gemm + decode}


def sae_step(st: Stage) -> None:
    import torch

    limits = peaks(st)  # on a CPU (the rehearsal) measured, as for a GPU missing from PEAKS
    sparse, how = import_sparse_coder()
    st.result["sparsify_import"] = how
    support = python_precision()
    gsae_precisions = ["auto", "fp32"] if support else [None]
    if not support:
        st.note("this gsae has no precision setting: its SAE step runs in fp32 (tf32 off)")
    for shape in shapes(st):
        gen = torch.Generator(device=st.device).manual_seed(0)
        x = torch.randn(shape["N"], shape["d"], device=st.device, generator=gen)
        limit = (
            roofline_ms(shape, limits["peak_bf16_tflops"], limits["peak_tb_s"]) if limits else None
        )
        # each tool's default optimiser (signum for both), then both under the paper's Adam
        runs = [("signum", p, "") for p in gsae_precisions[:1]]
        runs += [("adam", p, "") for p in gsae_precisions]
        # the first H200 session's step (fused encoder, sparse AuxK), for the same-run ratio
        runs += [("signum", p, " fused+sparse-auxk") for p in gsae_precisions[:1]]
        for aux in (False, True):
            times, peers = {}, {}
            for opt_name, prec, variant in runs:
                name = f"gsae {opt_name} {prec or 'fp32'}{variant}"
                if st.left() < 10:
                    st.note(f"{shape['name']} {name}: no time left")
                    continue
                try:
                    with variant_env(variant):
                        trainer = gsae_trainer(shape, st.device, prec, aux, opt_name)
                        trainer.sae.auxk = "sparse" if variant else None
                        times[name] = guarded(gsae_step(trainer, x, aux), st)
                    del trainer
                except Exception as err:
                    times[name] = f"{type(err).__name__}: {err}"
                free(st)
            for opt_name in ("signum", "adam"):
                if sparse is None or st.left() <= 10:
                    continue
                coder_cls, cfg_cls = sparse
                name = f"sparsify {opt_name} bf16 autocast"
                try:
                    coder = coder_cls(
                        shape["d"],
                        cfg_cls(num_latents=shape["m"], k=shape["k"]),
                        device=st.device,
                        dtype=torch.float32,
                    )
                    opt = sparsify_optimizer(list(coder.parameters()), shape["m"], opt_name)
                    dead = torch.zeros(shape["m"], dtype=torch.bool, device=st.device)
                    dead[::2] = aux
                    times[name] = peers[opt_name] = guarded(sparsify_step(coder, opt, x, dead), st)
                    del coder, opt
                except Exception as err:
                    times[name] = f"{type(err).__name__}: {err}"
                free(st)
            for name, ms in times.items():
                row = {"shape": shape["name"], "auxk": aux, "impl": name, "ms": ms}
                if not name.startswith("sparsify"):  # against sparsify under the same optimiser
                    row["speedup_vs_sparsify"] = ratio(peers.get(name.split()[1]), ms)
                    first = f"gsae signum {gsae_precisions[0] or 'fp32'} fused+sparse-auxk"
                    if name != first:
                        row["speedup_vs_first_session"] = ratio(times.get(first), ms)
                if limit:
                    row["limit_ms"] = limit["limit_ms"]
                    row["of_limit_pct"] = (
                        100 * limit["limit_ms"] / ms if isinstance(ms, float) else None
                    )
                st.row(**row)
                if name.startswith("gsae") and isinstance(ms, float):
                    st.note(
                        f"{shape['name']}, AuxK {'on' if aux else 'off'}: {name} "
                        + (f"at {row['of_limit_pct']:.0f}% of the limit, " if limit else "")
                        + f"{fmt(row['speedup_vs_sparsify'])}x sparsify's step "
                        "(targets at the paper's shape: >= 70%, >= 1.5x)"
                    )
        if limit:
            st.note(
                f"{shape['name']} roofline: GEMM {limit['gemm_ms']:.3f} ms at "
                f"{limits['peak_bf16_tflops']} TFLOP/s + decode {limit['decode_ms']:.3f} ms "
                f"at {limits['peak_tb_s']} TB/s ({limits['peaks_from']})"
            )
        del x
        free(st)


# ---- 3b. where a step's time goes


def profile(st: Stage) -> None:
    """The GPU kernels of one step by device time (torch.profiler over 3 steps), gsae's default
    and sparsify's, AuxK off and on, at the paper's shape: which kernels the next change should
    go after."""
    import torch

    sparse, _how = import_sparse_coder()
    shape = TINY[0] if st.rehearse else PAPER
    gen = torch.Generator(device=st.device).manual_seed(0)
    x = torch.randn(shape["N"], shape["d"], device=st.device, generator=gen)
    for aux in (False, True):
        impls = [("gsae signum auto", None)]
        if sparse is not None:
            impls.append(("sparsify signum bf16 autocast", sparse))
        for name, peer in impls:
            if st.left() < 15:
                st.note(f"{name} AuxK {aux}: no time left")
                continue
            try:
                if peer is None:
                    trainer = gsae_trainer(shape, st.device, "auto", aux, "signum")
                    step = gsae_step(trainer, x, aux)
                else:
                    coder_cls, cfg_cls = peer
                    cfg = cfg_cls(num_latents=shape["m"], k=shape["k"])
                    coder = coder_cls(shape["d"], cfg, device=st.device, dtype=torch.float32)
                    opt = sparsify_optimizer(list(coder.parameters()), shape["m"], "signum")
                    dead = torch.zeros(shape["m"], dtype=torch.bool, device=st.device)
                    dead[::2] = aux
                    step = sparsify_step(coder, opt, x, dead)
                for row in profile_rows(step, st.device, steps=3):
                    st.row(shape=shape["name"], auxk=aux, impl=name, **row)
            except Exception as err:
                st.note(f"{name} AuxK {aux}: {type(err).__name__}: {str(err)[:200]}")
            free(st)


def profile_rows(step, device, steps: int = 3, top: int = 10) -> list[dict]:
    """The ``top`` kernels (GPU) or ops (CPU) of ``steps`` calls of ``step`` by self time, in ms
    per step and % of the total."""
    import torch
    from torch.profiler import ProfilerActivity

    for _ in range(2):  # warm-up: autotuning, allocator, the first (blocking) dead count
        step()
    sync(device)
    gpu = device.type == "cuda"
    acts = [ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    times = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) if gpu else ev.self_cpu_time_total
        if gpu and t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t and t > 0:
            times[ev.key] = times.get(ev.key, 0.0) + t
    total = sum(times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    rows = [{"kernel": "(all)", "ms_per_step": total / 1e3 / steps, "pct": 100.0}]
    rows += [
        {"kernel": key[:90], "ms_per_step": t / 1e3 / steps, "pct": 100 * t / total}
        for key, t in ranked
    ]
    return rows


# ---- 4. end to end


def build_model(kind: str, folder: Path, device) -> Path:
    """A randomly initialised GPTNeoX of ``kind``'s widths and depth with the demo tokenizer
    (bf16 on a GPU): no weights needed."""
    import torch
    import transformers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from gsae.hf.hub import bundled_dir

    transformers.utils.logging.disable_progress_bar()
    hidden, layers, heads, inter = MODELS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    demo = bundled_dir() / "model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, folder / name)
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def e2e_plan(st: Stage) -> list[dict]:
    if st.rehearse:
        common = {"tokens": 4096, "batch_tokens": 512, "ctx_len": 128, "k": 16}
        kinds = ["tiny"]
    else:
        common = {"tokens": 20 * 32768, "batch_tokens": 32768, "ctx_len": 1024, "k": 128}
        kinds = ["pythia-1b", "pythia-160m"]  # the target first
        kinds = os.environ.get("GSAE_SESSION_MODELS", ",".join(kinds)).split(",")
    return [
        {"kind": kind, "impl": impl, **common}
        for kind in kinds
        for impl in ("gsae auto", "sparsify", "gsae per-layer")  # the target's pair first
    ]


def end_to_end(st: Stage) -> None:
    work = Path(tempfile.mkdtemp(prefix="gsae-gpu-session-"))
    st.note(
        "sparsify's Trainer needs `datasets` (with pyarrow and pandas, over the 64 MiB the "
        "device takes): its SparseCoder runs in its Trainer's step instead (one SAE per "
        "layer on one full forward, bf16 autocast, its default schedule-free sign-SGD), on the "
        "same model and text"
    )
    try:
        built = {}
        for plan in e2e_plan(st):
            if st.left() < 20:
                st.note(f"{plan['kind']} {plan['impl']}: no time left")
                continue
            if plan["kind"] not in built:
                built[plan["kind"]] = build_model(plan["kind"], work / plan["kind"], st.device)
                free(st)
            plan.update(
                model=str(built[plan["kind"]]), work=str(work / "runs"), device=st.device.type
            )
            shutil.rmtree(work / "runs", ignore_errors=True)
            box = min(st.left() - 5, 0.45 * st.left() if plan["impl"] != "sparsify" else 1e9)
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--out",
                str(st.out),
                "--e2e-run",
                json.dumps(plan),
            ]
            status, code = run_boxed(cmd, box, prefix="    ")
            result_file = st.out / "e2e-run.json"
            result = json.loads(result_file.read_text()) if result_file.exists() else {}
            result_file.unlink(missing_ok=True)
            if status == "ok" and code:
                status = f"failed (exit {code})"
            if not result.get("tokens_per_s"):  # stopped: what its log says
                result.update(rate_from_log(work / "runs" / "gsae"))
            st.row(model=plan["kind"], impl=plan["impl"], status=status, **result)
        e2e_ratios(st)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def e2e_ratios(st: Stage) -> None:
    """gsae's tokens/s over sparsify's, per model (target on Pythia-1B: auto >= 2x)."""
    rates = {(r["model"], r["impl"]): r.get("tokens_per_s") for r in st.result["rows"]}
    for (model, impl), rate in rates.items():
        peer = rates.get((model, "sparsify"))
        if impl != "sparsify" and isinstance(rate, float) and isinstance(peer, float):
            st.note(
                f"{model}: {impl} at {rate / peer:.2f}x sparsify's tokens/s (one SAE per "
                "layer; target on pythia-1b: --groups auto >= 2x)"
            )


def e2e_child(plan: dict, out: Path) -> int:
    """One end-to-end run (a process of its own): gsae-train or the sparsify peer."""
    import torch
    import transformers

    from gsae import progress

    # no progress bars: their redraws would crowd the device's output, which keeps its tail
    transformers.utils.logging.disable_progress_bar()
    progress.set_progress(False)
    progress.set_progress = lambda enabled: None  # gsae-train would switch them back on

    result = (sparsify_run if plan["impl"] == "sparsify" else gsae_run)(plan)
    if plan["device"] == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    (out / "e2e-run.json").write_text(json.dumps(result, default=str))
    return 0


def gsae_run(plan: dict) -> dict:
    """``gsae-train`` itself (its main, in this process, so its peak memory can be read), with
    the checkpoint and SAE writes switched off."""
    from gsae import progress
    from gsae.cli import train as cli
    from gsae.sae import Sae
    from gsae.train import loop

    cli.set_progress = progress.set_progress  # the no-op e2e_child put there
    loop.TrainingLoop.save_checkpoint = lambda run: None
    Sae.save = lambda self, folder: None
    groups = plan["impl"].split()[1]
    out = Path(plan["work"]) / "gsae"
    argv = [
        "--model",
        plan["model"],
        "--dataset",
        "demo",
        "--repeat",
        "--out",
        str(out),
        "--groups",
        groups,
        "--tokens",
        str(plan["tokens"]),
        "--batch-tokens",
        str(plan["batch_tokens"]),
        "--ctx-len",
        str(plan["ctx_len"]),
        "--k",
        str(plan["k"]),
        "--grouping-tokens",
        str(4 * plan["batch_tokens"]),
        "--scale-tokens",
        str(2 * plan["batch_tokens"]),
        "--log-every",
        "4",
        "--save-every",
        "1000000000000",
        "--device",
        plan["device"],
    ]
    code = cli.main(argv)
    result = {"exit": code, **rate_from_log(out)}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((out / "summary.json").read_text())
        result["saes"] = len(summary["groups"])
        result["fvu"] = {g: v.get("fvu") for g, v in summary["groups"].items()}
    return result


def rate_from_log(out: Path) -> dict:
    """Tokens/s between the first and the last log line (the first steps compile kernels)."""
    try:
        lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return {}
    if len(lines) < 2:
        return {"tokens_per_s_incl_warmup": lines[0]["tokens_per_s"]} if lines else {}
    a, b = lines[0], lines[-1]
    return {
        "tokens_per_s": round((b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"]), 1),
        "steps_timed": b["step"] - a["step"],
        "split_s": b.get("seconds"),
    }


def demo_batches(tokenizer, ctx: int, batch: int):
    """The demo corpus, documents joined by EOS and cut into ``ctx``-token rows (as gsae-train
    packs it), ``batch`` rows at a time, cycled."""
    import torch

    from gsae.hf.hub import bundled_dir

    with gzip.open(bundled_dir() / "corpus.txt.gz", "rt") as f:
        text = f.read()
    ids = tokenizer(text)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // ctx * ctx]).view(-1, ctx)
    while True:
        for i in range(0, rows.shape[0] - batch + 1, batch):
            yield rows[i : i + batch]


def sparsify_run(plan: dict) -> dict:
    """sparsify's SparseCoder in its Trainer's step: one SAE per layer (what its Trainer
    trains by default), each stepped inside the hook of its layer during one full forward."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    coder, how = import_sparse_coder()
    if coder is None:
        raise RuntimeError(f"sparsify: {how}")
    coder_cls, cfg_cls = coder
    device = torch.device(plan["device"])
    model = GPTNeoXForCausalLM.from_pretrained(plan["model"]).to(device).eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(plan["model"])
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    cfg = cfg_cls(num_latents=16 * d, k=plan["k"])
    coders = [coder_cls(d, cfg, device=device, dtype=torch.float32) for _ in range(layers)]
    params = [p for c in coders for p in c.parameters()]
    opt = sparsify_optimizer(params, 16 * d, "signum")  # its Trainer's default
    fvus = [None] * layers

    def hook(i):
        def run(_module, _args, output):
            x = (output[0] if isinstance(output, tuple) else output).flatten(0, 1)
            with torch.enable_grad():
                out = coders[i](x, dead_mask=None)  # the model's dtype, as sparsify's Trainer
                out.fvu.backward()
            fvus[i] = out.fvu.detach()

        return run

    handles = [
        layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.gpt_neox.layers)
    ]
    batch = plan["batch_tokens"] // plan["ctx_len"]
    steps = plan["tokens"] // plan["batch_tokens"]
    stamps = []
    for step, ids in enumerate(demo_batches(tok, plan["ctx_len"], batch)):
        if step == steps:
            break
        with torch.no_grad():
            model(ids.to(device, non_blocking=True))
        for c in coders:
            c.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for c in coders:
            c.set_decoder_norm_to_unit_norm()
        sync(device)
        stamps.append(time.perf_counter())
        if step % 4 == 3:
            say(f"sparsify step {step + 1}: fvu {[round(float(f), 3) for f in fvus]}")
    for h in handles:
        h.remove()
    timed_steps = len(stamps) - 4  # the first steps compile kernels, as gsae's first log line
    rate = (
        plan["batch_tokens"] * timed_steps / (stamps[-1] - stamps[3]) if timed_steps > 0 else None
    )
    return {
        "tokens_per_s": round(rate, 1) if rate else None,
        "steps_timed": timed_steps,
        "saes": layers,
        "sparsify_import": how,
        "fvu": [round(float(f), 4) for f in fvus if f is not None],
    }


# ---- 5. the GPU-marked tests


def gpu_tests(st: Stage) -> None:
    import xml.etree.ElementTree as ET

    junit = st.out / "gpu-tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "tests/",
    ]
    env = dict(os.environ)
    if st.rehearse:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    status, code = run_boxed(cmd, max(5.0, st.left() - 3), prefix="    ", env=env)
    st.result["pytest_exit"] = code
    st.result["pytest_status"] = status
    if not junit.exists():
        st.note("pytest wrote no junit report")
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:200]}"
        name = f"{case.get('classname')}::{case.get('name')}"
        st.result["rows"].append(
            {"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0)}
        )
    counts: dict = {}
    for row in st.result["rows"]:
        key = row["outcome"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    sync_tests = [r for r in st.result["rows"] if "sync" in r["test"].lower()]
    st.result["counts"] = counts
    st.result["host_sync_tests"] = sync_tests
    say(f"  {counts}; host-sync tests: {[(r['test'], r['outcome']) for r in sync_tests]}")
    if not sync_tests:
        st.note("no GPU test with 'sync' in its name was collected: the host-sync test is missing")


# --------------------------------------------------------------------------------------------
# the report


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_session.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_session.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    stages = report["stages"]
    info = stages.get("versions", {}).get("info", {})
    dev = info.get("device", {})
    lines = [
        f"# gsae GPU session: {dev.get('name', '?')}",
        "",
        f"- date: {report['started']}; commit: {info.get('commit', '?')}; "
        f"budget {report['budget_s']:.0f} s"
        + (" (CPU rehearsal, tiny shapes)" if report["rehearse"] else ""),
        "- versions: "
        + ", ".join(
            f"{k} {info.get(k)}"
            for k in ("python", "torch", "cuda", "hip", "triton", "transformers", "sparsify")
        ),
        f"- device: {dev}",
        f"- gsae precision setting: {info.get('gsae_precision')}",
        f"- sparsify import: {info.get('sparsify_import')}",
        "",
    ]
    for name, r in stages.items():
        lines += [f"## {name}: {r['status']} ({r['seconds']} s of a {r['box_s']} s box)", ""]
        if r.get("error"):
            lines += [f"error: `{r['error']}`", ""]
        rows = r.get("rows", [])
        if rows and name != "versions":
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
            lines.append("")
        lines += [f"- {n}" for n in r.get("notes", [])]
        if r.get("notes"):
            lines.append("")
    return "\n".join(lines) + "\n"


def cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
