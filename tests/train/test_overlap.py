"""The model forward of the next batch runs ahead of the SAE steps of the current one: on a GPU
on a stream of its own, overlapping them; the weights are those of the plain order, bit for bit.
Input ids reach the GPU from pinned memory."""

import pytest
import torch
from safetensors.torch import load_file
from tiny import train_flags

from gsae.cli.train import main as train_main
from gsae.device import to_device
from gsae.hf import hooks
from gsae.train import loop

pytestmark = [pytest.mark.usefixtures("offline", "one_thread")]

SMALL = [*train_flags("1k"), "--repeat"]
NAMES = ("layers_0-1", "layer_2", "layer_3")


def train(model, corpus, out, device: str, monkeypatch, ahead: bool | None) -> list[str]:
    """A run; returns the order of the training forwards (F) and SAE steps (S)."""
    order = []
    reader, step = hooks.ActivationReader.__call__, loop.TrainingLoop.step
    monkeypatch.setattr(loop.Feed, "forward_ahead", ahead)
    monkeypatch.setattr(
        hooks.ActivationReader,
        "__call__",
        lambda self, *a, **k: order.append("F") or reader(self, *a, **k),
    )
    monkeypatch.setattr(
        loop.TrainingLoop, "step", lambda self, *a, **k: order.append("S") or step(self, *a, **k)
    )
    argv = ["--model", str(model), "--dataset", str(corpus), "--out", str(out), *SMALL]
    assert train_main([*argv, "--device", device]) == 0
    monkeypatch.undo()
    return "".join(order)


def weights(out):
    return {n: load_file(str(out / n / "sae.safetensors")) for n in NAMES}


def assert_same(a, b):
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key].to(a[name][key].device)), (name, key)


def check_orders(plain: str, ahead: str) -> None:
    # two scale batches, then 8 steps and the held-out batch of the final FVU
    assert plain == "FF" + "FS" * 8 + "F", plain
    # the forward of step i + 1 before step i; the held-out batch's, ahead too, is not run again
    assert ahead == "FF" + "FF" + "SF" * 7 + "S", ahead


def test_forward_ahead_changes_the_order_not_the_weights(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch
):
    plain = train(tiny_model_dir, tiny_corpus, tmp_path / "a", "cpu", monkeypatch, None)
    ahead = train(tiny_model_dir, tiny_corpus, tmp_path / "b", "cpu", monkeypatch, True)
    check_orders(plain, ahead)  # on a CPU the default is the plain order
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


@pytest.mark.gpu
def test_on_a_gpu_the_forward_runs_ahead_on_its_own_stream(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch
):
    streams = []
    reader = hooks.ActivationReader.__call__

    def on_stream(self, *a, **k):
        streams.append(torch.cuda.current_stream().cuda_stream)
        return reader(self, *a, **k)

    monkeypatch.setattr(hooks.ActivationReader, "__call__", on_stream)
    default_stream = torch.cuda.current_stream().cuda_stream
    ahead = train(tiny_model_dir, tiny_corpus, tmp_path / "b", "cuda", monkeypatch, None)
    plain = train(tiny_model_dir, tiny_corpus, tmp_path / "a", "cuda", monkeypatch, False)
    check_orders(plain, ahead)
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    training = streams[2:10]  # the scale pass reads on the main stream
    assert training and all(s != default_stream for s in training), streams


@pytest.mark.gpu
def test_input_ids_reach_the_gpu_from_pinned_memory(monkeypatch):
    pinned = []
    pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(1) or pin(t, *a))
    ids = torch.arange(64).view(2, 32)
    on_gpu = to_device(ids, torch.device("cuda"))
    assert pinned and torch.equal(on_gpu.cpu(), ids)


def test_on_a_cpu_nothing_is_pinned_or_copied():
    ids = torch.arange(8)
    assert to_device(ids, torch.device("cpu")) is ids
