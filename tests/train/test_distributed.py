"""gsae-train on several processes: torchrun starts 2 gloo processes on the CPU, on a tiny
random GPTNeoX. A 2-process run must train the SAEs a 1-process run trains over the same
global batches (``--data-shards 2``), in both placements; resume on 2 or 1 processes; and end,
with the failing process's error shown, when one process raises or stops answering."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import config_flags, short_run

from gsae.cli.train import main as train_main
from gsae.train.distributed import plan_owners

# every test starts torchrun processes (6-17 s each on 2 cores)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

WORKER = Path(__file__).parents[1] / "dist_worker.py"
FAST = short_run("4k", "2k", "1k", dead_threshold="2k", log_every=2)
# float32 rounding: the replicas sum the parts' gradients, one process the whole batch's; one
# Adam step moves a weight by ~lr = 1e-3, so a missed, doubled or wrong step is far above this
ATOL = 1e-5


# the batch warm-up in its first half: the first 4 batches in 4 steps each (64 rows a process)
WARMUP = {"warmup_tokens": 2048, "warmup_batch": 128}


def args(model, corpus, out, *extra, **settings):
    """gsae-train's flags; ``settings``: research settings, with WARMUP, in a --config file."""
    config = config_flags(Path(out).parent, **WARMUP, **settings)
    return [
        "--model",
        str(model),
        "--dataset",
        str(corpus),
        "--out",
        str(out),
        *FAST,
        *config,
        *extra,
    ]


def torchrun_command(argv) -> list[str]:
    """``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py ARGV``: gsae-train on two
    processes; ``--standalone`` rendezvous on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        *map(str, argv),
    ]


def torchrun(argv, env=None, timeout=240) -> subprocess.CompletedProcess:
    """:func:`torchrun_command` run to its end, faults injected as ``env`` says."""
    cmd = torchrun_command(argv)
    full = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    summary = json.loads((out / "summary.json").read_text())
    return {name: load_file(str(out / name / "sae.safetensors")) for name in summary["groups"]}


def assert_same_saes(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert list(wa) == list(wb)
    for name in wa:
        for key in wa[name]:
            diff = float((wa[name][key] - wb[name][key]).abs().max())
            assert diff <= ATOL, (name, key, diff)
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert (sa["tokens"], sa["steps"]) == (sb["tokens"], sb["steps"])
    for name in sa["groups"]:
        assert sa["groups"][name]["tokens_trained"] == sb["groups"][name]["tokens_trained"]


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """One process over the batches of two shards: what two processes must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert train_main(args(tiny_model_dir, tiny_corpus, out, "--data-shards", "2")) == 0
    return out


