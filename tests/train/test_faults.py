"""gsae-train under faults: Ctrl-C anywhere, a second Ctrl-C during the checkpoint
swap, interrupts before training, data running out, NaN, --overwrite, a full disk, corrupted
checkpoints and file permissions. Each test injects the fault (real SIGINTs, failing writes) and
checks that nothing trained is lost and that a resumed run ends bit-identical to an uninterrupted
one."""

import errno
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import config_flags, train_flags

from gsae.cli.train import main as train_main
from gsae.train import loop, pipeline

pytestmark = [
    pytest.mark.usefixtures("offline", "one_thread"),
]

# 8 steps of 128 tokens over 3 SAEs (groups [0, 1], [2] and the last layer's own [3]); no
# distance measurement, so each run takes well under a second on one thread
SMALL = [*train_flags("1k"), "--save-every", "1M", "--device", "cpu"]
NAMES = ("layers_0-1", "layer_2", "layer_3")


# the batch warm-up over the first 5 steps (4 of 32 tokens each): a fault lands inside one
WARMUP = {"warmup_tokens": 640, "warmup_batch": 32}


def argv(model, corpus, out, *extra, warmup=WARMUP):
    config = config_flags(Path(out).parent, **warmup)
    return [
        *("--model", str(model), "--dataset", str(corpus), "--out", str(out)),
        *(*SMALL, *config, *extra),
    ]


def final_weights(out: Path) -> dict:
    return {n: load_file(str(out / n / "sae.safetensors")) for n in NAMES}


def assert_same_weights(a: dict, b: dict, context=""):
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (context, name, key)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    return _uninterrupted(tiny_model_dir, tiny_corpus, tmp_path_factory, WARMUP)


@pytest.fixture(scope="module")
def straight_without_warmup(tiny_model_dir, tiny_corpus, tmp_path_factory):
    return _uninterrupted(tiny_model_dir, tiny_corpus, tmp_path_factory, {"warmup_tokens": 0})


def _uninterrupted(model, corpus, tmp_path_factory, warmup: dict) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(1)
        assert train_main(argv(model, corpus, out, "--repeat", warmup=warmup)) == 0
    torch.set_num_threads(threads)
    return final_weights(out)


