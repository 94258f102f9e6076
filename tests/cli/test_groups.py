"""gsae-groups end to end, offline, on a tiny model and a local text file."""

import json

import numpy as np
import pytest
from tiny import flags, local_run

from gsae import grouping as gp
from gsae.cli.groups import main as groups_main


def test_gsae_groups_runs_offline_and_writes_its_outputs(
    tiny_model_dir, tiny_corpus, tmp_path, offline, capsys
):
    out = tmp_path / "groups"
    argv = local_run(tiny_model_dir, tiny_corpus, out, tokens="3k", ctx_len=64, batch_size=4)
    argv += flags(model_dtype="fp32")
    assert groups_main(argv) == 0
    printed = capsys.readouterr().out
    assert "AMAD" in printed and "*" in printed and "G_hat" in printed
    data = json.loads((out / "groups.json").read_text())
    assert data["layers"] == [0, 1, 2]  # the last of 4 layers is left out: it gets its own SAE
    assert data["tokens"] == 3000
    assert set(data["partitions"]) == {"1", "2"}
    d = np.array(data["distances"])
    amads = {int(g): p["amad"] for g, p in data["partitions"].items()}
    for p in data["partitions"].values():  # AMAD of each partition, from the saved distances
        assert p["amad"] == pytest.approx(gp.amad(d, p["labels"]))
    below = [g for g in sorted(amads) if amads[g] < data["threshold"]]
    assert data["g_hat"] == (below[0] if below else max(amads))  # the smallest G below it
    assert set(data["savings"]) == {"1", "2"} and all(v < 0 for v in data["savings"].values())
    assert d.shape == (3, 3) and np.allclose(d, d.T) and (d[~np.eye(3, dtype=bool)] > 0).all()
    for png in ("distances.png", "amad.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_include_last(tiny_model_dir, tiny_corpus, tmp_path, offline):
    argv = local_run(tiny_model_dir, tiny_corpus, tmp_path, tokens=500, ctx_len=32)
    argv += flags(include_last=True)
    assert groups_main(argv) == 0
    assert json.loads((tmp_path / "groups.json").read_text())["layers"] == [0, 1, 2, 3]


@pytest.mark.parametrize("fmt", ["npy", "json"])
def test_from_matrix_groups_every_row(tmp_path, fmt, capsys):
    rng = np.random.default_rng(0)
    pts = np.cumsum(rng.normal(size=(5, 2)), 0)
    m = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    m = m / m.max() * 0.5
    path = tmp_path / f"m.{fmt}"
    np.save(path, m) if fmt == "npy" else path.write_text(json.dumps(m.tolist()))
    assert groups_main(["--from-matrix", str(path), "--out", str(tmp_path / "o")]) == 0
    data = json.loads((tmp_path / "o" / "groups.json").read_text())
    assert data["layers"] == [0, 1, 2, 3, 4]  # none excluded
    assert set(data["partitions"]) == {"1", "2", "3", "4"}


def test_bad_inputs_exit_2_with_a_message(tmp_path, offline, capsys):
    # a local dataset: the default one is on the hub, and the dataset is opened first
    assert groups_main(["--model", "pythia-70m", "--dataset", "demo", "--out", str(tmp_path)]) == 2
    assert "EleutherAI/pythia-70m" in capsys.readouterr().err
    (tmp_path / "m.json").write_text("[[0, 1], [2, 0]]")
    assert groups_main(["--from-matrix", str(tmp_path / "m.json")]) == 2
    assert "not symmetric" in capsys.readouterr().err
    assert groups_main(["--from-matrix", str(tmp_path / "missing.npy")]) == 2
    assert groups_main(["--model", "x", "--tokens", "many"]) == 2
