"""What gsae-eval reads of a ``gsae-train`` output folder, in one place.

A run folder holds ``run.json`` (the resolved flags), ``groups.json``, one folder per group SAE
(``<group>/sae.safetensors`` + ``cfg.json``), ``summary.json`` and ``checkpoint/`` (whose run
state records the data position after the last trained batch). :func:`load_run` reads all of it
into a :class:`RunInfo` and refuses anything else with a :class:`RunError` naming the problem;
:func:`heldout_start` turns the runs' data positions into where held-out text begins.

Everything that depends on the trainer's file layout lives here, so that a change of layout (the
checkpoint's run state as JSON instead of a pickle, say) is one edit.

SAEs trained elsewhere come in too: a folder of EleutherAI sparsify SAEs (one ``<hookpoint>/``
per layer with ``cfg.json`` + ``sae.safetensors``, as sparsify's trainer or ``gsae-export
--format sparsify`` writes them) is read as a run of per-layer SAEs (:func:`load_sparsify_run`),
so that gsae-eval can compare a sparsify-trained baseline with a Group-SAE.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..grouping import Grouping
from ..hf.hub import bundled_dir
from ..hf.texts import TextSource, open_texts
from ..hf.tokens import StreamPosition, next_document
from ..sae import Sae

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT = "checkpoint"
RUN_STATE_FILES = ("run_state.json", "run_state.pt")  # newest layout first


class RunError(ValueError):
    """A folder that gsae-eval cannot evaluate; the message says why."""


@dataclass
class SaeEntry:
    """One SAE of a run: its folder, the model layers it covers and its size."""

    name: str
    path: Path
    layers: list[int]
    d: int
    m: int
    k: int
    format: str = "gsae"  # or "sparsify"

    def load(self, device="cpu") -> Sae:
        if self.format == "sparsify":
            return Sae.from_sparsify(self.path, self.layers[0], device=device)
        return Sae.load(self.path, device=device)


@dataclass
class RunInfo:
    """A finished gsae-train run, as gsae-eval needs it."""

    path: Path
    name: str
    args: dict  # run.json "args": every flag as the run resolved it
    saes: list[SaeEntry]
    grouping: Grouping | None
    summary: dict
    position: StreamPosition | None  # data position after the last trained batch (None: unknown)
    extra: dict = field(default_factory=dict)

    # ---- the run's settings

    def arg(self, key: str, default=None):
        return self.args.get(key, default)

    @property
    def model(self) -> str:
        if not self.args.get("model"):
            raise RunError(f"{self.path}: the model these SAEs were trained on is unknown (no "
                           "sparsify config.json): pass --model")  # fmt: skip
        return str(self.args["model"])

    @property
    def foreign(self) -> bool:
        """SAEs trained elsewhere (a sparsify folder): no gsae-train records."""
        return self.saes[0].format != "gsae"

    @property
    def groups_spec(self) -> str:
        return "file" if self.arg("groups_file") else str(self.arg("groups", "auto"))

    @property
    def expansion_factor(self) -> float:
        return self.saes[0].m / self.saes[0].d

    @property
    def k(self) -> int:
        return self.saes[0].k

    @property
    def tokens_trained(self) -> int:
        return int(self.summary.get("tokens", 0))

    # ---- layers

    @property
    def layers(self) -> list[int]:
        """Every model layer an SAE of this run covers, in order."""
        return sorted(layer for sae in self.saes for layer in sae.layers)

    @property
    def num_model_layers(self) -> int:
        """The depth of the model it was trained on: gsae-train covers every layer, the last
        one included, so the deepest covered layer is the model's last."""
        recorded = self.grouping.extra.get("num_model_layers") if self.grouping else None
        recorded = recorded if recorded is not None else self.extra.get("num_model_layers")
        return int(recorded) if recorded is not None else max(self.layers) + 1

    @property
    def grouped_layers(self) -> list[int]:
        """The layers that were grouped (all but the last unless ``--include-last``)."""
        if self.grouping is not None:
            return list(self.grouping.layers)
        return [layer for layer in self.layers if layer != self.num_model_layers - 1]

    @property
    def num_groups(self) -> int:
        """G: SAEs over the grouped layers (the last layer's own SAE is not counted)."""
        grouped = set(self.grouped_layers)
        return sum(1 for sae in self.saes if set(sae.layers) <= grouped)

    @property
    def per_layer(self) -> bool:
        return all(len(sae.layers) == 1 for sae in self.saes)

    def sae_for(self, layer: int) -> SaeEntry:
        for sae in self.saes:
            if layer in sae.layers:
                return sae
        raise KeyError(f"run {self.name} has no SAE for layer {layer}")

    def labels(self) -> list[int]:
        """Group label of each grouped layer (0..G-1 in order of first layer), for AMAD."""
        first: dict[str, int] = {}
        return [first.setdefault(self.sae_for(x).name, len(first)) for x in self.grouped_layers]

    # ---- training data

    @property
    def cycled(self) -> bool:
        """Whether training went round its (finite) corpus more than once."""
        return self.position is not None and self.position.epoch > 0


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON ({err}): not a gsae-train output") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a {what} (expected a JSON object)")
    return data


