"""Every example of the README and docs/ runs as written, or is listed here with the reason it
cannot run on a test machine (offline, CPU only)."""

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(language: str) -> list[tuple[str, str]]:
    """Every fenced block of the README and docs/ in ``language`` ("" for untagged ones), as
    ``("page:n", code)``, n counting that page's blocks of the language from 1."""
    found = []
    for page in PAGES:
        blocks = re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)
        ours = [code for lang, code in blocks if lang == language]
        name = page.relative_to(ROOT).as_posix()
        found += [(f"{name}:{n}", code) for n, code in enumerate(ours, 1)]
    return found


def bash_block(first_line: str) -> str:
    """The one bash block whose first line starts with ``first_line``."""
    matches = [code for _, code in code_blocks("bash") if code.startswith(first_line)]
    assert len(matches) == 1, f"{len(matches)} bash blocks start with {first_line!r}"
    return matches[0]


# python examples that need the quick start's run (out/demo) run in tests/test_inference.py
PYTHON = [(where, code) for where, code in code_blocks("python") if "out/demo" not in code]


@pytest.mark.parametrize("where,code", PYTHON, ids=[where for where, _ in PYTHON])
def test_python_example_runs(where, code, one_thread):
    exec(compile(code, where, "exec"), {})


def test_the_examples_are_found():
    """The block parser sees the examples: a README without its kernels example or docs/
    without theirs would otherwise leave the tests above with nothing to run."""
    pages = {where.split(":")[0] for where, _ in code_blocks("python") + code_blocks("bash")}
    assert {"README.md", "docs/kernels.md", "docs/evaluation.md"} <= pages
    assert any(where.startswith("README.md") for where, _ in PYTHON)
    for where, code in code_blocks(""):  # untagged blocks are the layout, never commands
        commands = [x for x in code.splitlines() if re.match(r"(gsae-|python|torchrun|pip)", x)]
        assert not commands, f"{where}: a command in an untagged block: tag it ```bash"


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (code blocks' comment lines are no heading)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_links_between_the_pages_resolve():
    """Every relative link of the README and docs/ names a file that exists and, after #, one of
    its headings: moving a section must not leave links to where it was."""
    links = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name}: {target}"
            assert not anchor or anchor in anchors(linked), f"{page.name}: {target}"
            links += 1
    assert links > 10


# The bash examples, by how their first line starts: the test that runs them, or why none can.
FIRST_HOUR = "tests/test_readme.py::test_the_first_hour_flows"
COMPARISON = "test_the_papers_comparison_on_the_demo"
CONFIG = "test_the_config_example_sets_what_no_flag_does"
RUN = {
    'echo \'{"init_encoder": "paper"': CONFIG,
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . &&": FIRST_HOUR,
    "gsae-eval out/demo --out out/demo-eval": FIRST_HOUR,
    'common="--model demo --dataset demo': COMPARISON,
    "gsae-eval runs/auto runs/even --baseline runs/per-layer": COMPARISON,
    "gsae-export runs/auto --format sparsify": COMPARISON,
    "gsae-browse runs/auto --baseline runs/per-layer": COMPARISON,
}
NOT_RUNNABLE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' &&": (
        "the test command: the whole suite, which .ci/run runs as the README states it"
    ),
    "gsae-train --model pythia-1b": "Pythia-1B and the Pile from the HF hub",
    "gsae-groups --model pythia-160m": "Pythia-160M and the Pile from the HF hub",
    "torchrun --nproc_per_node 8": (
        "8 GPUs, Pythia-1B from the HF hub (tests/train/test_distributed.py runs gsae-train under "
        "torchrun on CPUs)"
    ),
    "torchrun --nnodes 2": "two nodes of 8 GPUs, and the HF hub",
    "export OPENAI_API_KEY": (
        "an LLM server (tests/autointerp/test_score.py runs the whole pipeline against a stub "
        "server)"
    ),
}


def test_every_bash_example_is_run_or_excused():
    """A new bash example must be run by a test or listed above with its reason; a listed one
    that is gone from the pages must be removed from the lists."""
    firsts = [code.splitlines()[0] for _, code in code_blocks("bash")]
    for first in firsts:
        keys = [k for k in [*RUN, *NOT_RUNNABLE] if first.startswith(k)]
        assert len(keys) == 1, f"{first!r} matches {keys}: list it in RUN or NOT_RUNNABLE"
    for key in [*RUN, *NOT_RUNNABLE]:
        assert any(first.startswith(key) for first in firsts), f"no bash example starts {key!r}"


