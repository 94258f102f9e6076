"""Every flag and input file of the commands is checked before any work, with one line naming
the problem; held-out text that really is held out."""

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny import demo_run, flags

from gsae.cli import autointerp, browse, groups
from gsae.cli import eval as eval_cli
from gsae.cli import train as train_cli
from gsae.device import resolve_device
from gsae.eval.runs import heldout_start
from gsae.hf.texts import DatasetLoadError, open_texts
from gsae.hf.tokens import StreamPosition
from gsae.run import load_run


def one_line_error(capsys, command: str, *words: str) -> str:
    """stderr is one line, ``command: error: ...``, holding ``words``; no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ---- devices


def test_device_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="--device foo: not a device"):
        resolve_device("foo")
    with pytest.raises(ValueError, match="--device meta"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name}: this torch cannot use a cuda"):
            resolve_device(name)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


@pytest.mark.gpu
def test_the_gpus_there_are_are_accepted_and_no_others():
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"has {count} cuda device"):
        resolve_device(f"cuda:{count}")


def test_every_command_refuses_a_bad_device_in_one_line(
    trained_runs, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    run = str(trained_runs["grouped"])
    for device in ("foo", "cuda"):
        commands = {
            "gsae-train": (
                train_cli.main,
                ["--model", "demo", "--dataset", "demo", "--out", str(tmp_path / "t")],
            ),
            "gsae-groups": (
                groups.main,
                ["--model", "demo", "--dataset", "demo", "--out", str(tmp_path / "g")],
            ),
            "gsae-eval": (eval_cli.main, [run, "--out", str(tmp_path / "e")]),
            "gsae-browse": (browse.main, [run, "--out", str(tmp_path / "b")]),
            "gsae-autointerp": (
                autointerp.main,
                [
                    run,
                    "--endpoint",
                    "http://127.0.0.1:9",
                    "--explainer-model",
                    "m",
                    "--out",
                    str(tmp_path / "a"),
                ],
            ),
        }
        for command, (main, argv) in commands.items():
            assert main([*argv, "--device", device]) == 2, command
            one_line_error(capsys, command, f"--device {device}")
    assert not any(p.name in "tgeb" for p in tmp_path.iterdir())  # nothing written


def test_a_bad_device_under_torchrun_fails_before_the_process_group(monkeypatch):
    from gsae.train.distributed import init_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("foo", "cuda"):
        with pytest.raises(ValueError, match=f"--device {device}"):
            init_world(device)  # no rendezvous attempted: it would wait for the other process


# ---- gsae-train, gsae-groups, gsae-browse, gsae-autointerp flags


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--tokens", "0"], ["--tokens 0", "train nothing"]),
        (["--batch-tokens", "0"], ["--batch-tokens 0"]),
        (["--batch-tokens", "-4096"], ["--batch-tokens -4096"]),
        (["--threshold", "-1"], ["--threshold -1"]),
        (["--threshold", "1.5"], ["--threshold 1.5"]),
        (["--log-every", "0"], ["--log-every 0"]),
        (["--grouping-tokens", "0"], ["--grouping-tokens 0"]),
        (["--scale-tokens", "0"], ["--scale-tokens 0"]),
    ],
)
def test_train_refuses_settings_that_train_nothing(flags, words, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "demo", "--dataset", "demo", "--out", str(out), *flags]
    assert train_cli.main(argv) == 2
    one_line_error(capsys, "gsae-train", *words)
    assert not out.exists()


def test_groups_refuses_a_negative_threshold_before_loading(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(groups, "load_model", no_model)
    argv = ["--model", "demo", "--dataset", "demo", "--out", str(tmp_path / "g")]
    assert groups.main([*argv, "--threshold", "-1"]) == 2
    one_line_error(capsys, "gsae-groups", "--threshold -1")


def test_groups_refuses_a_budget_of_no_tokens(tmp_path, capsys):
    argv = ["--model", "demo", "--dataset", "demo", "--out", str(tmp_path / "g")]
    assert groups.main([*argv, "--tokens", "0"]) == 2
    one_line_error(capsys, "gsae-groups", "--tokens 0")


def test_groups_from_a_file_that_is_not_a_matrix(tmp_path, capsys):
    import numpy as np

    files = {
        "text.json": b"not a matrix\n",
        "record.json": b'{"a": 1}',
        "ragged.json": b"[[0, 1], [1]]",
        "binary.json": bytes(range(256)),
        "random.npy": os.urandom(200),
        "empty.json": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "rows.npy", np.zeros((3, 2)))
    for name in [*files, "rows.npy"]:
        path = tmp_path / name
        assert groups.main(["--from-matrix", str(path), "--out", str(tmp_path / "g")]) == 2
        one_line_error(capsys, "gsae-groups", str(path), "not an L x L distance matrix")
    assert not (tmp_path / "g").exists()


def test_browse_refuses_a_window_longer_than_the_context(trained_runs, tmp_path, capsys):
    out = tmp_path / "browse"
    argv = [str(trained_runs["grouped"]), "--out", str(out), "--window", "65"]
    assert browse.main(argv) == 2  # the run's context is 64 tokens
    one_line_error(capsys, "gsae-browse", "--window 65", "64")
    assert browse.main([*argv[:3], "--batch-tokens", "0"]) == 2
    one_line_error(capsys, "gsae-browse", "--batch-tokens 0")
    assert not out.exists()


def test_autointerp_refuses_more_latents_than_an_sae_has(trained_runs, tmp_path, capsys):
    out = tmp_path / "ai"
    argv = [
        str(trained_runs["grouped"]),
        "--endpoint",
        "http://127.0.0.1:9",
        "--explainer-model",
        "m",
        "--out",
        str(out),
        "--latents",
        "129",
    ]
    assert autointerp.main(argv) == 2  # m = 4 x 32 = 128
    one_line_error(capsys, "gsae-autointerp", "--latents 129", "128")
    assert not (out / "collection").exists()


def test_the_demos_repeat_is_for_the_demo_corpus_only(tmp_path):
    own = tmp_path / "one.txt"
    own.write_text("one line of my own\n")
    p = train_cli.parser()
    mine = train_cli.settings_from_args(p.parse_args(["--model", "demo", "--dataset", str(own)]))
    assert mine.repeat is False and mine.sae.k == 32  # the demo model's defaults still apply
    demo = train_cli.settings_from_args(p.parse_args(["--model", "demo", "--dataset", "demo"]))
    assert demo.repeat is True


# ---- dataset files


def test_dataset_files_that_hold_no_text_are_named(tmp_path):
    cases = {
        "empty.txt": (b"", "holds no text"),
        "blank.jsonl": (b"\n\n  \n", "holds no text"),
        "binary.txt": (b"abc\x00\x01\x02" * 100, "binary"),
        "latin1.txt": ("café au lait\n".encode("latin-1"), "not UTF-8"),
        "fake.txt.gz": (b"plain text, not gzip\n", "cannot read"),
        "fake.parquet": (b"not parquet at all", "not a parquet file"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DatasetLoadError, match=words) as info:
            open_texts(str(path))
        assert str(path) in str(info.value)
    # a bad byte beyond the part checked at opening is named, with its offset, when read
    late = tmp_path / "late.txt.gz"
    with gzip.open(late, "wb") as f:
        f.write(b"good text\n\n" * 200_000 + b"caf\xe9\n")
    with pytest.raises(DatasetLoadError, match=f"{late} is not UTF-8 text .* byte 2200003"):
        list(open_texts(str(late)).texts())


def test_train_and_groups_name_a_binary_dataset_before_the_model_loads(
    tmp_path, capsys, monkeypatch
):
    import gsae.cli.groups as groups_cli
    import gsae.train.pipeline as pipeline

    def no_model(*_args, **_kwargs):
        raise RuntimeError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    monkeypatch.setattr(groups_cli, "load_model", no_model)
    data = tmp_path / "data.txt"
    data.write_bytes(os.urandom(4096) + b"\x00")
    argv = ["--model", "demo", "--dataset", str(data), "--out", str(tmp_path / "run")]
    assert train_cli.main(argv) == 2
    one_line_error(capsys, "gsae-train", str(data))
    argv = ["--model", "demo", "--dataset", str(data), "--out", str(tmp_path / "groups")]
    assert groups_cli.main(argv) == 2
    one_line_error(capsys, "gsae-groups", str(data))


# ---- the demo corpus's held-out split


def test_the_demo_corpus_has_a_test_split_training_never_reads():
    from gsae.hf.texts import demo_texts

    train = list(demo_texts("train").texts())
    test = list(demo_texts("test").texts())
    whole = list(open_texts(str(Path(demo_texts().name))).texts())  # the file itself
    assert train + test == whole
    assert len(test) == len(whole) - len(train) and 0.09 < len(test) / len(whole) < 0.11
    with pytest.raises(DatasetLoadError, match="train and test"):
        open_texts("demo", "validation")
    # --repeat cycles over the train split only
    from gsae.hf.models import load_tokenizer
    from gsae.hf.tokens import TokenStream

    tokenizer = load_tokenizer("demo")
    texts = demo_texts("train")
    states = [state for _, state in texts.read()]
    last = train[-1]
    with TokenStream(
        texts,
        tokenizer,
        ctx_len=128,
        batch_size=64,
        repeat=True,
        position=StreamPosition(0, len(train) - 1, states[-2], 0),
    ) as stream:
        seen = []
        for batch in stream:
            seen.append(batch.input_ids.flatten())
            if batch.position.epoch == 1:
                break
    ids = torch.cat(seen).tolist()
    text = tokenizer.decode(ids)
    assert text.startswith(last[:50]) and train[0][:50] in text and test[0][:50] not in text


# ---- held-out text


def _position_run(run_dir: Path, dataset: str, column: str = "text", epoch: int = 0) -> None:
    """Rewrite a run's recorded dataset, column and pass over it (for the held-out rules)."""
    path = run_dir / "run.json"
    run = json.loads(path.read_text())
    run["settings"]["dataset"], run["settings"]["column"] = dataset, column
    path.write_text(json.dumps(run))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["position"]["epoch"] = epoch
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_heldout_text_is_the_same_file_however_it_is_spelled(trained_runs, tmp_path, monkeypatch):
    corpus = Path(trained_runs["corpus"])
    grouped = load_run(trained_runs["grouped"])
    trained = grouped.position
    assert trained.offset > 0 and trained.epoch == 0
    link = tmp_path / "link.txt"
    link.symlink_to(corpus)
    hard = tmp_path / "hard.txt"
    os.link(corpus, hard)
    copy = tmp_path / "copy.txt"
    shutil.copy(corpus, copy)
    monkeypatch.chdir(corpus.parent)
    spellings = [
        str(corpus),
        corpus.name,
        f"./{corpus.name}",
        f"../{corpus.parent.name}/{corpus.name}",
        str(link),
        str(hard),
        str(copy),
    ]
    for spelling in spellings:
        for column in ("text", "foo"):  # a .txt file has no columns: every column is its text
            start, notes = heldout_start([grouped], spelling, "train", column)
            # from the first document after the one training stopped in: none shared
            assert (start.documents, start.offset) == (trained.documents + 1, 0), spelling
            assert any("held-out text" in note for note in notes)
    other = tmp_path / "other.txt"
    other.write_text("other text\n\nentirely\n")
    assert heldout_start([grouped], str(other), "train", "text")[0] == StreamPosition()


