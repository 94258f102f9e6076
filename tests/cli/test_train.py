"""gsae-train end to end on a tiny random GPTNeoX, offline: outputs, learning, exact resume and
every bad input."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from tiny import config_flags, demo_run, flags, short_run

from gsae.cli.train import main as train_main
from gsae.run import RunFolder
from gsae.train import RunSettings, loop

# tiny models: one intra-op thread is as fast, and far faster on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = short_run("12k", "4k", "2k", dead_threshold="3k", log_every=4)


def base(tiny_model_dir, tiny_corpus, out):
    return ["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--out", str(out)] + FAST


def weights(out, name):
    return load_file(str(out / name / "sae.safetensors"))


def test_train_writes_every_output_and_fvu_falls(tiny_model_dir, tiny_corpus, tmp_path, offline):
    out = tmp_path / "run"
    assert train_main(base(tiny_model_dir, tiny_corpus, out)) == 0
    groups = json.loads((out / "groups.json").read_text())
    assert groups["layers"] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary["groups"])
    assert "layer_3" in names  # the last layer: its own SAE
    assert sum(len(g["layers"]) for g in summary["groups"].values()) == 4  # every layer covered
    assert summary["tokens"] >= 12_000 and summary["tokens_per_second"] > 0
    for name, g in summary["groups"].items():
        assert (out / name / "sae.safetensors").exists()
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["layers"] == g["layers"] and set(cfg["scales"]) == {str(x) for x in g["layers"]}
        assert set(g["fvu_per_layer"]) == {str(x) for x in g["layers"]}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["groups"], log[-1]["groups"]
    assert all(last[n]["fvu"] < first[n]["fvu"] for n in names), (first, last)
    # what evaluation reads back from the folder
    run = RunFolder(out)
    assert RunSettings.read(out).model == str(tiny_model_dir)
    assert set(run.load_saes()) == set(names)
    assert run.position().to_dict() == summary["position"]


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    tiny_model_dir, tiny_corpus, tmp_path, offline, monkeypatch
):
    straight = tmp_path / "straight"
    assert train_main(base(tiny_model_dir, tiny_corpus, straight) + ["--save-every", "5k"]) == 0

    cut = tmp_path / "cut"
    train_batch = loop.TrainingLoop.train_batch

    def ctrl_c_after_step_9(run, *args):
        train_batch(run, *args)
        if run.steps == 9:  # after a checkpoint at 5k tokens, before the next one
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop.TrainingLoop, "train_batch", ctrl_c_after_step_9)
    assert train_main(base(tiny_model_dir, tiny_corpus, cut) + ["--save-every", "5k"]) == 130
    assert json.loads((cut / "checkpoint" / "run_state.json").read_text())["steps"] == 9
    monkeypatch.undo()
    assert train_main(["--resume", str(cut)]) == 0

    summary = json.loads((straight / "summary.json").read_text())
    for name in summary["groups"]:
        a, b = weights(straight, name), weights(cut, name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert json.loads((cut / "summary.json").read_text())["steps"] == summary["steps"]


@pytest.mark.parametrize("spec,expect", [("per-layer", 4), ("even:2", 3), ("2", 3)])
def test_group_specs(tiny_model_dir, tiny_corpus, tmp_path, offline, spec, expect):
    out = tmp_path / spec.replace(":", "_")
    argv = base(tiny_model_dir, tiny_corpus, out) + ["--groups", spec, "--tokens", "2k"]
    assert train_main(argv) == 0
    assert len(json.loads((out / "summary.json").read_text())["groups"]) == expect


def test_groups_file_from_gsae_groups(tiny_model_dir, tiny_corpus, tmp_path, offline):
    from gsae.cli.groups import main as groups_main

    gdir = tmp_path / "g"
    assert (
        groups_main(
            [
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(tiny_corpus),
                "--tokens",
                "2k",
                "--ctx-len",
                "64",
                "--repeat",
                "--out",
                str(gdir),
            ]
        )
        == 0
    )
    out = tmp_path / "run"
    argv = base(tiny_model_dir, tiny_corpus, out) + [
        "--groups-file",
        str(gdir / "groups.json"),
        "--tokens",
        "2k",
    ]
    assert train_main(argv) == 0


def test_bad_inputs_fail_before_any_work(tiny_model_dir, tiny_corpus, tmp_path, offline, capsys):
    def fails(argv, message):
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err

    good = base(tiny_model_dir, tiny_corpus, tmp_path / "a")
    fails(good[:1] + ["pythia-70m"] + good[2:], "EleutherAI/pythia-70m")
    fails(good[:3] + ["nope/nothing"] + good[4:], "could not load dataset 'nope/nothing'")
    fails(good + ["--k", "100000"], "k must be in [1, m=512]")
    fails(good + ["--groups", "sideways"], "--groups must be auto, N, per-layer or even:N")

    def groups_file(name, **fields):
        """A two-layer, one-group groups.json with ``fields`` overriding the defaults."""
        data = {
            "model": "",
            "layers": [0, 1],
            "g_hat": 1,
            "partitions": {"1": {"labels": [0, 0], "amad": 0.1}},
            **fields,
        }
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return str(path)

    other = groups_file("other.json", model="pythia-1b")
    fails(good + ["--groups-file", other], "was made for model 'pythia-1b'")
    wide = groups_file("wide.json", layers=[0, 9])
    fails(good + ["--groups-file", wide], "layers [9] out of range")
    deeper = groups_file("deeper.json", num_model_layers=12)
    fails(good + ["--groups-file", deeper], "made for a model with 12 layers")
    assert not (tmp_path / "a").exists()  # nothing was written by any of these
    done = base(tiny_model_dir, tiny_corpus, tmp_path / "b") + ["--tokens", "1k"]
    assert train_main(done) == 0
    fails(done, "already holds a gsae-train run")
    assert train_main(done + ["--overwrite"]) == 0
    fails(["--resume", str(tmp_path / "nothing-here")], "nothing-here")


def test_demo_pipeline_runs_offline(tmp_path, offline):
    """The README's main command, on a smaller budget: the bundled model and corpus."""
    out = tmp_path / "demo"
    argv = demo_run(out, "16k", grouping_tokens="8k", scale_tokens="4k", log_every=2)
    assert train_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(len(g["layers"]) for g in summary["groups"].values()) == 6
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    names = list(summary["groups"])
    assert all(log[-1]["groups"][n]["fvu"] < log[0]["groups"][n]["fvu"] for n in names)


