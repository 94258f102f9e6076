"""Text sources (:mod:`gsae.hf.texts`): local files in every format; offline, one clear error."""

import gzip
import json

import pytest

from gsae.hf.texts import DatasetLoadError, iter_texts


def test_offline_dataset_fails_naming_what_was_tried(offline, tmp_path):
    with pytest.raises(DatasetLoadError, match=r"no local file .*unreachable.*--dataset"):
        iter_texts("monology/pile-uncopyrighted")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetLoadError, match="expected .txt, .jsonl or .parquet"):
        iter_texts(str(tmp_path / "x.csv"))


def test_local_text_formats(tmp_path):
    docs = ["first document\nwith two lines", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("\n\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    import datasets

    data = datasets.Dataset.from_dict({"text": docs})
    data.to_parquet(str(tmp_path / "a.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    for name in ("a.txt", "a.txt.gz", "a.jsonl", "a.parquet", "saved"):
        assert list(iter_texts(str(tmp_path / name))) == docs, name
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetLoadError, match="has no 'text' field"):
        list(iter_texts(str(tmp_path / "b.jsonl")))
