"""Nothing a user types destroys work: the output folders of gsae-export, gsae-browse,
gsae-eval, gsae-autointerp, gsae-groups and gsae-train are checked before any work, have one
writer at a time, appear whole or not at all, and are never another command's or an input's.
Each case is a mistake a user made; Ctrl-C is a real SIGINT sent at a point of the work."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from chat_stub import ChatStub
from tiny import QUICK_EVAL, train_flags

import gsae.browse.collect
import gsae.browse.site
import gsae.cli.groups
import gsae.eval
import gsae.export
from gsae.cli.autointerp import main as autointerp_main
from gsae.cli.browse import main as browse_main
from gsae.cli.eval import main as eval_main
from gsae.cli.export import main as export_main
from gsae.cli.groups import main as groups_main
from gsae.cli.train import main as train_main

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

BROWSE = [
    "--tokens",
    "512",
    "--batch-tokens",
    "256",
    "--window",
    "8",
    "--top",
    "4",
    "--random",
    "2",
    "--pool",
    "8",
    "--device",
    "cpu",
]
TRAIN = [*train_flags("512"), "--device", "cpu"]


def call(main, argv) -> int | str:
    """The exit code, or what escaped the command (a traceback is never the answer)."""
    try:
        return main([str(a) for a in argv])
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped"
    except Exception as err:  # the point: nothing but an exit code
        return f"{type(err).__name__} escaped: {err}"


def tree(path: Path) -> dict:
    """Every file under ``path`` and its bytes."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def sigint_at(monkeypatch, module, name: str, after: int = 0):
    """A real Ctrl-C (SIGINT to this process) when ``module.name`` is called the (after+1)-th
    time, before it runs."""
    original, calls = getattr(module, name), [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def no_work(monkeypatch, module, name: str):
    def work(*args, **kwargs):
        raise AssertionError(f"{name} ran: the problem was not caught before the work")

    monkeypatch.setattr(module, name, work)


@pytest.fixture(scope="module")
def evaluated(trained_runs, tmp_path_factory):
    """A gsae-eval folder of both runs (the per-layer one as baseline)."""
    out = tmp_path_factory.mktemp("evaluated") / "eval"
    runs = [trained_runs["grouped"], "--baseline", trained_runs["per-layer"]]
    assert call(eval_main, [*runs, "--out", out, *QUICK_EVAL]) == 0
    return out


def autointerp_argv(run, stub, out, *extra) -> list:
    """gsae-autointerp of ``run`` on 2 latents against the chat stub, into ``out``."""
    return [
        run,
        "--endpoint",
        stub.url,
        "--explainer-model",
        "stub",
        *BROWSE,
        "--latents",
        "2",
        "--out",
        out,
        *extra,
    ]


# ---- 1, 2: --out over the run's parent; names the tools did not make


@pytest.mark.parametrize("command", ["export", "browse"])
def test_out_over_the_runs_parent_is_refused_even_with_overwrite(
    trained_runs, tmp_path, capsys, command
):
    parent = tmp_path / "exp"
    shutil.copytree(trained_runs["grouped"], parent / "myrun")
    (parent / "notes.txt").write_text("mine")
    before = tree(parent)
    run, flags = parent / "myrun", (["--format", "sparsify"] if command == "export" else BROWSE)
    main = export_main if command == "export" else browse_main
    assert call(main, [run, *flags, "--out", parent, "--overwrite"]) == 2
    assert "myrun" in capsys.readouterr().err
    assert tree(parent) == before
    # a folder holding another command's outputs deeper down is not replaced either
    sibling = tmp_path / "other"
    shutil.copytree(trained_runs["per-layer"], sibling / "deep" / "run")
    assert call(main, [trained_runs["grouped"], *flags, "--out", sibling, "--overwrite"]) == 2
    assert "gsae-train" in capsys.readouterr().err and (sibling / "deep" / "run").is_dir()


def test_export_never_touches_a_users_dot_old_folder(trained_runs, tmp_path):
    exp = tmp_path / "exp"
    (exp / "bk.old").mkdir(parents=True)
    (exp / "bk.old" / "mine.txt").write_text("keep")
    run = trained_runs["grouped"]
    for _ in range(2):  # a first export, then one that replaces it
        assert call(export_main, [run, "--format", "saelens", "--out", exp / "bk"]) == 0
        assert (exp / "bk.old" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in exp.iterdir()) == [
        "bk",
        "bk.old",
    ]
    # only the user's bk.old: it is not taken for an interrupted swap's
    (exp / "only").mkdir()
    (exp / "only" / "x.old").mkdir()
    (exp / "only" / "x.old" / "mine.txt").write_text("keep")
    assert call(export_main, [run, "--format", "saelens", "--out", exp / "only" / "x"]) == 0
    assert (exp / "only" / "x.old" / "mine.txt").read_text() == "keep"
    assert (exp / "only" / "x" / "gsae_export.json").exists()


def test_out_inside_a_folder_that_is_replaced_as_a_whole_is_refused(trained_runs, tmp_path, capsys):
    run, exp = trained_runs["grouped"], tmp_path / "exp"
    assert call(export_main, [run, "--format", "saelens", "--out", exp]) == 0
    before = tree(exp)
    assert call(export_main, [run, "--format", "saelens", "--out", exp / "inner"]) == 2
    assert "replaced as a whole" in capsys.readouterr().err
    assert tree(exp) == before


# ---- 3, 4: one command's folder is no other's


def test_groups_refuses_a_training_run(trained_runs, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["grouped"], run)
    before = tree(run)
    no_work(monkeypatch, gsae.cli.groups, "load_model")
    assert call(groups_main, ["--model", trained_runs["model"], "--out", run]) == 2
    assert "gsae-train run" in capsys.readouterr().err
    for sae in (run / "layers_1-2", run / "checkpoint"):  # nor a folder inside it
        assert call(groups_main, ["--model", trained_runs["model"], "--out", sae]) == 2
        assert call(browse_main, [trained_runs["grouped"], "--out", sae, "--overwrite"]) == 2
        assert "a folder of the gsae-train run" in capsys.readouterr().err
    assert tree(run) == before


def test_autointerp_and_eval_refuse_each_others_folders(
    trained_runs, evaluated, tmp_path, capsys, monkeypatch
):
    eval_dir = tmp_path / "eval"
    shutil.copytree(evaluated, eval_dir)
    before = tree(eval_dir)
    with ChatStub() as stub:
        argv = autointerp_argv(trained_runs["grouped"], stub, eval_dir)
        assert call(autointerp_main, argv) == 2
        assert stub.requests == []
    assert "gsae-eval" in capsys.readouterr().err
    assert tree(eval_dir) == before
    interp = tmp_path / "interp"  # an auto-interp folder (as gsae-autointerp leaves one)
    interp.mkdir()
    (interp / "cache.jsonl").write_text("")
    (interp / "summary.json").write_text('{"run": "x"}')
    before = tree(interp)
    no_work(monkeypatch, gsae.eval, "prepare")
    assert call(eval_main, [trained_runs["grouped"], "--out", interp, *QUICK_EVAL]) == 2
    assert "gsae-autointerp" in capsys.readouterr().err
    assert tree(interp) == before


# ---- 5: one writer per output folder


def test_one_writer_per_output_folder(
    trained_runs, tiny_model_dir, tiny_corpus, tmp_path, capsys, monkeypatch
):
    from gsae.outdir import locked  # (as another process would hold it)

    run = trained_runs["grouped"]
    cases = {
        "train": (
            train_main,
            ["--model", tiny_model_dir, "--dataset", tiny_corpus, *TRAIN, "--repeat"],
        ),
        "export": (export_main, [run, "--format", "sparsify"]),
        "browse": (browse_main, [run, *BROWSE]),
        "eval": (eval_main, [run, *QUICK_EVAL]),
        "groups": (groups_main, ["--from-matrix", tmp_path / "m.json"]),
    }
    (tmp_path / "m.json").write_text("[[0, 0.5], [0.5, 0]]")
    for name, (main, argv) in cases.items():
        out = tmp_path / name
        with locked(out, "another gsae command"):
            assert call(main, [*argv, "--out", out]) == 2, name
            assert "being written by another process" in capsys.readouterr().err, name
            assert not out.exists(), name
        assert call(main, [*argv, "--out", out]) == 0, name  # free again once it ends
    with ChatStub() as stub, locked(tmp_path / "ai", "x"):
        argv = autointerp_argv(run, stub, tmp_path / "ai")
        assert call(autointerp_main, argv) == 2 and stub.requests == []


def test_a_lock_is_released_when_its_holder_is_killed(tmp_path):
    from gsae import outdir

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from gsae.outdir import acquire
        lock = acquire({str(out)!r}, "gsae-test")
        print("held", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(outdir.OutDirError, match=rf"gsae-test, pid {holder.pid}"):
            outdir.acquire(out, "me")
    finally:
        holder.kill()
        holder.wait()
    with outdir.locked(out, "me"):  # a kill -9 left nothing stuck
        pass
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock


# ---- 6: whole or nothing, nothing stale


def test_an_interrupted_eval_leaves_the_earlier_one_whole(
    trained_runs, evaluated, tmp_path, capsys, monkeypatch
):
    from gsae.eval import figures

    out = tmp_path / "eval"
    shutil.copytree(evaluated, out)
    before = tree(out)
    sigint_at(monkeypatch, figures, "write_all")  # after the metrics and tables were written
    assert call(eval_main, [trained_runs["per-layer"], "--out", out, *QUICK_EVAL]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "earlier outputs" in err
    assert tree(out) == before


def test_an_eval_leaves_nothing_of_the_earlier_one(trained_runs, evaluated, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(evaluated, out)
    assert (out / "mmcs.png").exists()  # the earlier one had a baseline
    assert call(eval_main, [trained_runs["per-layer"], "--out", out, *QUICK_EVAL]) == 0
    assert not (out / "mmcs.png").exists() and not (out / "features_grouped.csv").exists()
    assert json.loads((out / "summary.json").read_text())["runs"].keys() == {"per-layer"}


def test_autointerp_report_takes_only_the_scores_of_a_run_it_evaluated(
    trained_runs, tmp_path, capsys
):
    eval_dir = tmp_path / "eval"  # an evaluation of the per-layer run alone
    assert call(eval_main, [trained_runs["per-layer"], "--out", eval_dir, *QUICK_EVAL]) == 0
    before = tree(eval_dir)
    with ChatStub() as stub:
        argv = autointerp_argv(trained_runs["grouped"], stub, tmp_path / "ai", "--report", eval_dir)
        assert call(autointerp_main, argv) == 2
        assert stub.requests == []  # refused before any paid request
    assert "per-layer" in capsys.readouterr().err
    assert tree(eval_dir) == before


@pytest.mark.parametrize("command", ["export", "browse"])
def test_ctrl_c_in_export_and_browse(trained_runs, tmp_path, capsys, monkeypatch, command):
    out = tmp_path / "out"
    main, flags = {
        "export": (export_main, ["--format", "sparsify"]),
        "browse": (browse_main, BROWSE),
    }[command]
    assert call(main, [trained_runs["grouped"], *flags, "--out", out]) == 0
    before = tree(out)
    if command == "export":  # the second SAE folder
        sigint_at(monkeypatch, gsae.export, "fold_scale", after=1)
    else:  # the pages, once everything was collected
        sigint_at(monkeypatch, gsae.browse.site, "latent_records")
    assert call(main, [trained_runs["per-layer"], *flags, "--out", out]) == 130
    err = capsys.readouterr().err
    assert f"gsae-{command}: interrupted" in err and "earlier outputs" in err
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary names, no lock


def test_ctrl_c_in_autointerp_keeps_the_answers(trained_runs, tmp_path, capsys, monkeypatch):
    from gsae.autointerp import client

    out = tmp_path / "ai"
    sigint_at(monkeypatch, client.AnswerCache, "put", after=3)
    with ChatStub() as stub:
        argv = autointerp_argv(trained_runs["grouped"], stub, out, "--concurrency", "1")
        assert call(autointerp_main, argv) == 130
    err = capsys.readouterr().err
    assert "gsae-autointerp: interrupted" in err and "run the same command again" in err
    assert not (out / "autointerp.jsonl").exists()  # no results from half the answers
    assert len(client.AnswerCache(out / "cache.jsonl")) >= 3


# ---- 7: a finished run without its checkpoint


def test_resume_of_a_finished_run_without_its_checkpoint_is_refused(
    tiny_model_dir, tiny_corpus, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = ["--model", tiny_model_dir, "--dataset", tiny_corpus, *TRAIN, "--repeat"]
    assert call(train_main, [*argv, "--out", run]) == 0
    shutil.rmtree(run / "checkpoint")
    before, _ = tree(run), capsys.readouterr()
    assert call(train_main, ["--resume", run, "--tokens", "1k"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "from zero" in err and len(err.strip().splitlines()) == 1
    assert tree(run) == before


def test_overwrite_of_a_folder_not_made_yet_creates_it(tiny_model_dir, tiny_corpus, tmp_path):
    argv = ["--model", tiny_model_dir, "--dataset", tiny_corpus, *TRAIN, "--repeat"]
    assert call(train_main, [*argv, "--out", tmp_path / "new", "--overwrite"]) == 0
    assert (tmp_path / "new" / "summary.json").exists()


# ---- checked before any work, with one line


def _special_outs(tmp_path: Path) -> list[Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file.txt").write_text("x")
    # /proc takes no new file, not even from root (whom os.access lets write anywhere)
    unwritable = Path("/proc/gsae-unwritable-out")
    return [
        Path("/dev/null"),
        fifo,
        tmp_path / "file.txt",
        tmp_path / "file.txt" / "sub",
        unwritable,
    ]


def test_special_or_file_outs_are_refused_before_any_work(
    trained_runs, tmp_path, capsys, monkeypatch
):
    no_work(monkeypatch, gsae.eval, "prepare")
    no_work(monkeypatch, sys.modules["gsae.browse.collect"], "collect")
    no_work(monkeypatch, gsae.cli.groups, "load_model")
    no_work(monkeypatch, gsae.export, "fold_scale")
    run = trained_runs["grouped"]
    commands = [
        (eval_main, [run, *QUICK_EVAL]),
        (browse_main, [run, *BROWSE]),
        (export_main, [run, "--format", "sparsify"]),
        (groups_main, ["--model", trained_runs["model"]]),
    ]
    for out in _special_outs(tmp_path):
        for main, argv in commands:
            assert call(main, [*argv, "--out", out]) == 2, (main, out)
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and str(out) in err, err
    assert (tmp_path / "file.txt").read_text() == "x"


def test_hookpoint_prefix_cannot_leave_out(trained_runs, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    argv = [trained_runs["grouped"], "--format", "sparsify", "--out", out]
    assert call(export_main, [*argv, "--hookpoint-prefix", "../../x"]) == 2
    assert "--hookpoint-prefix" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*x*"))


def test_export_model_must_be_a_copy_of_the_runs(trained_runs, tmp_path, capsys):
    from tiny import build_tiny_model

    for name, kwargs in (("shallow", {"layers": 2}), ("wide", {"d": 64})):
        other = build_tiny_model(tmp_path / name, **kwargs)
        argv = [
            trained_runs["grouped"],
            "--format",
            "saelens",
            "--out",
            tmp_path / f"o-{name}",
            "--model",
            other,
        ]
        assert call(export_main, argv) == 2, name
        assert "not a copy" in capsys.readouterr().err
        assert not (tmp_path / f"o-{name}").exists()


def test_autointerp_rerun_with_other_settings_is_refused_by_name(trained_runs, tmp_path, capsys):
    out = tmp_path / "ai"
    run = trained_runs["grouped"]
    with ChatStub() as stub:
        assert call(autointerp_main, autointerp_argv(run, stub, out)) == 0
        sent = len(stub.requests)
        for flag, value in (("--window", "6"), ("--tokens", "768")):  # after BROWSE's: they win
            assert call(autointerp_main, autointerp_argv(run, stub, out, flag, value)) == 2
            assert flag in capsys.readouterr().err
        assert call(autointerp_main, autointerp_argv(run, stub, out)) == 0  # resumed, nothing asked
        assert len(stub.requests) == sent


def test_autointerp_names_a_missing_run(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    endpoint = [
        "--endpoint",
        "http://127.0.0.1:9/v1",
        "--explainer-model",
        "m",
        "--out",
        tmp_path / "ai",
    ]
    for extra in ([], ["--collection", tmp_path / "no-collection"]):
        assert call(autointerp_main, [missing, *endpoint, *extra]) == 2
        assert f"{missing}: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "ai").exists()


# ---- one-line errors


def test_a_corrupted_sae_file_is_one_line_in_eval(trained_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["grouped"], run)
    weights = run / "layers_1-2" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert call(eval_main, [run, "--out", tmp_path / "eval", *QUICK_EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert str(weights) in err.splitlines()[-1] and "Traceback" not in err


def test_unreadable_answers_are_counted_and_not_cached(trained_runs, tmp_path, capsys):
    from chat_stub import scripted

    from gsae.autointerp import AnswerCache

    def answer(messages):  # the scorer rambles: no list of labels
        return "no idea" if "[EXPLANATION]" not in messages[0]["content"] else scripted(messages)

    out = tmp_path / "ai"
    with ChatStub(answer=answer) as stub:
        argv = autointerp_argv(trained_runs["grouped"], stub, out)
        assert call(autointerp_main, argv) == 0
        scored = sum(1 for m in stub.requests if "[EXPLANATION]" not in m[0]["content"])
    assert scored > 0
    assert f"{scored} answers could not be read" in capsys.readouterr().out
    assert "no idea" not in (out / "cache.jsonl").read_text()
    assert len(AnswerCache(out / "cache.jsonl")) == len(stub.requests) - scored
    assert json.loads((out / "summary.json").read_text())["unreadable_answers"] == scored


def test_exported_and_collected_files_follow_the_umask(trained_runs, tmp_path):
    old = os.umask(0o022)
    try:
        assert (
            call(
                export_main,
                [trained_runs["grouped"], "--format", "sparsify", "--out", tmp_path / "exp"],
            )
            == 0
        )
        assert (
            call(browse_main, [trained_runs["grouped"], *BROWSE, "--out", tmp_path / "site"]) == 0
        )
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith("lock")]
    assert any(p.suffix == ".safetensors" for p in files)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, modes


def test_torchrun_job_on_a_locked_folder_is_refused_on_every_process(
    tiny_model_dir, tiny_corpus, tmp_path
):
    from test_distributed import args, torchrun

    from gsae.outdir import locked

    out = tmp_path / "run"
    with locked(out, "another gsae command"):  # process 0 takes the lock for the job
        result = torchrun(args(tiny_model_dir, tiny_corpus, out), timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "being written by another process" in output, output[-3000:]
    assert not out.exists()
