"""Whether runs can be evaluated together, and where held-out text begins.

:func:`check_runs` and :func:`check_model` refuse runs that cannot be compared (of different
models, depths or widths) with a :class:`~gsae.run.RunError` naming the problem;
:func:`heldout_start` turns the runs' data positions into where held-out text begins. Reading a
run folder is :mod:`gsae.run`'s (:func:`~gsae.run.load_run`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..hf.hub import bundled_dir
from ..hf.texts import TextSource, open_texts
from ..hf.tokens import StreamPosition, next_document
from ..run import FinishedRun, RunError

# --------------------------------------------------------------------------------------------
# Consistency between runs, and held-out text
# --------------------------------------------------------------------------------------------


def same_text(a: str, b: str) -> bool:
    """Whether two dataset names read the same text: :func:`same_name`, or two spellings of one
    local file (a link to it, a copy of it: the same size and the same first and last MiB)."""
    if same_name(a, b):
        return True
    first, second = Path(a), Path(b)
    if not (first.is_file() and second.is_file()):
        return False
    return os.path.samefile(first, second) or _fingerprint(first) == _fingerprint(second)


def _fingerprint(path: Path, edge: int = 1 << 20) -> tuple[int, str]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        f.seek(max(0, size - edge))
        digest.update(f.read(edge))
    return size, digest.hexdigest()


def same_name(a: str, b: str) -> bool:
    """Whether two model or dataset names mean the same thing (``demo`` is the bundled one; a
    local path is compared resolved, a hub id as written)."""
    return _canonical(a) == _canonical(b)


def _canonical(name: str) -> str:
    if name == "demo":
        return "demo"
    path = Path(name)
    if path.exists():
        resolved = path.resolve()
        demo = bundled_dir().resolve()
        if resolved in (demo / "model", demo / "corpus.txt.gz"):
            return "demo"
        return str(resolved)
    return name


def check_runs(
    runs: list[FinishedRun], baseline: FinishedRun | None, model: str | None = None
) -> None:
    """Refuse runs of different models or depths, and a baseline that is not a per-layer run
    of the same model. ``model``: the model to evaluate with, when it overrides the runs'."""
    everything = runs + ([baseline] if baseline is not None else [])
    if model is None:
        named = [r for r in everything if r.args.get("model")]  # a sparsify folder may not say
        names = {_canonical(r.model) for r in named}
        if len(names) > 1:
            listing = ", ".join(f"{r.name}: {r.model}" for r in named)
            role = "the baseline and the runs are" if baseline is not None else "the runs are"
            raise RunError(
                f"{role} of different models ({listing}); evaluate one model at a time "
                "(or pass --model to evaluate them all with one)"
            )
    known = [r for r in everything if not r.foreign or "num_model_layers" in r.extra]
    depths = {r.num_model_layers for r in known}
    if len(depths) > 1:
        listing = ", ".join(f"{r.name}: {r.num_model_layers}" for r in known)
        raise RunError(f"the runs were trained on models of different depths ({listing} layers)")
    widths = {r.saes[0].d for r in everything}
    if len(widths) > 1:
        listing = ", ".join(f"{r.name}: d={r.saes[0].d}" for r in everything)
        raise RunError(f"the runs' SAEs have different widths ({listing})")
    if baseline is not None and not baseline.per_layer:
        raise RunError(
            f"--baseline {baseline.path} is not a per-layer run (its SAEs cover "
            f"{[s.layers for s in baseline.saes]}); train one with gsae-train "
            "--groups per-layer"
        )


def check_model(runs: list[FinishedRun], num_layers: int, d_model: int, model: str) -> None:
    """Refuse runs whose SAEs cover layers ``model`` lacks, or of another width."""
    for run in runs:
        bad = [layer for layer in run.layers if layer >= num_layers]
        if bad:
            raise RunError(
                f"run {run.path} has SAEs for layers {bad}, but {model} has "
                f"{num_layers} layers (0..{num_layers - 1})"
            )
        depth_known = not run.foreign or "num_model_layers" in run.extra
        if depth_known and run.num_model_layers != num_layers:
            raise RunError(
                f"run {run.path} was trained on a model with {run.num_model_layers} "
                f"layers; {model} has {num_layers}"
            )
        if run.saes[0].d != d_model:
            raise RunError(
                f"run {run.path} has SAEs of width d={run.saes[0].d}; {model} has d={d_model}"
            )


