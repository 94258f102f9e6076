"""The README's quick start runs as written (its other examples, and docs/': tests/test_docs.py)."""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_states_two_commands():
    text = README.read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert marker in text
        block = text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
        assert block.count("\n") == 0 and "pip install" in block, block


def readme_block(marker: str) -> str:
    """The bash block after ``<!-- marker -->``, as .ci/run reads it."""
    return (
        README.read_text()
        .split(f"<!-- {marker} -->", 1)[1]
        .split("```bash\n", 1)[1]
        .split("```", 1)[0]
    )


# small budgets added to the README's commands, which otherwise run on their defaults
BUDGETS = {
    "gsae-train": ["--tokens", "4k", "--grouping-tokens", "2k", "--scale-tokens", "2k"],
    "gsae-eval": ["--tokens", "512"],
    "gsae-browse": ["--tokens", "2k"],
    "gsae-export": [],
}


@pytest.mark.slow
def test_the_first_hour_flows(tmp_path, monkeypatch, offline, one_thread, capsys):
    """The quick start as a new user runs it: the main command's gsae-train, then each command
    of the first-hour block as written (on small budgets): every step works on its defaults and
    leaves what the README promises (report.html, index.html, the exported SAEs)."""
    import shlex

    from gsae.cli import browse, export, train
    from gsae.cli import eval as evaluate

    mains = {
        "gsae-train": train.main,
        "gsae-eval": evaluate.main,
        "gsae-browse": browse.main,
        "gsae-export": export.main,
    }
    main_command = readme_block("main-command").strip().split("&& ")[-1]
    steps = [main_command] + [
        line.split("#", 1)[0] for line in readme_block("first-hour").splitlines() if line.strip()
    ]
    assert [shlex.split(s)[0] for s in steps] == list(mains)
    monkeypatch.chdir(tmp_path)  # the README's relative paths: out/demo, ...
    for step in steps:
        command, *argv = shlex.split(step)
        assert mains[command]([*argv, *BUDGETS[command]]) == 0, step
    printed = capsys.readouterr().out
    assert "'test' split" in printed  # evaluated on the demo's held-out split
    assert (tmp_path / "out/demo-eval/report.html").stat().st_size > 0
    assert (tmp_path / "out/demo-browse/index.html").stat().st_size > 0
    exported = sorted(p.parent.name for p in (tmp_path / "out/demo-sparsify").glob("*/cfg.json"))
    assert exported == [f"layers.{layer}" for layer in range(6)]
