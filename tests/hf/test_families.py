"""Any model a user brings: each family from a tiny config with a small position limit,
and one model-dtype policy for gsae-groups and gsae-train."""

import json

import numpy as np
import pytest
from tiny import build_family, local_run

from gsae.cli.groups import main as groups_main
from gsae.cli.train import main as train_main

pytestmark = [
    pytest.mark.usefixtures("offline", "one_thread"),
]
POSITIONS = 48


@pytest.fixture(scope="module", params=["gptneox", "gpt2", "llama", "bert"])
def family(request, tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return build_family(request.param, directory, tiny_model_dir, positions=POSITIONS)


def train_argv(model, corpus, out, *extra):
    train = dict(tokens=400, scale_tokens=96, batch_tokens=96, k=8, expansion_factor=2)
    return [*local_run(model, corpus, out, **train, groups="even:1"), *extra]


def groups_argv(model, corpus, out, *extra):
    return [*local_run(model, corpus, out, tokens=200, batch_size=2), *extra]


def test_the_default_context_is_capped_at_the_models_position_limit(
    family, tiny_corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    assert train_main(train_argv(family, tiny_corpus, out)) == 0
    printed = capsys.readouterr().out
    assert f"{POSITIONS} positions" in printed, printed  # the plan says so
    assert json.loads((out / "run.json").read_text())["settings"]["ctx_len"] == POSITIONS
    assert groups_main(groups_argv(family, tiny_corpus, tmp_path / "groups")) == 0
    assert f"{POSITIONS} positions" in capsys.readouterr().out


def test_a_context_longer_than_the_model_takes_is_refused(family, tiny_corpus, tmp_path, capsys):
    longer = ["--ctx-len", str(POSITIONS + 16)]
    assert train_main(train_argv(family, tiny_corpus, tmp_path / "run", *longer)) == 2
    err = capsys.readouterr().err
    assert "--ctx-len 64" in err and f"{POSITIONS} positions" in err, err
    assert not (tmp_path / "run").exists()
    assert groups_main(groups_argv(family, tiny_corpus, tmp_path / "g", *longer)) == 2
    assert f"{POSITIONS} positions" in capsys.readouterr().err


def test_gsae_groups_and_gsae_train_measure_alike_on_one_machine(
    tiny_model_dir, tiny_corpus, tmp_path
):
    """No --model-dtype: both commands take the same default, so the same distances."""
    common = [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(tiny_corpus),
        "--ctx-len",
        "32",
        "--repeat",
        "--device",
        "cpu",
    ]
    assert (
        groups_main([*common, "--tokens", "512", "--batch-size", "4", "--out", str(tmp_path / "g")])
        == 0
    )
    assert (
        train_main(
            [
                *common,
                "--grouping-tokens",
                "512",
                "--batch-tokens",
                "128",
                "--tokens",
                "128",
                "--scale-tokens",
                "128",
                "--k",
                "8",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    by_groups = json.loads((tmp_path / "g" / "groups.json").read_text())["distances"]
    by_train = json.loads((tmp_path / "t" / "groups.json").read_text())["distances"]
    np.testing.assert_array_equal(np.array(by_groups), np.array(by_train))
