"""gsae-eval end to end, offline: real gsae-train runs (tiny model and the bundled demo), every
output file, the held-out rules, and every bad input refused before any work."""

import csv
import json
import re
import shutil

import pytest
import torch
from tiny import RUN_BUDGET, build_tiny_model, flags, write_corpus

from gsae.cli.eval import main
from gsae.cli.train import main as train_main
from gsae.run import load_run

# what every gsae-eval writes (and features_<run>.png for each run of several layers per SAE)
OUTPUTS = [
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "table1.md",
    "table1.csv",
    "table2.md",
    "report.html",
    "fig2_amad.png",
    "fig3_flops.png",
    "mmco.png",
    "mmcs.png",
]


def train(model, corpus, out, groups, tokens="2k", *extra):
    argv = flags(model=model, dataset=corpus, out=out, groups=groups, tokens=tokens, **RUN_BUDGET)
    assert train_main([*argv, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, one_thread):
    """Per-layer and G=2 runs on a corpus larger than their budget (text is left over), a run
    that went round a small corpus, and a per-layer run of a 2-layer model."""
    root = tmp_path_factory.mktemp("eval-runs")
    big = write_corpus(root / "big.txt", copies=100)  # ~10k tokens: 2k trained, the rest held out
    small = write_corpus(root / "small.txt", copies=10)  # ~1k tokens: 2k trained goes round it
    shallow = build_tiny_model(root / "shallow", layers=2)
    return {
        "corpus": big,
        "per-layer": train(tiny_model_dir, big, root / "per-layer", "per-layer"),
        "grouped": train(tiny_model_dir, big, root / "grouped", "2"),
        "cycled": train(tiny_model_dir, small, root / "cycled", "1", "2k", "--repeat"),
        "shallow-model": shallow,
        "shallow": train(shallow, big, root / "shallow-run", "per-layer", "1k"),
    }


def test_eval_writes_every_output(runs, tmp_path, capsys, offline):
    out = tmp_path / "eval"
    argv = [
        str(runs["grouped"]),
        "--baseline",
        str(runs["per-layer"]),
        "--out",
        str(out),
        "--tokens",
        "640",
        "--batch-tokens",
        "256",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Approach |" in printed and "tokens/s" in printed
    for name in (*OUTPUTS, "features_grouped.png"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["layer"]) for r in records) == sorted(
        (run, layer) for run in ("per-layer", "grouped") for layer in range(4)
    )
    for r in records:
        assert r["tokens"] == 640 and r["positions"] > 0 and 0 <= r["never_fired"] <= 1
        assert r["eval"]["dataset"] == str(runs["corpus"]) and r["eval"]["start_document"] > 0
        assert r["training"]["groups"] in ("per-layer", "2") and r["m"] == 4 * 32
        assert (r["mmco"] is None) == (r["run"] == "per-layer")
        assert all(r[k] is not None for k in ("fvu", "delta_ce_pct", "ce_recovered", "kl_score"))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 8 and float(rows[0]["fvu"]) == pytest.approx(records[0]["fvu"], rel=1e-5)
    table = (out / "table1.md").read_text()
    assert "| Per-layer SAEs (baseline, c=4) | per-layer | 3 | 4 | 1.000 |" in table
    assert re.search(r"\| Group SAEs \(AMAD, Ĝ?G?=2\) \| grouped \| 2 \| 4 \| 0\.\d+ \|", table)
    # table 2: the Δ of gsae-groups (stored in groups.json by the same FLOP model)
    grouping = load_run(runs["grouped"]).grouping
    saving = 100 * grouping.savings[2]
    assert f"| {saving:.1f}% |" in (out / "table2.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 640 and set(summary["runs"]) == {"per-layer", "grouped"}
    assert set(summary["mmco"]["grouped"]) == {f"{a},{b}" for a in range(4) for b in range(4)}
    assert summary["per_group"]["grouped"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page
    assert not re.search(r"""src=['"](?!data:)""", page)  # nothing outside the page
    assert not (out / "features_per-layer.png").exists()  # one layer per SAE: nothing to show
    features = list(csv.DictReader((out / "features_grouped.csv").open()))
    assert len(features) == 128 * sum(
        1 for s in load_run(runs["grouped"]).saes if len(s.layers) > 1
    )
    for row in features:
        per_layer = [int(v) for k, v in row.items() if k.startswith("layer_") and v != ""]
        assert sum(per_layer) == int(row["fired"])


def test_heldout_text_starts_after_the_training_position(runs):
    from gsae.eval.runs import heldout_start, split_selects

    grouped, per_layer = load_run(runs["grouped"]), load_run(runs["per-layer"])
    assert grouped.position.epoch == 0 and grouped.position.documents > 0
    start, notes = heldout_start([grouped, per_layer], str(runs["corpus"]), "train", "text")
    furthest = max((grouped.position, per_layer.position), key=lambda p: (p.documents, p.offset))
    # the first document after the one the furthest run stopped inside: none partly trained on
    assert (start.documents, start.offset) == (furthest.documents + 1, 0)
    assert "held-out text" in notes[0]
    # another dataset: from the start; another split or column of a text file is the same text
    assert heldout_start([grouped], "other.txt", "train", "text")[0].documents == 0
    start, notes = heldout_start([grouped], str(runs["corpus"]), "train", "body")
    assert start.documents == grouped.position.documents + 1 and "whatever the column" in notes[0]
    start, notes = heldout_start([grouped], str(runs["corpus"]), "test", "text")
    assert start.documents == grouped.position.documents + 1
    assert "a local file with one text whatever the split" in notes[0]
    # a saved DatasetDict: its splits are different text
    import datasets

    saved = runs["corpus"].parent / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(saved)
    )
    assert split_selects(str(saved)) and split_selects("monology/pile-uncopyrighted")
    assert not split_selects(str(runs["corpus"])) and split_selects("demo")  # train and test


def test_a_run_that_went_round_its_corpus_needs_allow_overlap(runs, tmp_path, capsys, offline):
    out = tmp_path / "eval"
    argv = [str(runs["cycled"]), "--out", str(out), "--tokens", "128", "--no-downstream"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "went round its corpus" in err and "--allow-overlap" in err
    assert not out.exists()
    assert main(argv + ["--allow-overlap"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert any("--allow-overlap" in note for note in summary["notes"])
    assert any("not asked for" in note for note in summary["notes"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "delta_ce_pct" not in record and record["fvu"] is not None


def test_bad_inputs_fail_before_any_work(runs, tmp_path, capsys, offline):
    out = tmp_path / "out"

    def fails(argv, *messages):
        assert main([*argv, "--out", str(out), "--tokens", "128"]) == 2
        err = capsys.readouterr().err
        for message in messages:
            assert message in err, err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("gsae-eval: error: "), err
        assert not out.exists()

    grouped, per_layer = str(runs["grouped"]), str(runs["per-layer"])
    fails([str(tmp_path / "nowhere")], "no such directory")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "is not a gsae-train output folder (no run.json)")
    (tmp_path / "groups").mkdir()
    (tmp_path / "groups" / "groups.json").write_text("{}")
    fails([str(tmp_path / "groups")], "not a gsae-train output folder")
    unfinished = _copy(runs["grouped"], tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    fails([str(unfinished)], "unfinished gsae-train run", "--resume")
    broken = _copy(runs["grouped"], tmp_path / "broken")
    shutil.rmtree(broken / "layer_3")
    fails([str(broken)], "the SAE 'layer_3' listed in summary.json is missing")
    # a baseline of another model, of another depth, or not per-layer
    other = _copy(runs["per-layer"], tmp_path / "other-model")
    run_json = json.loads((other / "run.json").read_text())
    run_json["settings"]["model"] = "pythia-70m"
    (other / "run.json").write_text(json.dumps(run_json))
    fails([grouped, "--baseline", str(other)], "of different models", "pythia-70m")
    fails([grouped, "--baseline", grouped], "is not a per-layer run")
    shallow = str(runs["shallow"])
    fails(
        [grouped, "--baseline", shallow, "--model", str(runs["shallow-model"])], "different depths"
    )
    # SAEs for layers the model lacks
    fails(
        [grouped, "--model", str(runs["shallow-model"])],
        "has SAEs for layers [2, 3]",
        "has 2 layers",
    )
    # an evaluation set of 0 tokens
    assert main([grouped, "--out", str(out), "--tokens", "0"]) == 2
    assert "an evaluation set of 0 tokens" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    fails([grouped, "--dataset", str(tmp_path / "empty.txt")], "empty.txt holds no text")
    # no final data position recorded (summary nor checkpoint): the text trained on is unknown
    lost = _copy(runs["grouped"], tmp_path / "lost")
    shutil.rmtree(lost / "checkpoint")
    summary = json.loads((lost / "summary.json").read_text())
    del summary["position"]
    (lost / "summary.json").write_text(json.dumps(summary))
    fails([str(lost)], "does not record its final data position", "--allow-overlap")
    fails([grouped, "--mmco-memory", "lots"], "not a memory size")
    assert main([grouped, "--out", per_layer]) == 2  # would replace the run's summary.json
    assert "holds a gsae-train run" in capsys.readouterr().err
    fails([grouped, "--dataset", "nope/nothing"], "could not load dataset 'nope/nothing'")
    fails([grouped, "--ctx-len", "100000"], "longer than")
    fails([grouped, per_layer, str(runs["shallow"])], "different models")


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, offline, one_thread):
    """The paper's comparison on the bundled demo, on a tiny budget: --groups auto (Ĝ), 1,
    per-layer and even:2, evaluated together against the per-layer baseline."""
    common = flags(
        model="demo", dataset="demo", tokens="8k", grouping_tokens="4k", scale_tokens="2k"
    )
    common += flags(expansion_factor=2, k=16, lr="1e-2", log_every=1000, device="cpu")
    for groups in ("auto", "per-layer", "even:2"):
        assert train_main([*common, "--groups", groups, "--out", str(tmp_path / groups)]) == 0
    g_hat = load_run(tmp_path / "auto").grouping.g_hat
    if g_hat != 1:  # the ordering below is about G = 1
        assert train_main([*common, "--groups", "1", "--out", str(tmp_path / "1")]) == 0
    out = tmp_path / "eval"
    runs = [str(p) for p in sorted(tmp_path.iterdir()) if p.name != "per-layer"]
    argv = [
        *runs,
        "--baseline",
        str(tmp_path / "per-layer"),
        "--out",
        str(out),
        "--tokens",
        "512",
        "--batch-tokens",
        "512",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    names = [*OUTPUTS, "features_auto.png", "features_even:2.png"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    one = "auto" if g_hat == 1 else "1"
    assert summary["runs"][one]["groups"] == 1
    # the paper's ordering: one SAE per layer reconstructs at least as well as one for all
    # grouped layers, on the same layers (on this budget: 0.555 against 0.574)
    per_layer, single = summary["runs"]["per-layer"]["fvu"], summary["runs"][one]["fvu"]
    assert per_layer["mean"] <= single["mean"], (per_layer, single)
    table = (out / "table1.md").read_text()
    assert "(AMAD, Ĝ=" in table and "(evenly spaced, G=2)" in table
    assert f"| demo | {g_hat} (Ĝ) | dense (paper)" in (out / "table2.md").read_text()
    assert torch.isfinite(
        torch.tensor([summary["runs"][r]["fvu"]["mean"] for r in summary["runs"]])
    ).all()
