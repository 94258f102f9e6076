"""Test setup. On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1, which must
be set before anything imports triton: triton decides at decoration time whether a kernel is
compiled or interpreted. With a GPU, the kernels are compiled and tested on it.
"""

import os
import signal
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
        )
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change note
# backend="triton" tests exercise the fused encoder kernel; the default ("gemm": a GEMM and
# torch.topk, the torch backend's forward) is covered by the "triton-gemm" cases that name it
os.environ.setdefault("GSAE_ENCODER", "fused")

# the tests of each area (tests/kernels/, tests/hf/, ...) import the shared helpers of this
# folder (tiny, tolerances, chat_stub) by name. pytest's default import mode ("prepend") puts
# the folder of this conftest.py and of each test file on sys.path, so test files' names must be
# unique across the areas; the helpers' folder is named here too, not left to that mode alone.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402

# a shell starts background jobs (`.ci/run &`, nohup) with SIGINT ignored, and Python keeps an
# ignored SIGINT: the Ctrl-C tests would then test nothing. Python's own handler, as in a
# foreground run.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# where the Triton backend runs: the GPU when there is one, else the interpreter on the CPU
TRITON_DEVICE = "cuda" if GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a GPU (CUDA or ROCm)")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer, d=32 GPTNeoX with random weights and a BPE tokenizer, saved locally."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gptneox"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    from tiny import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny.txt")


@pytest.fixture
def offline(monkeypatch):
    """No hub: the tests must never wait on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a shared machine: there, two
    OpenMP threads spin-waiting on each other made a 128x32 matmul take 32 ms instead of 0.04."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tiny_model_dir):
    """Real gsae-train runs on the tiny model: ``grouped`` (G=2: layers [0], [1, 2], [3]) and
    ``per-layer``, 2k tokens each, on ``corpus`` (~10k tokens: most of it never trained on)."""
    from tiny import RUN_BUDGET, flags, write_corpus

    from gsae.cli.train import main as train_main

    root = tmp_path_factory.mktemp("trained-runs")
    corpus = write_corpus(root / "corpus.txt", copies=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {"corpus": corpus, "model": tiny_model_dir}
        for name, groups in (("grouped", "2"), ("per-layer", "per-layer")):
            argv = flags(
                model=tiny_model_dir,
                dataset=corpus,
                out=root / name,
                groups=groups,
                **RUN_BUDGET,
                tokens="2k",
            )
            assert train_main(argv) == 0
            runs[name] = root / name
    finally:
        torch.set_num_threads(threads)
    return runs