def split_selects(dataset: str) -> bool:
    """Whether ``--split`` picks different text of ``dataset``: it does for a hub dataset and
    a saved ``DatasetDict`` and ``demo``; a local text, JSONL or parquet file has one text
    whatever the split (:func:`gsae.activations.iter_texts` ignores it)."""
    if dataset == "demo":
        return True  # its train and test (held-out) parts
    path = Path(dataset)
    if path.is_dir():
        return (path / "dataset_dict.json").exists()
    return not path.exists()


def column_selects(dataset: str) -> bool:
    """Whether ``--column`` picks different text of ``dataset``: not for a ``.txt`` file (nor
    ``demo``), whose documents are its paragraphs whatever the column."""
    if dataset == "demo":
        return False
    return not (Path(dataset).is_file() and dataset.lower().removesuffix(".gz").endswith(".txt"))


class HeldOut(ValueError):
    """Held-out text cannot be guaranteed; the message says why and what to pass."""


def heldout_start(
    runs: list[FinishedRun],
    dataset: str,
    split: str,
    column: str,
    allow_overlap: bool = False,
    texts: TextSource | None = None,
) -> tuple[StreamPosition, list[str]]:
    """Where evaluation text starts so that no run trained on it, and notes saying so.

    A run trained on the same text (the same dataset however its path is spelled, see
    :func:`same_text`; the same split and column where they select text, see
    :func:`split_selects` and :func:`column_selects`) was fed the text up to its final data
    position: evaluation starts at the first document after the furthest such position, so that
    no evaluated document was even partly trained on (a document's end is much like its start).
    Other text starts at the beginning. ``texts``: the evaluation text, opened (else it is
    opened here).
    Raises :class:`HeldOut` when a run's position is unknown or it went round its corpus
    (``--repeat``), unless ``allow_overlap``.
    """
    notes: list[str] = []
    mine = [run for run in runs if same_text(run.arg("dataset", ""), dataset)]
    trained = {run.arg("split", "train") for run in mine}
    if trained - {split} and not split_selects(dataset):
        splits = ", ".join(sorted(trained))
        notes.append(
            f"--split {split}: {dataset!r} is a local file with one text whatever the "
            f"split, the one the runs trained on ({splits})"
        )
    columns = {run.arg("column", "text") for run in mine}
    if columns - {column} and not column_selects(dataset):
        notes.append(
            f"--column {column}: {dataset!r} is a text file whose documents are its "
            f"paragraphs whatever the column, the text the runs trained on"
        )
    start = StreamPosition()
    for run in mine:
        same_split = run.arg("split", "train") == split or not split_selects(dataset)
        same_column = run.arg("column", "text") == column or not column_selects(dataset)
        if not (same_split and same_column):
            continue
        problem = None
        if run.position is None:
            problem = (
                f"run {run.name} does not record its final data position, so the text "
                "it trained on is unknown"
            )
        elif run.cycled:
            problem = (
                f"run {run.name} went round its corpus {run.position.epoch + 1} times "
                "(--repeat): every document of it was trained on"
            )
        if problem:
            if not allow_overlap:
                raise HeldOut(
                    f"cannot guarantee held-out text on {dataset!r}: {problem}. Pass "
                    "another --dataset or --split, or --allow-overlap to evaluate on "
                    "text the SAEs may have seen"
                )
            notes.append(f"--allow-overlap: {problem}; the evaluation text may overlap it")
            continue
        here = run.position
        if (here.documents, here.offset) > (start.documents, start.offset):
            start = StreamPosition(0, here.documents, here.source, here.offset)
    if start.documents or start.offset:
        texts = texts if texts is not None else open_texts(dataset, split, column)
        start = next_document(texts, start)
        notes.append(
            f"held-out text: {dataset!r} from document {start.documents + 1} on (the "
            "runs trained on the documents before it)"
        )
    return start, notes
