"""Text sources: the documents of a data set, opened once and read as often as needed.

:func:`open_texts`: a :class:`TextSource` of documents from a hub dataset (streamed) or a local
``.txt``/``.jsonl`` (optionally ``.gz``), parquet file or saved ``datasets`` directory, read
from the start or from a saved state without reading what came before it (byte offsets, row
numbers, or the streaming dataset's own ``state_dict``).
"""

from __future__ import annotations

import codecs
import functools
import gzip
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .hub import bundled_dir, hub_reachable, load_message

DEFAULT_DATASET = "monology/pile-uncopyrighted"


class DatasetLoadError(RuntimeError):
    """A text source could not be opened; the message says what was tried."""


class TextSource:
    """The documents of one dataset, opened once and read as often as needed.

    ``read(state)`` yields ``(document, state after it)``; passing a saved state resumes right
    after that document without reading what came before it. States are small JSON-able dicts.
    """

    name = "texts"

    def read(self, state: dict | None = None) -> Iterator[tuple[str, dict]]:
        raise NotImplementedError

    def texts(self) -> Iterator[str]:
        """The documents alone, from the first."""
        return (text for text, _ in self.read())


class _LineFile(TextSource):
    """A ``.txt`` (documents separated by blank lines, newlines inside kept) or ``.jsonl`` file,
    optionally gzipped; the state is a byte offset into the (uncompressed) text."""

    SNIFF = 1 << 20  # bytes checked when the file is opened

    def __init__(self, path: Path, kind: str, column: str, start: int = 0, end: int | None = None):
        """``start``/``end``: the byte offsets of a part of the file (a split of the demo)."""
        self.path, self.kind, self.column = path, kind, column
        self.start, self.end = start, end
        self.name = str(path)
        self._check()

    def _open(self):
        return gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")

    def _check(self) -> None:
        """Refuse, naming the file, one that is empty, not gzip though named .gz, binary or not
        UTF-8, judged on its first MiB (a bad byte further on is named when it is read)."""
        try:
            with self._open() as f:
                head = f.read(self.SNIFF)
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise DatasetLoadError(f"cannot read {self.path}: {err}") from None
        if not head.strip():
            raise DatasetLoadError(
                f"{self.path} holds no text (it is empty or blank): pass a "
                "file with documents as --dataset"
            )
        if b"\0" in head:
            raise DatasetLoadError(
                f"{self.path} is a binary file, not {self.kind} text "
                f"(a NUL byte at byte {head.index(0)})"
            )
        try:  # incremental: a character cut at the end of the sniffed part is not an error
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise DatasetLoadError(self._not_utf8(err.start)) from None

    def _not_utf8(self, offset: int) -> str:
        return (
            f"{self.path} is not UTF-8 text (an invalid byte at byte {offset}); convert it, "
            "e.g. iconv -f latin1 -t utf-8"
        )

    def read(self, state=None):
        offset = int(state["offset"]) if state else self.start
        with self._open() as f:
            if offset:
                f.seek(offset)  # a gzip file decompresses up to it, reading nothing else
            lines: list[str] = []
            for raw in f:
                if self.end is not None and offset >= self.end:
                    break  # the end of this part: a document starts there
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8").replace("\r\n", "\n")
                except UnicodeDecodeError as err:
                    raise DatasetLoadError(self._not_utf8(start + err.start)) from None
                if self.kind == "jsonl":
                    if line.strip():
                        yield self._record(line, start), {"offset": offset}
                elif line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).strip("\n"), {"offset": offset}
                    lines = []
            if lines:
                yield "".join(lines).strip("\n"), {"offset": offset}

    def _record(self, line: str, start: int) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            message = f"{self.path}: the line at byte {start} is not JSON ({err})"
            raise DatasetLoadError(message) from None
        if not isinstance(record, dict) or self.column not in record:
            raise DatasetLoadError(
                f"{self.path}: the record at byte {start} has no "
                f"{self.column!r} field (pass it with --column)"
            )
        return record[self.column]


class _Rows(TextSource):
    """A parquet file or a saved ``datasets`` directory: rows read in slices; the state is the
    number of rows read."""

    def __init__(self, name: str, num_rows: int, read_rows: Callable[[int, int], list[str]]):
        self.name, self.num_rows, self._read_rows = name, num_rows, read_rows

    def read(self, state=None):
        row = int(state["row"]) if state else 0
        while row < self.num_rows:
            for text in self._read_rows(row, min(row + 1024, self.num_rows)):
                row += 1
                yield text, {"row": row}