def read_position(run_dir: Path) -> StreamPosition | None:
    """The data position saved with the run's final checkpoint (for runs whose summary does
    not record it), or None when there is none.

    Reads ``checkpoint/run_state.json`` (key ``position``) or the older pickled
    ``run_state.pt``, from ``checkpoint.old`` when a swap was cut off (nothing is renamed: an
    evaluation never changes a run folder)."""
    for folder in (run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")):
        for name in RUN_STATE_FILES:
            path = folder / name
            if not path.exists():
                continue
            if path.suffix == ".json":
                state = _read_json(path, "run state")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            position = state.get("position")
            return StreamPosition.from_dict(position) if position else None
    return None


def load_run(run_dir: str | Path) -> RunInfo:
    """Read a finished gsae-train output folder (no weights are loaded: see ``SaeEntry.load``).

    Raises :class:`RunError` for a folder that is not one (no ``run.json``), an unfinished run
    (no ``summary.json``) or a missing or inconsistent SAE folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{path}: no such directory (expected a gsae-train output folder)")
    if not (path / RUN_FILE).exists():
        foreign = load_sparsify_run(path)
        if foreign is not None:
            return foreign
        raise RunError(f"{path} is not a gsae-train output folder (no {RUN_FILE}) nor a folder "
                       "of sparsify SAEs")  # fmt: skip
    args = _run_args(path / RUN_FILE)
    if not (path / SUMMARY_FILE).exists():
        raise RunError(f"{path} holds an unfinished gsae-train run (no {SUMMARY_FILE}): finish it "
                       f"with gsae-train --resume {path}")  # fmt: skip
    summary = _read_json(path / SUMMARY_FILE, "gsae-train summary")
    groups = summary.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise RunError(f"{path / SUMMARY_FILE} lists no SAEs (no 'groups')")
    saes = [_sae_entry(path, name, info) for name, info in groups.items()]
    covered = [layer for sae in saes for layer in sae.layers]
    if len(set(covered)) != len(covered):
        raise RunError(f"{path}: two SAEs cover the same layer ({sorted(covered)})")
    widths = {sae.d for sae in saes}
    if len(widths) != 1:
        raise RunError(f"{path}: SAEs of different widths d {sorted(widths)}")
    grouping = None
    if (path / "groups.json").exists():
        try:
            grouping = Grouping.load(path / "groups.json")
        except (ValueError, KeyError, TypeError) as err:
            raise RunError(f"{path / 'groups.json'}: {err}") from None
    position = summary.get("position")
    position = StreamPosition.from_dict(position) if position else read_position(path)
    return RunInfo(path, path.resolve().name, args, saes, grouping, summary, position)


def _run_args(path: Path) -> dict:
    """Every setting of the run by its flag's name: ``run.json`` holds ``{"settings": ...}``
    (:class:`gsae.train.RunSettings`), or ``{"args": ...}`` in runs of earlier versions."""
    from ..train.settings import RunSettings

    run = _read_json(path, "gsae-train run")
    if isinstance(run.get("settings"), dict):
        try:
            args = RunSettings.from_json(run["settings"]).flags()
        except (TypeError, ValueError) as err:
            raise RunError(f"{path}: {err}") from None
    elif not isinstance(run.get("args"), dict) or "model" not in run["args"]:
        raise RunError(f"{path} is not a gsae-train run file (no settings)")
    else:
        args = run["args"]
    for key, fits in (("model", _model_dir), ("dataset", _dataset_path)):
        if isinstance(args.get(key), str):
            args[key] = _located(args[key], path.parent, fits)
    return args


def _located(name: str, run_dir: Path, fits) -> str:
    """A local path of a run that recorded it relative to where it was started (gsae-train
    now records absolute paths): as given when it exists from here or is no relative path,
    else found beside a folder above the run (``data/x.txt`` of ``proj/out/run`` is
    ``proj/data/x.txt``), never inside the run itself."""
    path = Path(name)
    if name == "demo" or path.is_absolute() or path.exists():
        return name
    run_dir = run_dir.resolve()
    for above in run_dir.parents:
        candidate = above / path
        if fits(candidate) and run_dir not in (candidate, *candidate.parents):
            return str(candidate)
    return name


def _model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _dataset_path(path: Path) -> bool:
    return (
        path.is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "dataset_info.json").is_file()
    )


def load_sparsify_run(path: Path) -> RunInfo | None:
    """A folder of sparsify SAEs as a run of per-layer SAEs, or None if it holds none.

    Each ``<hookpoint>/`` (``layers.5``, ``h.5``, ...) with a sparsify ``cfg.json`` (``d_in``)
    covers the layer its name ends with. The model, dataset, split, column and context come from
    sparsify's ``config.json`` (its trainer's) or gsae-export's ``gsae_export.json``; without
    either the model must be given (gsae-eval ``--model``). The data these SAEs were trained on
    is unknown: gsae-eval asks for ``--allow-overlap`` or other text."""
    import re

    entries = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        cfg_file = folder / "cfg.json"
        if not cfg_file.exists() or not (folder / "sae.safetensors").exists():
            continue
        cfg = _read_json(cfg_file, "sparsify config")
        if "d_in" not in cfg:
            continue
        digits = re.search(r"(\d+)$", folder.name)
        if digits is None:
            raise RunError(f"{folder}: a sparsify SAE whose hookpoint names no layer (expected a "
                           "name ending in the layer number, e.g. layers.5)")  # fmt: skip
        d = int(cfg["d_in"])
        m = int(cfg.get("num_latents") or 0) or d * int(cfg.get("expansion_factor", 32))
        entries.append(SaeEntry(folder.name, folder, [int(digits.group(1))], d, m,
                                int(cfg.get("k", 32)), "sparsify"))  # fmt: skip
    if not entries:
        return None
    layers = [e.layers[0] for e in entries]
    if len(set(layers)) != len(layers):
        raise RunError(f"{path}: two sparsify SAEs cover the same layer ({sorted(layers)})")
    widths = sorted({e.d for e in entries})
    if len(widths) != 1:
        raise RunError(f"{path}: sparsify SAEs of different widths d {widths}")
    args, extra = {"groups": "per-layer"}, {"format": "sparsify"}
    if (path / "config.json").exists():  # sparsify's trainer: its RunConfig
        config = _read_json(path / "config.json", "sparsify run config")
        args.update(model=config.get("model"), dataset=config.get("dataset"),
                    split=config.get("split", "train"), column=config.get("text_column", "text"),
                    ctx_len=config.get("ctx_len"))  # fmt: skip
    if (path / "gsae_export.json").exists():  # gsae-export's manifest
        manifest = _read_json(path / "gsae_export.json", "gsae-export manifest")
        args.update({k: manifest.get(k) for k in ("model", "dataset", "split", "column",
                                                    "ctx_len")})  # fmt: skip
        if manifest.get("num_model_layers"):
            extra["num_model_layers"] = int(manifest["num_model_layers"])
    args = {k: v for k, v in args.items() if v is not None}
    entries.sort(key=lambda e: e.layers[0])
    return RunInfo(path, path.resolve().name, args, entries, None, {}, None, extra)


def _sae_entry(run_dir: Path, name: str, info) -> SaeEntry:
    folder = run_dir / name
    if not (folder / "cfg.json").exists() or not (folder / "sae.safetensors").exists():
        raise RunError(f"{run_dir}: the SAE {name!r} listed in {SUMMARY_FILE} is missing "
                       f"(expected {folder}/cfg.json and sae.safetensors)")  # fmt: skip
    cfg = _read_json(folder / "cfg.json", "SAE config")
    layers = [int(x) for x in cfg.get("layers", [])]
    listed = [int(x) for x in (info or {}).get("layers", layers)]
    if not layers or layers != listed:
        raise RunError(f"{folder}/cfg.json covers layers {layers}, {SUMMARY_FILE} says {listed}")
    d = int(cfg["d"])
    m = int(cfg["num_latents"]) if cfg.get("num_latents") else d * int(cfg["expansion_factor"])
    return SaeEntry(name, folder, layers, d, m, int(cfg["k"]))


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


def check_runs(runs: list[RunInfo], baseline: RunInfo | None, model: str | None = None) -> None:
    """Refuse runs of different models or depths, and a baseline that is not a per-layer run
    of the same model. ``model``: the model to evaluate with, when it overrides the runs'."""
    everything = runs + ([baseline] if baseline is not None else [])
    if model is None:
        named = [r for r in everything if r.args.get("model")]  # a sparsify folder may not say
        names = {_canonical(r.model) for r in named}
        if len(names) > 1:
            listing = ", ".join(f"{r.name}: {r.model}" for r in named)
            role = "the baseline and the runs are" if baseline is not None else "the runs are"
            raise RunError(f"{role} of different models ({listing}); evaluate one model at a time "
                           "(or pass --model to evaluate them all with one)")  # fmt: skip
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
        raise RunError(f"--baseline {baseline.path} is not a per-layer run (its SAEs cover "
                       f"{[s.layers for s in baseline.saes]}); train one with gsae-train "
                       "--groups per-layer")  # fmt: skip