# ---- groups files, token counting, G_hat, one model load, honest final FVU


def groups_file(tmp_path, name, **fields):
    """A groups.json for the 4-layer tiny model (layers 0-2 grouped) with ``fields`` changed."""
    data = {
        "model": "",
        "layers": [0, 1, 2],
        "g_hat": 2,
        "partitions": {"2": {"labels": [0, 0, 1], "amad": 0.1}},
        **fields,
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_groups_files_that_would_train_the_wrong_thing_are_refused(
    tiny_model_dir, tiny_corpus, tmp_path, offline, capsys
):
    def fails(path, message):
        argv = base(tiny_model_dir, tiny_corpus, tmp_path / "out") + ["--groups-file", path]
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    # same last path component, another model
    elsewhere = str(tmp_path / "elsewhere" / tiny_model_dir.name)
    fails(groups_file(tmp_path, "a.json", model=elsewhere), "was made for model")
    # layer 2 would get no SAE
    fails(
        groups_file(
            tmp_path,
            "b.json",
            layers=[0, 1],
            partitions={"1": {"labels": [0, 0], "amad": 0.1}},
            g_hat=1,
        ),
        "layers [2] of",
    )
    # a label >= G
    fails(
        groups_file(tmp_path, "c.json", partitions={"2": {"labels": [0, 2, 1], "amad": 0.1}}),
        "labels",
    )
    assert not (tmp_path / "out").exists()


def test_from_matrix_is_not_stamped_with_a_model_and_layouts_write_strict_json(
    tiny_model_dir, tiny_corpus, tmp_path, offline
):
    from gsae.cli.groups import main as groups_main

    (tmp_path / "m.json").write_text(json.dumps([[0, 0.1, 0.3], [0.1, 0, 0.2], [0.3, 0.2, 0]]))
    assert groups_main(["--from-matrix", str(tmp_path / "m.json"), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "groups.json").read_text())["model"] == ""
    out = tmp_path / "run"
    argv = base(tiny_model_dir, tiny_corpus, out) + ["--groups", "per-layer", "--tokens", "512"]
    assert train_main(argv) == 0

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    json.loads((out / "groups.json").read_text(), parse_constant=refuse)
    json.loads((out / "summary.json").read_text(), parse_constant=refuse)


def test_dead_latents_count_tokens_with_layers_per_token_all(
    tiny_model_dir, tiny_corpus, tmp_path, offline
):
    """Every layer of a 4-layer group per token: a latent is dead after --dead-threshold tokens,
    not after that many activations (a quarter of them)."""
    out = tmp_path / "all"
    argv = base(tiny_model_dir, tiny_corpus, out) + [
        *config_flags(tmp_path, layers_per_token="all"),
        *flags(groups="even:1", include_last=True, tokens=1536, batch_tokens=128, k=4),
        *flags(dead_threshold=600, log_every=1),
    ]
    assert train_main(argv) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # "dead" is measured before each step, on the counts of the steps before it
    early = [r["groups"]["layers_0-3"]["dead"] for r in log if r["tokens"] - 128 < 600]
    late = [r["groups"]["layers_0-3"]["dead"] for r in log if r["tokens"] - 128 >= 600]
    assert early and not any(early), early
    assert any(late), "no latent ever died: the test cannot tell tokens from activations"


def test_groups_n_is_checked_before_measuring_and_g_hat_is_kept(
    tiny_model_dir, tiny_corpus, tmp_path, offline, capsys, monkeypatch
):
    from gsae import grouping as gp

    measured = []
    update = gp.AngularDistances.update
    monkeypatch.setattr(
        gp.AngularDistances, "update", lambda self, h: measured.append(1) or update(self, h)
    )
    assert train_main(base(tiny_model_dir, tiny_corpus, tmp_path / "a") + ["--groups", "3"]) == 2
    assert "--groups 3" in capsys.readouterr().err and not measured
    out = tmp_path / "b"
    # threshold 0: no G qualifies, so G_hat is the largest (2 of 3 grouped layers); train G = 1
    argv = base(tiny_model_dir, tiny_corpus, out) + flags(groups=1, threshold=0, tokens=512)
    with pytest.warns(RuntimeWarning, match="no G has AMAD below"):
        assert train_main(argv) == 0
    saved = json.loads((out / "groups.json").read_text())
    assert saved["g_hat"] == 2 and saved["g_trained"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [g["layers"] for g in summary["groups"].values()] == [[0, 1, 2], [3]]


def test_auto_loads_the_model_once_and_opens_the_dataset_once(
    tiny_model_dir, tiny_corpus, tmp_path, offline, monkeypatch
):
    import datasets
    import transformers

    saved = tmp_path / "saved"
    texts = tiny_corpus.read_text().split("\n\n")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))
    loads, opens = [], []
    model_load = transformers.AutoModel.from_pretrained
    disk_load = datasets.load_from_disk
    monkeypatch.setattr(
        transformers.AutoModel,
        "from_pretrained",
        lambda *a, **k: loads.append(1) or model_load(*a, **k),
    )
    monkeypatch.setattr(
        datasets, "load_from_disk", lambda *a, **k: opens.append(1) or disk_load(*a, **k)
    )
    argv = base(tiny_model_dir, saved, tmp_path / "run") + ["--tokens", "512"]
    assert train_main(argv) == 0
    assert len(loads) == 1 and len(opens) == 1, (loads, opens)


