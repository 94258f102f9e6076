"""Test setup. On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1, which must
be set before anything imports triton: triton decides at decoration time whether a kernel is
compiled or interpreted. With a GPU, the kernels are compiled and tested on it.
"""

import os
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

import pytest  # noqa: E402

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


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine
    OpenMP barriers between two threads cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