def check_model(runs: list[RunInfo], num_layers: int, d_model: int, model: str) -> None:
    """Refuse runs whose SAEs cover layers ``model`` lacks, or of another width."""
    for run in runs:
        bad = [layer for layer in run.layers if layer >= num_layers]
        if bad:
            raise RunError(f"run {run.path} has SAEs for layers {bad}, but {model} has "
                           f"{num_layers} layers (0..{num_layers - 1})")  # fmt: skip
        depth_known = not run.foreign or "num_model_layers" in run.extra
        if depth_known and run.num_model_layers != num_layers:
            raise RunError(f"run {run.path} was trained on a model with {run.num_model_layers} "
                           f"layers; {model} has {num_layers}")  # fmt: skip
        if run.saes[0].d != d_model:
            raise RunError(f"run {run.path} has SAEs of width d={run.saes[0].d}; {model} has "
                           f"d={d_model}")  # fmt: skip


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


def heldout_start(runs: list[RunInfo], dataset: str, split: str, column: str,
                  allow_overlap: bool = False,
                  texts: TextSource | None = None) -> tuple[StreamPosition, list[str]]:  # fmt: skip
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
        notes.append(f"--split {split}: {dataset!r} is a local file with one text whatever the "
                     f"split, the one the runs trained on ({splits})")  # fmt: skip
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
            problem = (f"run {run.name} does not record its final data position, so the text "
                       "it trained on is unknown")  # fmt: skip
        elif run.cycled:
            problem = (f"run {run.name} went round its corpus {run.position.epoch + 1} times "
                       "(--repeat): every document of it was trained on")  # fmt: skip
        if problem:
            if not allow_overlap:
                raise HeldOut(f"cannot guarantee held-out text on {dataset!r}: {problem}. Pass "
                              "another --dataset or --split, or --allow-overlap to evaluate on "
                              "text the SAEs may have seen")  # fmt: skip
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
