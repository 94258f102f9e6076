"""gsae-train end to end on a tiny random GPTNeoX, offline: outputs, learning, exact resume and
every bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gsae import trainer
from gsae.trainer import train_main

FAST = ["--tokens", "12k", "--grouping-tokens", "4k", "--scale-tokens", "2k", "--batch-tokens",
        "512", "--ctx-len", "64", "--k", "8", "--dead-threshold", "3k", "--repeat",
        "--log-every", "4", "--device", "cpu"]  # fmt: skip


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


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    tiny_model_dir, tiny_corpus, tmp_path, offline, monkeypatch
):  # noqa: E501
    straight = tmp_path / "straight"
    assert train_main(base(tiny_model_dir, tiny_corpus, straight) + ["--save-every", "5k"]) == 0

    cut = tmp_path / "cut"

    def ctrl_c(run):
        if run.steps == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "STEP_HOOK", ctrl_c)
    assert train_main(base(tiny_model_dir, tiny_corpus, cut) + ["--save-every", "5k"]) == 130
    assert (cut / "checkpoint" / "run_state.pt").exists()
    monkeypatch.setattr(trainer, "STEP_HOOK", None)
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


def test_layers_per_token_all(tiny_model_dir, tiny_corpus, tmp_path, offline):
    out = tmp_path / "all"
    argv = base(tiny_model_dir, tiny_corpus, out) + ["--layers-per-token", "all", "--groups", "1",
                                                      "--tokens", "2k"]  # fmt: skip
    assert train_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [g["layers"] for g in summary["groups"].values()] == [[0, 1, 2], [3]]


def test_groups_file_from_gsae_groups(tiny_model_dir, tiny_corpus, tmp_path, offline):
    from gsae.cli import groups_main

    gdir = tmp_path / "g"
    assert groups_main(["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--tokens",
                        "2k", "--ctx-len", "64", "--repeat", "--out", str(gdir)]) == 0  # fmt: skip
    out = tmp_path / "run"
    argv = base(tiny_model_dir, tiny_corpus, out) + ["--groups-file", str(gdir / "groups.json"),
                                                      "--tokens", "2k"]  # fmt: skip
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
        data = {"model": "", "layers": [0, 1], "g_hat": 1,
                "partitions": {"1": {"labels": [0, 0], "amad": 0.1}}, **fields}  # fmt: skip
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
    argv = ["--model", "demo", "--dataset", "demo", "--out", str(out), "--tokens", "16k",
            "--grouping-tokens", "8k", "--scale-tokens", "4k", "--log-every", "2"]  # fmt: skip
    assert train_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(len(g["layers"]) for g in summary["groups"].values()) == 6
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    names = list(summary["groups"])
    assert all(log[-1]["groups"][n]["fvu"] < log[0]["groups"][n]["fvu"] for n in names)


def test_scale_estimate_streams_and_matches_the_sae_helper():
    from gsae.sae import activation_scale

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 50, 8, generator=g) * torch.tensor([1.0, 2.0, 5.0])[:, None, None]
               for _ in range(4)]  # fmt: skip
    for mode in ("mean_sq", "mean_norm"):
        got = trainer.estimate_scales(iter(batches), [4, 7, 9], 120, mode)
        for i, layer in enumerate([4, 7, 9]):
            want = activation_scale([b[i] for b in batches], 120, mode)
            assert got[layer] == pytest.approx(want, rel=1e-9)
