"""The pieces of a gsae-train run on their own: the layer sampler, the checkpoint swap at every
intermediate state, the Ctrl-C guard and the time split."""

import os
import shutil
import signal
import sys
import threading

import pytest
import torch

from gsae.sae import Sae, SaeConfig
from gsae.train import checkpoint
from gsae.train.interrupt import StepGuard
from gsae.train.log import StepTimer
from gsae.train.sampler import LayerSampler
from gsae.train.step import SaeTrainer

GROUPS = [[0, 1, 2], [3, 4], [5]]


def coded(n, layers=6):
    """[L, n, 2] activations whose row says where it came from: (layer, token)."""
    layer = torch.arange(layers, dtype=torch.float32)[:, None].expand(layers, n)
    token = torch.arange(n, dtype=torch.float32)[None, :].expand(layers, n)
    return torch.stack([layer, token], dim=2)


def test_each_row_is_the_drawn_layers_activation_and_gets_its_scale():
    hidden = coded(500)
    sampler = LayerSampler(GROUPS, list(range(6)), seed=1, device="cpu")
    sae = Sae(SaeConfig(d=2, num_latents=4, k=1), GROUPS[0])
    for layer, scale in zip(GROUPS[0], (0.5, 2.0, 7.0), strict=True):
        sae.set_scale(layer, scale)
    for step in range(3):
        for group, batch in zip(GROUPS, sampler.draw(hidden, step), strict=True):
            layer = torch.as_tensor(batch.layer).expand(batch.x.shape[0])
            assert batch.tokens == 500 and batch.x.shape == (500, 2)
            assert torch.equal(batch.x[:, 0].long(), layer)  # row <-> layer id
            assert torch.equal(batch.x[:, 1].long(), torch.arange(500))  # every token, in order
            assert set(layer.tolist()) <= set(group)
        first = sampler.draw(hidden, step)[0]
        scales = {0: 0.5, 1: 2.0, 2: 7.0}
        want = torch.tensor([scales[int(x)] for x in first.layer])[:, None] * first.x
        torch.testing.assert_close(sae.normalize(first.x, first.layer), want)  # layer <-> scale


def test_layers_are_uniform_per_token_and_independent_across_groups():
    from scipy.stats import chi2_contingency, chisquare

    hidden = coded(2000)
    sampler = LayerSampler(GROUPS, list(range(6)), seed=0, device="cpu")
    joint = torch.zeros(3, 2)
    for step in range(10):
        a, b, _ = sampler.draw(hidden, step)
        joint.index_put_((a.layer, b.layer - 3), torch.ones(2000), accumulate=True)
    assert chisquare(joint.sum(1).numpy()).pvalue > 1e-3  # uniform over the group's 3 layers
    assert chisquare(joint.sum(0).numpy()).pvalue > 1e-3
    assert chi2_contingency(joint.numpy()).pvalue > 1e-3  # group A's draw says nothing of B's
    # and each token draws anew: consecutive tokens agree as often as chance says (1/3)
    a = sampler.draw(hidden, 11)[0].layer
    same = float((a[1:] == a[:-1]).float().mean())
    assert abs(same - 1 / 3) < 0.05, same


def test_draws_depend_on_the_seed_and_step_alone():
    hidden = coded(300)
    one = LayerSampler(GROUPS, list(range(6)), seed=5, device="cpu")
    for step in range(4):
        one.draw(hidden, step)
    fresh = LayerSampler(GROUPS, list(range(6)), seed=5, device="cpu")  # a resumed run
    assert torch.equal(one.draw(hidden, 4)[0].layer, fresh.draw(hidden, 4)[0].layer)
    assert not torch.equal(fresh.draw(hidden, 4)[0].layer, fresh.draw(hidden, 5)[0].layer)
    other = LayerSampler(GROUPS, list(range(6)), seed=6, device="cpu")
    assert not torch.equal(other.draw(hidden, 4)[0].layer, fresh.draw(hidden, 4)[0].layer)


def test_every_layer_mode_stacks_the_group_and_counts_tokens():
    hidden = coded(50)
    sampler = LayerSampler(GROUPS, list(range(6)), seed=0, device="cpu", every_layer=True)
    a, b, c = sampler.draw(hidden, 0)
    assert a.x.shape == (150, 2) and a.tokens == 50
    assert (
        torch.equal(a.x[:, 0].long(), a.layer)
        and a.layer.tolist() == [0] * 50 + [1] * 50 + [2] * 50
    )
    assert c.x.shape == (50, 2) and c.layer == 5
    assert b.layer.tolist() == [3] * 50 + [4] * 50


# ---- the checkpoint swap


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


# ---- Ctrl-C held to step boundaries


def test_a_ctrl_c_inside_a_step_waits_for_its_end_and_a_second_one_does_not():
    guard = StepGuard()
    done = []
    with guard:
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                signal.raise_signal(signal.SIGINT)
                done.append("rest of the step")
        assert done == ["rest of the step"] and not guard.broken
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # between steps: at once
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # the second: at once, and the step is broken
                done.append("never")
        assert guard.broken and "never" not in done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_lost_in_a_finalizer_stops_the_next_step():
    """Between steps SIGINT raises at once; if that happens inside a finalizer (a generator
    closed by the garbage collector, as after ``next(model.parameters())``) Python drops the
    exception: the next step must raise it before it runs, not train on."""
    guard = StepGuard()
    done = []

    def params():
        try:
            yield 1
        finally:
            signal.raise_signal(signal.SIGINT)  # the handler runs during the close

    with guard:
        gen = params()
        next(gen)
        del gen  # closed by its finalizer: the KeyboardInterrupt is dropped there
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                done.append("step")
        assert done == []
        with guard.step():  # raised once: the following step runs
            done.append("next")
    assert done == ["next"] and sys.unraisablehook is not guard._unraisable


def test_the_guard_does_nothing_off_the_main_thread():
    errors = []

    def work():
        try:
            with StepGuard() as guard, guard.step():
                pass
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors


# ---- the time split


@pytest.mark.gpu
def test_the_gpu_time_split_measures_the_work_not_its_launch():
    timer = StepTimer("cuda")
    timer.waiting()
    timer.mark()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work, launched in microseconds
    timer.mark()
    timer.mark()
    totals = timer.totals()
    assert totals["forward"] > 0.02, totals


def test_each_layer_set_gets_its_own_init_seed():
    """A group SAE and a per-layer SAE of the same run seed must not share a random decoder
    (MMCS between the runs would then measure the init), while a rerun reproduces it."""
    from gsae.train.settings import sae_seed

    seeds = {tuple(layers): sae_seed(0, layers) for layers in ([0], [0, 1, 2], [1], [5])}
    assert len(set(seeds.values())) == len(seeds)
    assert sae_seed(0, [2, 1, 0]) == seeds[(0, 1, 2)] and sae_seed(1, [0]) != seeds[(0,)]


def test_demo_defaults_all_take_effect():
    """`gsae-train --model demo --dataset demo` (the README's main command) must get every demo
    default: without --repeat the 482k-token corpus runs out before the 1M-token budget."""
    from gsae.cli.train import DEMO_DEFAULTS, parser, settings_from_args

    s = settings_from_args(parser().parse_args(["--model", "demo", "--dataset", "demo"]))
    assert s.repeat is True and s.tokens == 1_000_000 and s.ctx_len == 128
    flags = s.flags()
    for key in DEMO_DEFAULTS:
        assert key in flags, key
    assert flags["k"] == 32 and s.batch_tokens == 2048
    assert settings_from_args(parser().parse_args(["--model", "pythia-70m"])).repeat is False