def test_the_final_fvu_says_whether_its_tokens_were_trained_on(
    tiny_model_dir, tiny_corpus, tmp_path, offline
):
    cycled = tmp_path / "cycled"  # 4k tokens of a ~2.1k-token corpus: the text was seen
    assert train_main(base(tiny_model_dir, tiny_corpus, cycled) + ["--tokens", "4k"]) == 0
    final = json.loads((cycled / "summary.json").read_text())["final_fvu"]
    assert final["held_out"] is False and final["tokens"] > 0
    fresh = tmp_path / "fresh"
    assert train_main(base(tiny_model_dir, tiny_corpus, fresh) + ["--tokens", "1k"]) == 0
    final = json.loads((fresh / "summary.json").read_text())["final_fvu"]
    assert final["held_out"] is True and final["tokens"] > 0


def test_demo_defaults_all_take_effect():
    """`gsae-train --model demo --dataset demo` (the README's main command) must get every demo
    default: without --repeat the 482k-token corpus runs out before the 1M-token budget."""
    from gsae.cli.train import parser, settings_from_args
    from gsae.train.settings import DEMO_SETTINGS

    s = settings_from_args(parser().parse_args(["--model", "demo", "--dataset", "demo"]))
    assert s.repeat is True and s.tokens == 1_000_000 and s.ctx_len == 128
    flags = s.flags()
    for key, value in DEMO_SETTINGS.items():
        assert flags[key] == value, key
    assert flags["k"] == 32 and s.batch_tokens == 2048
    assert settings_from_args(parser().parse_args(["--model", "pythia-70m"])).repeat is False
