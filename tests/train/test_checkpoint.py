"""A gsae-train run's checkpoint swap at every intermediate state, and a failed write."""

import os
import shutil

import pytest
import torch

from gsae.sae import Sae, SaeConfig
from gsae.train import checkpoint
from gsae.train.step import SaeTrainer


def trainers(mark=0):
    """Two group trainers whose weights carry ``mark``."""
    cfg = SaeConfig(d=8, num_latents=16, k=2)
    out = {"a": SaeTrainer(Sae(cfg, [0, 1])), "b": SaeTrainer(Sae(cfg, [2]))}
    with torch.no_grad():
        for trainer in out.values():
            trainer.sae.W_enc.add_(mark)
    return out


def save(out, tokens, mark):
    state = {"tokens": tokens, "steps": tokens, "groups": {"a": [0, 1], "b": [2]}}
    checkpoint.save(out, state, trainers(mark))


class Snapshots:
    """Copy the output folder just before every file-system change: the states a power cut
    (no clean-up of any kind) would leave."""

    def __init__(self, monkeypatch, out, root):
        self.out, self.root, self.states = out, root, []
        for module, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, original):
        def op(*args, **kwargs):
            state = self.root / f"state{len(self.states)}"
            shutil.copytree(self.out, state, copy_function=shutil.copy2)
            self.states.append(state)
            return original(*args, **kwargs)

        return op


def test_every_intermediate_state_of_the_swap_loads_the_newest_complete_checkpoint(
    tmp_path, monkeypatch
):
    out = tmp_path / "run"
    save(out, 100, mark=1)
    save(out, 200, mark=2)  # latest 200, previous 100
    snaps = Snapshots(monkeypatch, out, tmp_path / "snaps")
    save(out, 300, mark=3)
    monkeypatch.undo()
    assert len(snaps.states) >= 4  # rmtree of the previous, two renames, ...
    want = {200: trainers(2), 300: trainers(3)}
    for state in [*snaps.states, out]:
        loaded = trainers(9)
        manifest = checkpoint.load(state, loaded)
        assert manifest["tokens"] in (200, 300), state
        for name, trainer in loaded.items():
            expected = want[manifest["tokens"]][name].sae.W_enc
            assert torch.equal(trainer.sae.W_enc, expected), (state, name)
        # the staging folder completed before any rename: from then on it is the one loaded
        previous = checkpoint.read_manifest(state / checkpoint.PREVIOUS)
        assert previous["tokens"] == (100 if manifest["tokens"] == 200 else 200), state
        assert not (state / checkpoint.STAGING).exists()
        leftovers = [p.name for p in state.iterdir() if p.name.startswith(".")]
        assert not leftovers, (state, leftovers)
    assert checkpoint.load(out, trainers(9))["tokens"] == 300


def test_a_failed_write_leaves_the_checkpoints_as_they_were(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save(out, 100, mark=1)
    save(out, 200, mark=2)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    import gsae.io

    real = gsae.io.save_safetensors
    calls = []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr("gsae.sae.save_safetensors", full_disk)  # the SAE files
    monkeypatch.setattr("gsae.train.step.save_safetensors", full_disk)  # the trainer state
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        save(out, 300, mark=3)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert checkpoint.load(out, trainers(9))["tokens"] == 200