@pytest.mark.parametrize("placement", ["replicated", "distribute-saes"])
def test_two_processes_train_the_saes_of_one(
    placement, reference, tiny_model_dir, tiny_corpus, tmp_path
):
    out = tmp_path / "run"
    extra = ["--distribute-saes"] if placement != "replicated" else []
    ok(torchrun(args(tiny_model_dir, tiny_corpus, out, *extra, check_replicas=True)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["data_shards"] == 2
    owners = summary["owners"]
    assert len(owners) == 3  # layer_0, layers_1-2, layer_3: 3 SAEs on 2 processes
    if placement == "replicated":
        assert all(o == [0, 1] for o in owners.values())
    else:  # each SAE on one process, and both processes train some
        assert all(len(o) == 1 for o in owners.values())
        assert {o[0] for o in owners.values()} == {0, 1}
    assert_same_saes(reference, out)
    # the warm-up's 4 batches took 4 steps each, on one process and on two
    for run in (reference, out):
        for name in owners:
            state = json.loads((run / "checkpoint" / name / "state.json").read_text())
            assert state["steps"] == 4 * 4 + 4, (run, name)
    # rank 0 alone logs: one line per log step, with the whole batch's losses
    mine, ref = log_lines(out), log_lines(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in ref]
    for a, b in zip(mine, ref, strict=True):
        for name in b["groups"]:
            assert a["groups"][name]["fvu"] == pytest.approx(b["groups"][name]["fvu"], abs=1e-4)
            assert a["groups"][name]["l0"] == pytest.approx(b["groups"][name]["l0"], abs=1e-2)
    assert json.loads((out / "scales.json").read_text()) == json.loads(
        (reference / "scales.json").read_text()
    )


@pytest.mark.parametrize("per_token", ["one", "all"])
def test_fewer_saes_than_processes_split_each_batch(
    per_token, tiny_model_dir, tiny_corpus, tmp_path, offline
):
    """One SAE for every layer on 2 processes: both own it, each trains on half the rows (with
    layers_per_token "all": half of every layer's rows)."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--groups", "1", "--include-last"]
    each = {"layers_per_token": per_token}
    one_args = args(tiny_model_dir, tiny_corpus, one, "--data-shards", "2", *extra, **each)
    assert train_main(one_args) == 0
    checked = {**each, "check_replicas": True}
    ok(torchrun(args(tiny_model_dir, tiny_corpus, two, *extra, "--distribute-saes", **checked)))
    assert json.loads((two / "summary.json").read_text())["owners"] == {"layers_0-3": [0, 1]}
    assert_same_saes(one, two)


@pytest.mark.parametrize("placement", ["replicated", "distribute-saes"])
def test_interrupted_run_resumes_on_two_and_on_one_process(
    placement, reference, tiny_model_dir, tiny_corpus, tmp_path, offline
):
    cut = tmp_path / "cut"
    extra = ["--distribute-saes"] if placement != "replicated" else []
    # Ctrl-C reaches process 1 after step 3: both stop after step 4 and save a checkpoint
    result = torchrun(
        args(tiny_model_dir, tiny_corpus, cut, *extra), env={"GSAE_TEST_FAULT": "1:3:sigint"}
    )
    assert result.returncode != 0, result.stderr[-3000:]
    assert "continue with gsae-train --resume" in result.stderr
    state = json.loads((cut / "checkpoint" / "run_state.json").read_text())
    assert state["steps"] == 4 and state["data_shards"] == 2 and len(state["positions"]) == 2
    assert not (cut / "summary.json").exists()
    on_one = tmp_path / "on_one"
    shutil.copytree(cut, on_one)
    ok(torchrun(["--resume", cut]))
    assert train_main(["--resume", str(on_one)]) == 0
    assert_same_saes(reference, cut)
    assert_same_saes(reference, on_one)
    assert json.loads((on_one / "summary.json").read_text()).get("processes") is None
    # the log was cut back to the checkpoint, then continued: no step twice
    assert [r["step"] for r in log_lines(on_one)] == [r["step"] for r in log_lines(reference)]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status  # a dead child nobody reaped (no init in a container)


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ("raise", "RuntimeError: injected fault in process 1 after step 3"),
        ("hang", "did not answer within --dist-timeout 5 s"),
    ],
)
def test_a_failing_process_ends_the_job(fault, expect, tiny_model_dir, tiny_corpus, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    start = time.perf_counter()
    result = torchrun(
        args(tiny_model_dir, tiny_corpus, tmp_path / "run", "--dist-timeout", "5"),
        env={"GSAE_TEST_FAULT": f"1:3:{fault}", "GSAE_TEST_PIDS": str(pids)},
        timeout=180,
    )
    took = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expect in output, output[-5000:]
    # a hung process: the others' collective times out after 5 s, then torchrun stops it
    assert took < 120, took
    started = [int(p.read_text()) for p in pids.glob("*.pid")]
    assert len(started) == 2
    deadline = time.monotonic() + 10
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if alive(p)], "orphan processes left"


def test_replicas_that_differ_are_caught(tiny_model_dir, tiny_corpus, tmp_path):
    """check_replicas compares every copy at each log step: a copy changed on one process
    stops the run, naming the SAE."""
    result = torchrun(
        args(tiny_model_dir, tiny_corpus, tmp_path / "run", check_replicas=True),
        env={"GSAE_TEST_FAULT": "1:1:perturb"},
    )
    assert result.returncode != 0
    assert "the copies of layer_0 differ between processes [0, 1]" in result.stderr


# ---- the pieces, in one process


def test_plan_owners_balances_whole_saes_or_splits_them():
    costs = [4.0, 1.0, 1.0, 2.0, 3.0]
    for size in (1, 2, 3, 5):
        owners = plan_owners(costs, size)
        assert all(len(o) == 1 for o in owners)
        placed = list(zip(costs, owners, strict=True))
        loads = [sum(c for c, o in placed if o == [r]) for r in range(size)]
        assert all(load > 0 for load in loads)  # every process trains something
        assert max(loads) - min(loads) <= max(costs)  # longest-processing-time bound
    assert plan_owners([3.0, 1.0, 2.0], 2) == [[0], [1], [1]]
    # fewer SAEs than processes: each SAE gets owners by its cost, every process one SAE
    owners = plan_owners([3.0, 1.0], 4)
    assert owners == [[0, 1, 2], [3]]
    assert plan_owners([1.0], 2) == [[0, 1]]
    with pytest.raises(ValueError):
        plan_owners([], 2)


def test_text_shards_split_the_documents(tiny_model_dir, tiny_corpus):
    """Two shards read every document once between them: the same tokens as the whole text."""
    from gsae.hf.models import load_model
    from gsae.hf.texts import open_texts
    from gsae.hf.tokens import TokenStream

    tokenizer = load_model(str(tiny_model_dir), "fp32", "cpu").tokenizer
    texts = open_texts(str(tiny_corpus), "train", "text")

    def tokens(shard):
        ids = []
        with TokenStream(texts, tokenizer, 64, 2, shard=shard) as stream:
            for batch in stream:
                ids.append(batch.input_ids[batch.attention_mask.bool()])
        return torch.cat(ids)

    whole, first, second = tokens((0, 1)), tokens((0, 2)), tokens((1, 2))
    assert len(first) > 0 and len(second) > 0
    assert len(first) + len(second) == len(whole)
    assert torch.equal(torch.cat([first, second]).sort().values, whole.sort().values)
    assert not torch.equal(first[: len(second)], second[: len(first)])
    with pytest.raises(ValueError, match="shard"):
        TokenStream(texts, tokenizer, 64, 2, shard=(2, 2))


def test_a_part_of_the_batch_draws_the_layers_the_whole_batch_draws():
    from gsae.train.sampler import LayerSampler

    groups = [[0], [1, 2, 3]]
    sampler = LayerSampler(groups, [0, 1, 2, 3], seed=5, device="cpu", every_layer=False)
    hidden = torch.randn(4, 10, 6)
    whole = sampler.draw(hidden, step=7)
    positions = torch.tensor([1, 4, 5, 9])
    part = sampler.draw(hidden[:, positions], step=7, positions=positions, total=10)
    for w, p in zip(whole, part, strict=True):
        assert torch.equal(w.x[positions], p.x)
        if isinstance(w.layer, torch.Tensor):
            assert torch.equal(w.layer[positions], p.layer)


def test_data_parallel_halves_sum_to_the_whole_batch_step():
    """backward_part on two halves, their sums (what the all_reduce computes), apply_reduced:
    the one-process step on the whole batch, losses, counters and weights."""
    from gsae.sae import Sae, SaeConfig
    from gsae.train.step import SaeTrainer

    cfg = SaeConfig(d=12, expansion_factor=16, k=2, dead_threshold=40, init_encoder="fit")
    x = torch.randn(64, 12) * torch.linspace(0.5, 2, 12) + 0.3
    whole = SaeTrainer(Sae(cfg, [0]))
    halves = SaeTrainer(Sae(cfg, [0]))
    halves.sae.load_state_dict(whole.sae.state_dict())
    halves.sae.init_from_batch(x)
    halves.initialized = True
    params = list(halves.sae.parameters())
    for step in range(6):  # past the dead threshold: AuxK takes part
        batch = x.roll(step * 7, 0)
        out = whole.step(batch, check_finite=False)
        grads = [torch.zeros_like(p) for p in params]
        hits = torch.zeros(halves.sae.m)
        stats = torch.zeros(halves.part_stats_size(), dtype=torch.float64)
        for part in batch.tensor_split([25]):  # unequal parts
            for p in params:
                p.grad = None
            h = torch.zeros_like(hits)
            s = torch.zeros_like(stats)
            halves.backward_part(part, 0, h, s)
            for g, p in zip(grads, params, strict=True):
                g += p.grad
            hits += h
            stats += s
        for g, p in zip(grads, params, strict=True):
            p.grad = g
        reduced = halves.apply_reduced(hits, stats, batch.shape[0])
        for name in ("loss", "fvu", "auxk", "l0", "dead_fraction"):
            a, b = getattr(out, name), getattr(reduced, name)
            assert float(a) == pytest.approx(float(b), rel=1e-4, abs=1e-6), (step, name)
    assert float(out.auxk) > 0  # some latent died: the AuxK path was compared too
    assert torch.equal(whole.tokens_since_fired, halves.tokens_since_fired)
    for (name, a), b in zip(
        whole.sae.state_dict().items(), halves.sae.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), name


def test_one_process_run_resumes_on_two(
    reference, tiny_model_dir, tiny_corpus, tmp_path, offline, monkeypatch
):
    """A run of two shards started on one process (Ctrl-C after step 3), resumed on two."""
    import signal

    from gsae.train import loop

    cut = tmp_path / "cut"
    train_batch = loop.TrainingLoop.train_batch

    def ctrl_c_after_step_3(run, *a, **k):
        train_batch(run, *a, **k)
        if run.steps == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop.TrainingLoop, "train_batch", ctrl_c_after_step_3)
    assert train_main(args(tiny_model_dir, tiny_corpus, cut, "--data-shards", "2")) == 130
    monkeypatch.undo()
    assert json.loads((cut / "checkpoint" / "run_state.json").read_text())["steps"] == 3
    ok(torchrun(["--resume", cut]))
    assert json.loads((cut / "summary.json").read_text())["processes"] == 2
    assert_same_saes(reference, cut)


def test_ctrl_c_to_torchrun_stops_every_process_with_a_checkpoint(
    tiny_model_dir, tiny_corpus, tmp_path
):
    """Ctrl-C as a user gives it: SIGINT to torchrun, which passes it on to each process."""
    import signal

    out = tmp_path / "run"
    argv = args(tiny_model_dir, tiny_corpus, out, "--log-every", "5")
    argv[argv.index("--tokens") + 1] = "50M"  # longer than the test waits
    cmd = torchrun_command(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "interrupted: saving a checkpoint" in stdout + stderr, stderr[-3000:]
    state = json.loads((out / "checkpoint" / "run_state.json").read_text())
    assert state["steps"] >= 5 and len(state["positions"]) == 2
    tokens = state["tokens"] + 1024  # two more steps, on one process
    assert train_main(["--resume", str(out), "--tokens", str(tokens)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == state["steps"] + 2


@pytest.mark.parametrize("placement", ["replicated", "distribute-saes"])
def test_data_running_out_stops_every_process_together(
    placement, tiny_model_dir, tiny_corpus, tmp_path, offline
):
    """Without --repeat the tiny corpus ends before 20k tokens: both processes stop at the
    step where a shard cannot fill its part, as one process over two shards does, with a
    checkpoint and the SAEs of what was trained."""
    one, two = tmp_path / "one", tmp_path / "two"
    short = [
        a for a in args(tiny_model_dir, tiny_corpus, one, "--data-shards", "2") if a != "--repeat"
    ]
    short[short.index("--tokens") + 1] = "20k"
    assert train_main(short) == 1
    extra = ["--distribute-saes"] if placement != "replicated" else []
    short[short.index("--out") + 1] = str(two)
    result = torchrun([*short[:-2], *extra])  # the same, without --data-shards 2
    assert short[-2:] == ["--data-shards", "2"]
    assert result.returncode != 0
    assert "the dataset ran out after" in result.stderr, result.stderr[-3000:]
    for out in (one, two):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["complete"] is False and summary["tokens"] < 20_000
    assert_same_saes(one, two)


def test_a_checkpoint_failing_on_one_process_fails_on_all_and_keeps_the_last(
    reference, tiny_model_dir, tiny_corpus, tmp_path, offline
):
    """Process 1 owns SAEs and cannot write them (a full disk) at the checkpoint of step 4:
    every process stops with the error, the checkpoint of step 2 stays whole, and the run
    resumes from it to the SAEs of an uninterrupted run."""
    out = tmp_path / "run"
    argv = args(tiny_model_dir, tiny_corpus, out, "--distribute-saes", "--save-every", "1024")
    result = torchrun(argv, env={"GSAE_TEST_FAULT": "1:3:nospace"})
    assert result.returncode != 0
    assert "No space left on device" in result.stderr, result.stderr[-3000:]
    state = json.loads((out / "checkpoint" / "run_state.json").read_text())
    assert state["steps"] == 2
    for name in state["files"]:  # every SAE of the checkpoint, process 1's too
        assert (out / "checkpoint" / name).stat().st_size == state["files"][name]
    assert not (out / "checkpoint.new").exists()
    assert train_main(["--resume", str(out)]) == 0
    assert_same_saes(reference, out)