def readme_table() -> dict[str, str]:
    """The README's table of commands: {command: its example}."""
    rows = re.findall(r"^\| `(gsae-[\w-]+)` \|.*\| `([^`]+)` \|$", README.read_text(), flags=re.M)
    return dict(rows)


TABLE_NOT_RUNNABLE = {
    "gsae-autointerp": "an LLM server (its pipeline: tests/autointerp/test_score.py)"
}


def test_the_readme_table_lists_every_command_with_an_example_that_runs():
    """Every installed command is in the table; each example starts with its command and is a line
    of a bash example that a test runs (or needs what TABLE_NOT_RUNNABLE says)."""
    dist = importlib.metadata.distribution("gsae")
    scripts = {e.name for e in dist.entry_points if e.group == "console_scripts"}
    table = readme_table()
    assert set(table) == scripts
    run_lines = {
        line.split("#", 1)[0].split("&& ")[-1].strip()
        for first, code in ((c.splitlines()[0], c) for _, c in code_blocks("bash"))
        if any(first.startswith(k) for k in RUN)
        for line in code.splitlines()
    }
    for command, example in table.items():
        assert example.split()[0] == command, example
        assert example in run_lines or command in TABLE_NOT_RUNNABLE, example


# The comparison's budgets cut for a test; each must be in the script (a changed script fails
# here rather than running for half an hour)
SMALL = {
    "--tokens 200k": "--tokens 4k --grouping-tokens 2k --scale-tokens 2k",
    "--tokens 50k": "--tokens 1k",
}
LINE_BUDGETS = {"gsae-eval": ["--tokens", "512"], "gsae-browse": ["--tokens", "2k"]}


@pytest.mark.slow
def test_the_papers_comparison_on_the_demo(tmp_path, monkeypatch, offline, one_thread):
    """docs/evaluation.md's script as a user runs it, in bash with the installed commands (on
    small budgets), then the one-line gsae-eval, gsae-export and gsae-browse examples of the
    same page on its runs and a ``--groups auto`` run, ``runs/auto``."""
    from gsae.cli import browse, export, train
    from gsae.cli import eval as evaluate

    script = bash_block(next(k for k in RUN if k.startswith("common=")))
    for long, short in SMALL.items():
        assert long in script, long
        script = script.replace(long, short)
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the installed gsae-* commands
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in ("G1", "G2", "G3", "G4", "per-layer", "even", "smaller"):
        assert (tmp_path / "runs" / run / "summary.json").is_file(), run
    table1 = (tmp_path / "eval-demo/table1.md").read_text()
    assert "Per-layer SAEs (baseline" in table1
    assert (tmp_path / "eval-demo/report.html").stat().st_size > 0

    monkeypatch.chdir(tmp_path)
    common = shlex.split(script.splitlines()[0].split("=", 1)[1].strip('"'))
    assert train.main([*common, "--groups", "auto", "--out", "runs/auto"]) == 0
    mains = {"gsae-eval": evaluate.main, "gsae-export": export.main, "gsae-browse": browse.main}
    for key in RUN:
        command = key.split()[0]
        if command in mains and key.split()[1].startswith("runs/"):
            argv = shlex.split(bash_block(key).split("#", 1)[0])[1:]
            assert mains[command]([*argv, *LINE_BUDGETS.get(command, [])]) == 0, key
    assert (tmp_path / "eval-160m/report.html").stat().st_size > 0
    assert (tmp_path / "browse-auto/index.html").stat().st_size > 0
    exported = sorted(p.parent.name for p in (tmp_path / "runs/auto-sparsify").glob("*/cfg.json"))
    assert exported == [f"layers.{layer}" for layer in range(6)]


@pytest.mark.slow
def test_the_config_example_sets_what_no_flag_does(tmp_path, offline):
    """docs/training.md's --config example in bash with the installed gsae-train (a smaller
    budget): the run's settings hold the file's research settings."""
    script = bash_block(next(k for k in RUN if RUN[k] == CONFIG))
    script = script.replace("--tokens 20k", "--tokens 2k --grouping-tokens 2k --scale-tokens 2k")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((tmp_path / "out/research/run.json").read_text())["settings"]
    assert settings["sae"]["init_encoder"] == "paper" and settings["layers_per_token"] == "all"