def test_heldout_text_starts_at_a_document_start(trained_runs):
    """The first held-out document is whole: its first tokens are the first evaluated."""
    grouped = load_run(trained_runs["grouped"])
    texts = open_texts(str(trained_runs["corpus"]))
    start, _ = heldout_start([grouped], str(trained_runs["corpus"]), "train", "text", texts=texts)
    documents = list(texts.texts())
    first = next(texts.read(start.source))[0]
    assert first == documents[grouped.position.documents + 1]


def test_eval_on_another_spelling_of_the_training_file_is_held_out(
    trained_runs, tmp_path, capsys, offline
):
    corpus = Path(trained_runs["corpus"])
    copy = tmp_path / "copy.txt"
    shutil.copy(corpus, copy)
    out = tmp_path / "eval"
    argv = [
        str(trained_runs["grouped"]),
        "--out",
        str(out),
        "--tokens",
        "128",
        "--no-downstream",
        "--dataset",
        str(copy),
        "--column",
        "foo",
    ]
    assert eval_cli.main(argv) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    trained = load_run(trained_runs["grouped"]).position.documents
    assert record["eval"]["start_document"] == trained + 1


def test_run_json_records_absolute_paths_and_old_relative_ones_are_found(
    trained_runs, tmp_path, monkeypatch
):
    # a run started with a relative --dataset records it absolute
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(trained_runs["corpus"], project / "data" / "c.txt")
    monkeypatch.chdir(project)
    p = train_cli.parser()
    s = train_cli.settings_from_args(
        p.parse_args(["--model", str(trained_runs["model"]), "--dataset", "data/c.txt"])
    )
    assert s.dataset == str(project / "data" / "c.txt")
    # a run of an earlier version recorded it relative to where it was started
    run = project / "out" / "run"
    shutil.copytree(trained_runs["grouped"], run)
    _position_run(run, "data/c.txt")
    monkeypatch.chdir(tmp_path)  # elsewhere: data/c.txt does not exist from here
    assert load_run(run).arg("dataset") == str(project / "data" / "c.txt")
    _position_run(run, "data/missing.txt")
    assert load_run(run).arg("dataset") == "data/missing.txt"  # as recorded: named when opened