def _parquet_rows(path: Path, column: str) -> _Rows:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's errors name a buffer, not the file
        raise DatasetLoadError(f"{path} is not a parquet file ({err})") from None
    if column not in file.schema_arrow.names:
        raise DatasetLoadError(
            f"{path} has no column {column!r} (it has "
            f"{file.schema_arrow.names}); pass it with --column"
        )
    starts = np.cumsum(
        [0] + [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    )

    def read_rows(begin: int, end: int) -> list[str]:  # whole row groups, only those needed
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        last = int(np.searchsorted(starts, end, side="left"))
        table = file.read_row_groups(list(range(first, last)), columns=[column])
        return table.column(0).to_pylist()[begin - starts[first] : end - starts[first]]

    return _Rows(str(path), int(starts[-1]), read_rows)


def _saved_rows(path: Path, split: str, column: str) -> _Rows:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DatasetLoadError(f"{path} has no split {split!r} (it has {list(data)})")
        data = data[split]
    if column not in data.column_names:
        raise DatasetLoadError(
            f"{path} has no column {column!r} (it has {data.column_names}); pass it with --column"
        )
    return _Rows(str(path), len(data), lambda begin, end: data[begin:end][column])


class _HubStream(TextSource):
    """A streamed hub dataset; the state is the streaming dataset's own ``state_dict()``, so a
    resumed run starts at its shard and offset instead of streaming everything before it."""

    def __init__(self, name: str, stream, column: str):
        self.name, self.stream, self.column = name, stream, column
        self.start = stream.state_dict()

    def read(self, state=None):
        self.stream.load_state_dict(state["hub"] if state else self.start)
        for record in self.stream:
            if self.column not in record:
                raise DatasetLoadError(
                    f"{self.name} has no column {self.column!r} (it has "
                    f"{list(record)}); pass it with --column"
                )
            yield record[self.column], {"hub": self.stream.state_dict()}


class IterableSource(TextSource):
    """Documents from ``texts_fn()`` (an iterator from the start each call); resuming skips the
    documents already read, so it reads them again: for small in-memory sources and tests."""

    def __init__(self, texts_fn: Callable[[], Iterator[str]], name: str = "texts"):
        self.texts_fn, self.name = texts_fn, name

    def read(self, state=None):
        skip = int(state["documents"]) if state else 0
        for number, text in enumerate(self.texts_fn(), 1):
            if number > skip:
                yield text, {"documents": number}


# the demo corpus's last tenth of documents is its "test" split: "train" (what gsae-train reads
# by default, cycling with --repeat) never includes it, so gsae-eval always has held-out text
DEMO_HELDOUT = 0.1
DEMO_SPLITS = ("train", "test")


@functools.cache
def _demo_boundary() -> int:
    """The byte offset (in the uncompressed corpus) where the demo's test split begins."""
    corpus = _LineFile(bundled_dir() / "corpus.txt.gz", "txt", "text")
    ends = [int(state["offset"]) for _, state in corpus.read()]
    return ends[len(ends) - math.ceil(len(ends) * DEMO_HELDOUT) - 1]


def demo_texts(split: str = "train") -> TextSource:
    """The bundled demo corpus: ``train`` (its first nine tenths of documents) or ``test``."""
    if split not in DEMO_SPLITS:
        raise DatasetLoadError(
            f"the demo dataset has the splits {' and '.join(DEMO_SPLITS)} (held out), not {split!r}"
        )
    path, boundary = bundled_dir() / "corpus.txt.gz", _demo_boundary()
    if split == "train":
        return _LineFile(path, "txt", "text", end=boundary)
    return _LineFile(path, "txt", "text", start=boundary)


def heldout_split(dataset: str, split: str) -> str | None:
    """The split of ``dataset`` that training on ``split`` never reads, when it has one by
    construction (the demo's test split), else None."""
    return "test" if dataset == "demo" and split == "train" else None


def open_texts(dataset: str, split: str = "train", column: str = "text") -> TextSource:
    """The documents of ``dataset``: a local file or directory, ``demo`` (see
    :func:`demo_texts`), or a hub dataset id (streamed). Opened once here; fails now, with one
    message, if it cannot be."""
    if dataset == "demo":
        return demo_texts(split)
    path = Path(dataset)
    if path.exists():
        return _local_texts(path, split, column)
    tried = [f"no local file or directory {dataset!r}"]
    if not hub_reachable():
        tried.append("the Hugging Face hub is unreachable (offline?)")
        raise DatasetLoadError(load_message("dataset", dataset, tried, "--dataset"))
    try:
        import datasets

        stream = datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as err:
        tried.append(f"the hub could not open {dataset!r} (split {split!r}): {err}")
        raise DatasetLoadError(load_message("dataset", dataset, tried, "--dataset")) from None
    return _HubStream(dataset, stream, column)


def iter_texts(dataset: str, split: str = "train", column: str = "text") -> Iterator[str]:
    """The documents of ``dataset`` from the first (see :func:`open_texts`)."""
    return open_texts(dataset, split, column).texts()


def _local_texts(path: Path, split: str, column: str) -> TextSource:
    suffixes = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if path.is_dir():
        return _saved_rows(path, split, column)
    if suffixes in (".txt", ".txt.gz"):
        return _LineFile(path, "txt", column)
    if suffixes in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        return _LineFile(path, "jsonl", column)
    if suffixes == ".parquet":
        return _parquet_rows(path, column)
    raise DatasetLoadError(
        f"cannot read {path}: expected .txt, .jsonl or .parquet (optionally .gz) "
        "or a saved datasets directory"
    )
