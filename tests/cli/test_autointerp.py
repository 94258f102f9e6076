"""gsae-autointerp against a local stub server: an interrupted run resumes without asking again,
scores go into the gsae-eval report, bad input is refused, and --explainer-model."""

import json
import re

import pytest
from chat_stub import ChatStub
from tiny import QUICK_EVAL, SMALL_COLLECTION, flags

from gsae.autointerp import AnswerCache
from gsae.cli.autointerp import main, parse_args, parser
from gsae.cli.eval import main as eval_main


def run_cli(stub, run, out, *extra):
    return main(
        [
            str(run),
            "--endpoint",
            stub.url,
            "--explainer-model",
            "stub",
            "--out",
            str(out),
            *flags(latents=3, random=4, pool=32, concurrency=3),
            *SMALL_COLLECTION,
            *extra,
        ]
    )


def test_an_interrupted_run_resumes_without_asking_again(
    trained_runs, tmp_path, one_thread, capsys
):
    run = trained_runs["grouped"]
    with ChatStub() as stub:  # the same run, never interrupted
        assert run_cli(stub, run, tmp_path / "whole") == 0
        total = len(stub.requests)
    assert total > 10
    with ChatStub(fail=lambda n: (400, {}) if n >= total // 2 else None) as stub:
        assert run_cli(stub, run, tmp_path / "cut") == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    cached = len(AnswerCache(tmp_path / "cut" / "cache.jsonl"))
    assert 0 < cached < total
    with ChatStub() as stub:
        assert run_cli(stub, run, tmp_path / "cut") == 0
        assert len(stub.requests) == total - cached  # nothing answered is asked again
    assert "reusing the collection" in capsys.readouterr().out
    whole = (tmp_path / "whole" / "autointerp.jsonl").read_text()
    assert (tmp_path / "cut" / "autointerp.jsonl").read_text() == whole
    with ChatStub() as stub:  # done: a third run asks nothing
        assert run_cli(stub, run, tmp_path / "cut") == 0
        assert stub.requests == []


def test_scores_go_into_the_gsae_eval_report(trained_runs, tmp_path, one_thread, monkeypatch):
    eval_dir = tmp_path / "eval"
    runs = [str(trained_runs["grouped"]), "--baseline", str(trained_runs["per-layer"])]
    evaluate = [*runs, "--out", str(eval_dir), *QUICK_EVAL]
    assert eval_main(evaluate) == 0
    monkeypatch.setenv("GSAE_TEST_KEY", "sk-secret")
    with ChatStub() as stub:
        for name in ("grouped", "per-layer"):
            assert (
                run_cli(
                    stub,
                    trained_runs[name],
                    tmp_path / name,
                    "--report",
                    str(eval_dir),
                    "--api-key-env",
                    "GSAE_TEST_KEY",
                )
                == 0
            )
        assert set(stub.keys) == {"Bearer sk-secret"}
    entries = [json.loads(x) for x in (eval_dir / "autointerp.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in entries) == ["grouped", "per-layer"]
    page = (eval_dir / "report.html").read_text()
    assert page.count("<h2>Auto-interpretability</h2>") == 1
    assert "fig4_autointerp.png" in page and (eval_dir / "fig4_autointerp.png").stat().st_size
    summary = json.loads((tmp_path / "grouped" / "summary.json").read_text())
    assert summary["overall"]["detection"]["mean"] == pytest.approx(0.5)  # the all-ones stub
    # gsae-eval run again keeps the auto-interp section
    assert eval_main(evaluate) == 0
    assert "<h2>Auto-interpretability</h2>" in (eval_dir / "report.html").read_text()


def test_autointerp_refuses_bad_input(trained_runs, tmp_path, capsys):
    with ChatStub() as stub:
        cases = [
            (["--report", str(tmp_path)], "holds no gsae-eval report.html"),
            (["--latents", "0"], "--latents must be >= 1"),
            (["--collection", str(tmp_path)], "holds no collection"),
        ]
        for extra, message in cases:
            assert run_cli(stub, trained_runs["grouped"], tmp_path / "o", *extra) == 2
            assert message in capsys.readouterr().err
        assert stub.requests == []


def test_explainer_model_flag_and_its_deprecated_alias(capsys):
    """--explainer-model names the explainer LLM; --model, its old name (the transformer in
    every other command), still works, hidden from --help, with one line of warning."""
    base = ["RUN", "--endpoint", "http://localhost:8000/v1", "--out", "OUT"]
    assert parse_args([*base, "--explainer-model", "qwen"]).explainer_model == "qwen"
    assert capsys.readouterr().err == ""
    assert parse_args([*base, "--model", "qwen"]).explainer_model == "qwen"
    err = capsys.readouterr().err
    assert err == "gsae-autointerp: warning: --model is deprecated, use --explainer-model\n"
    for extra in ([], ["--model", "a", "--explainer-model", "b"]):
        with pytest.raises(SystemExit) as stop:
            parse_args([*base, *extra])
        assert stop.value.code == 2 and "--explainer-model" in capsys.readouterr().err
    usage = parser().format_help()
    assert "--explainer-model" in usage and not re.search(r"(?<![\w-])--model(?![\w-])", usage)