def test_a_demo_run_that_went_round_its_train_split_is_evaluated_on_the_test_split(
    tmp_path, capsys, offline, one_thread
):
    run = tmp_path / "demo"
    budget = dict(grouping_tokens="1k", scale_tokens="1k", expansion_factor=2, device="cpu")
    argv = demo_run(run, "2k", **budget)
    assert train_cli.main(argv) == 0
    _position_run(run, "demo", epoch=3)  # as if --repeat went round the train split
    out = tmp_path / "eval"
    argv = [str(run), "--out", str(out), "--tokens", "256", "--no-downstream"]
    assert eval_cli.main(argv) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["eval"]["split"] == "test" and record["eval"]["start_document"] == 0
    assert "'test' split" in capsys.readouterr().out
    argv = [str(run), "--out", str(tmp_path / "e2"), "--tokens", "256", "--split", "train"]
    assert eval_cli.main(argv) == 2
    one_line_error(capsys, "gsae-eval", "went round its corpus")


def test_sae_settings_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import gsae.train.pipeline as pipeline

    def no_model(*_args, **_kwargs):
        raise RuntimeError("the model was loaded before the settings were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    for bad, words in ((["--lr", "-1"], "lr must be > 0"), (["--k", "0"], "k must be in")):
        out = tmp_path / bad[0].strip("-")
        argv = [*flags(model="demo", dataset="demo", out=out), *bad]
        assert train_cli.main(argv) == 2
        one_line_error(capsys, "gsae-train", words)
        assert not out.exists()  # nothing written