@pytest.fixture(scope="module")
def step_events(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """How many profile events (Python and C calls and returns) one training step makes."""
    counted = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        hook = InStep(mp, step=4, event=None)
        out = tmp_path_factory.mktemp("count") / "run"
        assert train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat")) == 0
        torch.set_num_threads(threads)
        counted.append(hook.events)
    return counted[0]


@pytest.fixture(autouse=True)
def _grad_mode_survives():
    """An interrupted run must not leave autograd switched off for the rest of the process
    (a notebook would go on without gradients)."""
    yield
    enabled = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    torch.set_grad_enabled(True)
    assert enabled, "an interrupted run left autograd switched off"


def sigint():
    """A real Ctrl-C: SIGINT to this process, handled before raise_signal returns."""
    signal.raise_signal(signal.SIGINT)


class InStep:
    """Send SIGINT at the ``event``-th profile event (Python and C calls and returns) of training
    step ``step`` (0-based): a point chosen inside the step, not at a hook after it. The step is
    ``Run.train_batch`` (the forward, every SAE update, the counters, the log and a due
    checkpoint) or, with ``method="step"``, only the SAE updates. ``event=None`` only counts."""

    def __init__(self, monkeypatch, step: int, event: int | None, method: str = "train_batch"):
        self.step, self.event, self.events, self.sent = step, event, 0, False
        original = getattr(loop.TrainingLoop, method)
        calls = []

        def wrapped(run, *args, **kwargs):
            calls.append(1)
            if len(calls) - 1 != self.step:
                return original(run, *args, **kwargs)
            sys.setprofile(self._profile)
            try:
                return original(run, *args, **kwargs)
            finally:
                sys.setprofile(None)

        monkeypatch.setattr(loop.TrainingLoop, method, wrapped)

    def _profile(self, frame, what, arg):
        self.events += 1
        if self.events == self.event and not self.sent:
            self.sent = True
            sys.setprofile(None)
            sigint()


POINTS = 16  # SIGINT at 16 points spread over a step's profile events


@pytest.mark.parametrize("point", range(POINTS))
def test_ctrl_c_at_any_point_inside_a_step_resumes_to_identical_weights(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, straight, step_events, point
):
    out = tmp_path / "run"
    # the count varies a little from run to run (tqdm redraws by the clock): stay below it
    event = 1 + point * (step_events * 19 // 20) // POINTS
    hit = InStep(monkeypatch, step=4, event=event)
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat"))
    assert hit.sent, f"step 4 made {hit.events} profile events this time, not {step_events}"
    assert code == 130
    monkeypatch.undo()
    assert train_main(["--resume", str(out)]) == 0
    where = f"SIGINT at event {event} of {step_events} of step 4"
    assert_same_weights(straight, final_weights(out), where)


class SecondCtrlC:
    """After the first SIGINT, send a second one just before the ``n``-th file-system change
    (rename, replace, rmtree, unlink, mkdir): every intermediate state of the checkpoint swap."""

    OPS = (
        ("os", "replace"),
        ("os", "rename"),
        ("os", "unlink"),
        ("os", "mkdir"),
        ("shutil", "rmtree"),
    )

    def __init__(self, monkeypatch, n: int):
        self.n, self.count, self.armed, self.fired = n, 0, False, False
        for module, name in self.OPS:
            target = {"os": os, "shutil": shutil}[module]
            original = getattr(target, name)
            monkeypatch.setattr(target, name, self._wrap(original))

    def _wrap(self, original):
        def op(*args, **kwargs):
            if self.armed and not self.fired:
                self.count += 1
                if self.count == self.n:
                    self.fired = True
                    sigint()
            return original(*args, **kwargs)

        return op


@pytest.mark.parametrize("n", range(1, 13))
def test_second_ctrl_c_at_each_point_of_the_checkpoint_swap_resumes(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, straight, n
):
    """A checkpoint every step, so step 4's swap has a latest and a previous checkpoint to
    rotate; the first Ctrl-C lands in step 4's SAE updates, the second at the n-th file-system
    change of the checkpoint that step then writes."""
    out = tmp_path / "run"
    second = SecondCtrlC(monkeypatch, n)
    hit = InStep(monkeypatch, step=4, event=1, method="step")
    original = hit._profile

    def first_then_arm(frame, what, arg):
        original(frame, what, arg)
        second.armed = hit.sent

    hit._profile = first_then_arm
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--save-every", "128"))
    assert code == 130
    monkeypatch.undo()
    if not second.fired:
        pytest.skip(f"the checkpoint swap makes fewer than {n} file-system changes")
    assert train_main(["--resume", str(out)]) == 0, f"no resume after a cut at change {n}"
    assert_same_weights(straight, final_weights(out), f"second Ctrl-C at change {n}")


@pytest.mark.parametrize("stage", ["model", "grouping", "scales"])
def test_ctrl_c_before_training_says_what_was_kept_and_resumes(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys, stage
):
    from gsae import grouping

    out = tmp_path / "run"
    extra = ["--repeat", "--groups", "auto", "--grouping-tokens", "256"]
    targets = {
        "model": (pipeline, "load_model"),
        "grouping": (grouping.AngularDistances, "update"),
        "scales": (pipeline, "activation_scales"),
    }
    owner, name = targets[stage]
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        sigint()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    assert train_main(argv(tiny_model_dir, tiny_corpus, out, *extra)) == 130
    err = capsys.readouterr().err
    assert "checkpoint saved" not in err, err
    monkeypatch.undo()
    if stage == "scales":  # the finished grouping pass is kept, and said to be
        assert (out / "groups.json").exists()
        assert "groups.json" in err, err
        measured = []
        update = grouping.AngularDistances.update
        monkeypatch.setattr(
            grouping.AngularDistances,
            "update",
            lambda self, h: measured.append(1) or update(self, h),
        )
        assert train_main(["--resume", str(out)]) == 0
        assert not measured, "resuming measured the distances again"
    elif stage == "grouping":
        assert train_main(["--resume", str(out)]) == 0
    else:
        assert not (out / "checkpoint").exists()


def test_data_running_out_checkpoints_and_resume_takes_safe_flags(
    tiny_model_dir, tiny_corpus, tmp_path, capsys, straight
):
    out = tmp_path / "run"
    # the tiny corpus has ~2.1k tokens: a 4k budget without --repeat runs out
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--tokens", "4k"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "ran out" in err and "--repeat" in err, err
    assert (out / "checkpoint").is_dir()
    for name in NAMES:  # what was trained is written out, too
        assert (out / name / "sae.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and 1500 < summary["tokens"] < 4000
    assert train_main(["--resume", str(out), "--k", "4", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--k" in err and "--lr" in err, err
    assert train_main(["--resume", str(out), "--repeat", "--log-every", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["tokens"] >= 4000


def test_a_finished_run_resumed_with_more_tokens_goes_on_exactly(
    tiny_model_dir, tiny_corpus, tmp_path, straight
):
    out = tmp_path / "run"
    assert train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--tokens", "512")) == 0
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    assert train_main(["--resume", str(out), "--tokens", "1k"]) == 0
    assert_same_weights(straight, final_weights(out), "512 tokens, then resumed to 1k")
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # one log line per logged step


@pytest.mark.parametrize("warmup, skipped", [(WARMUP, 32), ({"warmup_tokens": 0}, 128)])
def test_non_finite_loss_checkpoints_what_was_trained_and_stops(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys, warmup, skipped
):
    """A NaN in step 4's batch: the step (in the warm-up, the one of its 4 steps that holds the
    NaN) is skipped, the run stops at the check with what was trained saved."""
    from gsae.hf import hooks

    reader_call = hooks.ActivationReader.__call__
    calls = []

    def poisoned(self, ids, mask=None):
        hidden = reader_call(self, ids, mask)
        calls.append(1)
        if len(calls) == 4 + 2:  # two scale-estimate batches, then step 4
            hidden = hidden.clone()
            hidden[:, 3, 5] = float("nan")  # token 3, at every layer: every SAE sees it
        return hidden

    monkeypatch.setattr(hooks.ActivationReader, "__call__", poisoned)
    out = tmp_path / "run"
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", warmup=warmup))
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err, err
    assert (out / "checkpoint").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    for group in summary["groups"].values():
        # the skipped step trained nothing: its tokens are not counted
        assert group["tokens_trained"] == summary["tokens"] - skipped, summary
        assert group["skipped_steps"] == 1
    for name in NAMES:
        for tensor in load_file(str(out / name / "sae.safetensors")).values():
            assert torch.isfinite(tensor).all()

    def refuse(constant):
        raise ValueError(f"bare {constant} in log.jsonl")

    for line in (out / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)  # the NaN loss is logged as null


def test_overwrite_removes_the_old_run_before_anything_else(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    old = argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--groups", "per-layer")
    assert train_main(old) == 0
    (out / "notes.txt").write_text("mine")  # not the run's: kept
    InStep(monkeypatch, step=0, event=1)  # Ctrl-C in the new run's first step
    assert train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--overwrite")) == 130
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    assert not {"layer_0", "layer_1"} & set(left), left  # the old run's SAEs are gone
    assert (out / "notes.txt").read_text() == "mine"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(set(r["groups"]) == set(NAMES) for r in logged), "old log lines kept"
    assert json.loads((out / "run.json").read_text())["settings"]["groups"] == "even:2"
    assert train_main(["--resume", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= set(NAMES)
    assert not {"layer_0", "layer_1"} & {p.name for p in out.iterdir()}


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys, straight
):
    out = tmp_path / "run"
    fsync = os.fsync

    def full(fd):  # the first checkpoint lands; every write after it fails
        if (out / "checkpoint").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--save-every", "300"))
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == 1, err
    assert "No space left on device" in err and "--resume" in err, err
    assert "Traceback" not in err
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert not leftovers, leftovers
    assert train_main(["--resume", str(out)]) == 0
    assert_same_weights(straight, final_weights(out), "resumed after a full disk")


def test_checkpoints_hold_no_pickle_and_corruption_is_reported(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys, straight
):
    out = tmp_path / "run"
    InStep(monkeypatch, step=5, event=1)
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--save-every", "300"))
    assert code == 130
    monkeypatch.undo()
    files = [p for p in (out / "checkpoint").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), files
    state = next(p for p in files if p.name.endswith(".safetensors") and "state" in p.name)
    state.write_bytes(state.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert train_main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(state.relative_to(out)) in err and "Traceback" not in err, err
    assert "--previous-checkpoint" in err, err  # an earlier checkpoint exists: say how to use it
    assert train_main(["--resume", str(out), "--previous-checkpoint"]) == 0
    assert_same_weights(straight, final_weights(out), "resumed from the previous checkpoint")


def test_outputs_respect_the_umask(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    InStep(monkeypatch, step=6, event=1)
    old = os.umask(0o022)
    try:
        assert (
            train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--save-every", "300"))
            == 130
        )
        monkeypatch.undo()
        assert train_main(["--resume", str(out)]) == 0
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    wrong = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in paths
        if p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)
    }
    assert not wrong, wrong


# ---- exceptions inside a step: an OOM, a kernel that cannot launch, a CUDA error


def checkpoint_steps(out: Path) -> int:
    return json.loads((out / "checkpoint" / "run_state.json").read_text())["steps"]


class Fault:
    """Raise ``error`` at the ``event``-th call of a Python function of gsae, its kernels, torch
    or transformers inside training step ``step`` (0-based), as :class:`InStep` sends SIGINT: at
    any point inside the step. (Calls inside tqdm and the standard library are not counted:
    an exception raised there may be caught by their own handlers.) ``event=None`` counts."""

    OURS = ("/gsae/", "/gsae_kernels/", "/torch/", "/transformers/")
    # callers that catch any exception of what they call (transformers' probe of torch.compile)
    SWALLOWING = ("is_torchdynamo_compiling",)

    def __init__(self, monkeypatch, step: int, event: int | None, error: Exception):
        self.raised, self.events = False, 0
        hit = InStep(monkeypatch, step=step, event=None)

        def profile(frame, what, arg):
            if what != "call" or not any(p in frame.f_code.co_filename for p in self.OURS):
                return
            if self._swallowed(frame):
                return
            self.events += 1
            if self.events == event and not self.raised:
                self.raised = True
                sys.setprofile(None)
                raise error

        hit._profile = profile

    def _swallowed(self, frame, depth: int = 4) -> bool:
        """Whether ``frame`` runs under (within ``depth`` calls) a caller of SWALLOWING."""
        for _ in range(depth):
            frame = frame.f_back
            if frame is None:
                return False
            if frame.f_code.co_name in self.SWALLOWING:
                return True
        return False


@pytest.fixture(scope="module")
def fault_events(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """How many calls :class:`Fault` counts in one training step."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        fault = Fault(mp, step=4, event=None, error=RuntimeError())
        out = tmp_path_factory.mktemp("count_calls") / "run"
        assert train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat")) == 0
    return fault.events


@pytest.mark.parametrize("point", range(8))
def test_an_exception_anywhere_in_a_step_keeps_a_checkpoint_that_resumes_identically(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys, straight, fault_events, point
):
    """A checkpoint every 300 tokens (after steps 3, 5, 8); the fault lands in step 4 (0-based):
    a checkpoint of step 4 is saved when nothing of step 4 reached the SAEs, else step 3's
    stays; either way the run resumes to the uninterrupted run's weights."""
    out = tmp_path / "run"
    event = 1 + point * (fault_events * 19 // 20) // 8
    fault = Fault(monkeypatch, 4, event, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--save-every", "300"))
    err = capsys.readouterr().err
    assert fault.raised
    monkeypatch.undo()
    assert code == 1, err
    assert "OutOfMemoryError in training step 5" in err and "--resume" in err, err
    steps = checkpoint_steps(out)
    if "saved a checkpoint of step 4" in err:
        assert steps == 4, err
    else:
        assert "the checkpoint of step 3 is kept" in err and steps == 3, err
    assert train_main(["--resume", str(out)]) == 0
    assert_same_weights(straight, final_weights(out), f"an exception at event {event} of step 4")


@pytest.mark.parametrize(
    "where, saved",
    [
        ("forward", 4),  # the model forward: nothing of step 4 has happened
        ("first update", 4),  # the first SAE's optimiser step: its weights are still step 4's
        ("second update", 3),  # the second SAE's: the first one holds step 5 already
        ("log", 6),  # writing the log line of step 6 (0-based 5): the step is complete
        # in the warm-up each SAE takes 4 steps a batch: after the first, the state is changed
        ("first warm-up update", 4),
        ("second warm-up update", 3),
    ],
)
def test_an_exception_says_what_was_kept(
    tiny_model_dir,
    tiny_corpus,
    tmp_path,
    monkeypatch,
    capsys,
    straight,
    straight_without_warmup,
    where,
    saved,
):
    from gsae.hf import hooks
    from gsae.train.step import SaeTrainer

    out = tmp_path / "run"
    calls = []

    def failing(original, at):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                raise RuntimeError(f"injected fault in the {where}")
            return original(*args, **kwargs)

        return call

    if where == "forward":  # two scale batches, then steps 0..4
        target = (hooks.ActivationReader, "__call__", 2 + 5)
    elif where == "log":  # log lines after steps 2, 4, 6
        target = (loop.TrainingLoop, "log_step", 3)
    elif "warm-up" in where:  # 3 SAEs x 4 warm-up steps a batch: step 4's first SAE's
        target = (SaeTrainer, "_update", 12 * 4 + (1 if where.startswith("first") else 2))
    else:  # three SAEs per step: step 4's first and second updates
        target = (SaeTrainer, "_update", 3 * 4 + (1 if where == "first update" else 2))
    owner, name, at = target
    monkeypatch.setattr(owner, name, failing(getattr(owner, name), at))
    warmup = WARMUP if "warm-up" in where else {"warmup_tokens": 0}
    flags = ("--repeat", "--save-every", "300")
    code = train_main(argv(tiny_model_dir, tiny_corpus, out, *flags, warmup=warmup))
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == 1, err
    assert f"injected fault in the {where}" in err  # the cause is shown
    assert checkpoint_steps(out) == saved, err
    said = f"saved a checkpoint of step {saved}" if saved != 3 else "step 3 is kept"
    assert said in err, err
    assert train_main(["--resume", str(out)]) == 0
    uninterrupted = straight if "warm-up" in where else straight_without_warmup
    assert_same_weights(uninterrupted, final_weights(out), f"an exception in the {where}")


def test_save_every_accepts_a_time(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """A clock that moves 40 s per step: with --save-every 1m a checkpoint follows the steps at
    which a minute has passed since the last one (2, 4, 6, 8), whatever the tokens."""
    now = [0.0]
    monkeypatch.setattr(loop, "clock", lambda: now[0])
    original = loop.TrainingLoop.train_batch

    def slow(run, *args, **kwargs):
        now[0] += 40.0
        return original(run, *args, **kwargs)

    monkeypatch.setattr(loop.TrainingLoop, "train_batch", slow)
    saved = []
    save = loop.TrainingLoop.save_checkpoint
    monkeypatch.setattr(
        loop.TrainingLoop, "save_checkpoint", lambda run: saved.append(run.steps) or save(run)
    )
    out = tmp_path / "run"
    assert train_main(argv(tiny_model_dir, tiny_corpus, out, "--repeat", "--save-every", "1m")) == 0
    assert saved == [2, 4, 6, 8]
    assert json.loads((out / "run.json").read_text())["settings"]["save_every"] == "1m"


@pytest.mark.parametrize("value", ["0", "0s", "-5m", "-1", "ten", "5 parsecs", "m", ""])
def test_bad_save_every_is_refused_before_any_work(
    tiny_model_dir, tiny_corpus, tmp_path, capsys, value
):
    out = tmp_path / "run"
    assert train_main(argv(tiny_model_dir, tiny_corpus, out, f"--save-every={value}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gsae-train: error: --save-every"), err
    assert not out.exists()


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("30s", "30s"),
        ("15m", "15m"),
        ("2h", "2h"),
        ("1.5min", "1.5min"),
        ("100M", 100_000_000),
        ("500k", 500_000),
        ("1e6", 1_000_000),
    ],
)
def test_save_every_reads_times_and_counts(value, parsed):
    from gsae.train.settings import parse_save_every, save_interval

    assert parse_save_every(value) == parsed
    tokens, seconds = save_interval(parsed)
    if isinstance(parsed, int):
        assert (tokens, seconds) == (parsed, None)
    else:
        assert (
            tokens is None and seconds == {"30s": 30, "15m": 900, "2h": 7200, "1.5min": 90}[value]
        )
