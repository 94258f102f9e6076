"""A run folder: the one place that names its files, reads them and writes them.

gsae-train writes it; gsae-eval, gsae-export, gsae-browse, gsae-autointerp and
:class:`gsae.inference.GroupSAEs` read it. Nothing here imports gsae.train or gsae.eval.

::

    run.json          the settings (written first, once everything was checked)
    groups.json       the groups, as soon as they are known (a measurement is not lost)
    scales.json       each layer's activation scale, as soon as it is estimated
    checkpoint/       the latest checkpoint (gsae/train/checkpoint.py): run_state.json (its
                      manifest, with the data position) + one folder per group SAE;
                      checkpoint.prev/ the one before, checkpoint.new/ one being written
    log.jsonl         one line per --log-every steps
    <group>/          the trained SAEs (sae.safetensors + cfg.json), at the end or on a stop
    summary.json      tokens, time, final FVU, data position; "complete": false when the run
                      stopped early

:class:`RunFolder` reads and writes these files (nothing until asked); :func:`load_run` reads a
finished run into a :class:`FinishedRun` and refuses anything else with a :class:`RunError`
naming the problem.

SAEs trained elsewhere come in too: a folder of EleutherAI sparsify SAEs (one ``<hookpoint>/``
per layer with ``cfg.json`` + ``sae.safetensors``, as sparsify's trainer or ``gsae-export
--format sparsify`` writes them) is read as a run of per-layer SAEs (:func:`load_sparsify_run`),
so that gsae-eval can compare a sparsify-trained baseline with a Group-SAE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .grouping import Grouping
from .hf.tokens import StreamPosition
from .io import temp_origin, write_json
from .sae import Sae

RUN_FILE, GROUPS_FILE, SCALES_FILE = "run.json", "groups.json", "scales.json"
LOG_FILE, SUMMARY_FILE = "log.jsonl", "summary.json"
CHECKPOINT, PREVIOUS_CHECKPOINT, NEW_CHECKPOINT = "checkpoint", "checkpoint.prev", "checkpoint.new"
DAMAGED_CHECKPOINT = "checkpoint.damaged"  # a latest checkpoint set aside for the previous one
OLD_CHECKPOINT = "checkpoint.old"  # the latest one during a swap
CHECKPOINTS = (CHECKPOINT, PREVIOUS_CHECKPOINT, NEW_CHECKPOINT, DAMAGED_CHECKPOINT, OLD_CHECKPOINT)
MANIFEST = "run_state.json"  # a checkpoint's run state
OVERWRITING = ".overwriting"  # the old run's files on their way out (see RunFolder.clear)
SAE_DIR = re.compile(r"layers?_[0-9_-]+(\.old)?")
OWN_NAMES = (
    RUN_FILE,
    GROUPS_FILE,
    SCALES_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    "tensorboard",
    "wandb",
    *CHECKPOINTS,
)
SETTINGS_VERSION = 2  # of run.json's "settings"


class RunError(ValueError):
    """A folder that cannot be used as asked (not a run, an unfinished one, a damaged file);
    the message says why."""


def upgrade_settings(data) -> dict:
    """run.json's "settings" of any version this gsae reads, with what older runs lack."""
    if not isinstance(data, dict) or data.get("version") != SETTINGS_VERSION:
        raise ValueError("settings written by another version of gsae-train")
    data = dict(data)
    data.setdefault("data_shards", 1)  # a run saved before several processes: one shard
    data.setdefault("sae_precision", "fp32")  # ... before --sae-precision: the fp32 it ran
    return data


def settings_flags(data: dict) -> dict:
    """Every setting by its flag's name (``--k`` is ``k``), the SAE's too."""
    data = upgrade_settings(data)
    return {**{k: v for k, v in data.items() if k not in ("version", "sae")}, **data["sae"]}


@dataclass(frozen=True)
class RunData:
    """How a command that reads finished runs (gsae-eval, gsae-browse, gsae-autointerp) streams
    text through their model: the keyword arguments ``data`` of
    :func:`~gsae.browse.collect.collect` and :func:`~gsae.eval.evaluate.prepare`. None: the
    run's own setting (for ``model_dtype``: bf16 on a GPU, fp32 on a CPU)."""

    dataset: str | None = None
    split: str | None = None
    column: str | None = None
    ctx_len: int | None = None
    batch_tokens: int = 8192  # tokens per forward
    device: str = "auto"
    model_dtype: str | None = None


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
class FinishedRun:
    """The SAEs of a finished run and what is known of their training: a gsae-train run
    (:meth:`RunFolder.finished`) or a folder of sparsify SAEs (:func:`load_sparsify_run`)."""

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
            raise RunError(
                f"{self.path}: the model these SAEs were trained on is unknown (no "
                "sparsify config.json): pass --model"
            )
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

    def data_settings(
        self,
        dataset: str | None = None,
        split: str | None = None,
        column: str | None = None,
        ctx_len: int | None = None,
    ) -> tuple[str, str, str, int]:
        """The text the run trained on, as (dataset, split, column, context length), each part
        given here taking the run's place."""
        dataset = dataset or self.arg("dataset")
        split, column = split or self.arg("split", "train"), column or self.arg("column", "text")
        return dataset, split, column, int(ctx_len or self.arg("ctx_len"))

    @property
    def cycled(self) -> bool:
        """Whether training went round its (finite) corpus more than once."""
        return self.position is not None and self.position.epoch > 0


class RunFolder:
    """The files of one run folder; nothing is read or written until asked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- what is there

    def has_checkpoint(self) -> bool:
        return any(self.file(n).exists() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT, NEW_CHECKPOINT))

    def holds_run(self) -> bool:
        return self.file(RUN_FILE).exists() or self.has_checkpoint()

    def own_entries(self) -> list[Path]:
        """The files and folders a run writes (never other files a user put there)."""
        if not self.path.is_dir():
            return []
        own = []
        for p in self.path.iterdir():
            name = temp_origin(p.name) or p.name  # an interrupted write's leftovers too
            if name in OWN_NAMES or SAE_DIR.fullmatch(name):
                own.append(p)
        return sorted(own)

    # ---- settings, groups, scales

    def read_settings(self) -> dict:
        """run.json's settings (:meth:`gsae.train.RunSettings.read` makes them typed)."""
        path = self.file(RUN_FILE)
        if not path.exists():
            raise RunError(f"{self.path}: no gsae-train run there ({path} is missing)")
        try:
            return upgrade_settings(json.loads(path.read_text())["settings"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise self.unreadable_settings(err) from None

    def unreadable_settings(self, err: Exception) -> RunError:
        return RunError(
            f"{self.file(RUN_FILE)} cannot be read ({err}); it was not written by this "
            "version of gsae-train: start a new run (--overwrite)"
        )

    def write_settings(self, settings: dict, extra: dict | None = None) -> None:
        write_json(self.file(RUN_FILE), {"settings": settings, **(extra or {})})

    def read_groups(self) -> Grouping | None:
        path = self.file(GROUPS_FILE)
        return Grouping.load(path) if path.exists() else None

    def write_groups(self, grouping: Grouping) -> None:
        grouping.save(self.file(GROUPS_FILE))

    def read_scales(self) -> dict[int, float] | None:
        path = self.file(SCALES_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return {int(layer): float(s) for layer, s in data["scales"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise RunError(
                f"{path} is corrupted ({err}); delete it to estimate the scales again"
            ) from None

    def write_scales(self, scales: dict[int, float], mode: str, tokens: int) -> None:
        data = {"mode": mode, "tokens": tokens, "scales": {str(k): v for k, v in scales.items()}}
        write_json(self.file(SCALES_FILE), data)

    # ---- a finished (or stopped) run

    def read_summary(self) -> dict | None:
        path = self.file(SUMMARY_FILE)
        return json.loads(path.read_text()) if path.exists() else None

    def load_saes(self, device="cpu") -> dict[str, Sae]:
        """The trained SAEs by group name (the final ones: written at the end or on a stop)."""
        summary = self.read_summary()
        if summary is None:
            raise RunError(f"{self.path}: no SAEs written yet (no {SUMMARY_FILE})")
        return {name: Sae.load(self.path / name, device=device) for name in summary["groups"]}

    def position(self, summary: dict | None = None) -> StreamPosition | None:
        """Where the training data stopped: the text after it was not trained on (unless the
        run cycled its data, see ``summary["final_fvu"]["held_out"]``). From ``summary.json``,
        else (a run whose summary does not record it) from the checkpoint's run state, from
        ``checkpoint.old`` when a swap was cut off (nothing is renamed: a reader never changes
        a run folder); None when neither says."""
        summary = self.read_summary() if summary is None else summary
        position = (summary or {}).get("position")
        if position:
            return StreamPosition.from_dict(position)
        for folder in (CHECKPOINT, OLD_CHECKPOINT):
            path = self.file(folder) / MANIFEST
            if path.exists():
                position = _read_json(path, "run state").get("position")
                return StreamPosition.from_dict(position) if position else None
        return None

    def finished(self) -> FinishedRun:
        """The finished gsae-train run here (no weights are loaded: see ``SaeEntry.load``).

        Raises :class:`RunError` for a folder that is not one (no ``run.json``), an unfinished
        run (no ``summary.json``) or a missing or inconsistent SAE folder."""
        path = self.path
        if not self.file(RUN_FILE).exists():
            raise RunError(f"{path} is not a gsae-train output folder (no {RUN_FILE})")
        args = _run_args(self.file(RUN_FILE))
        if not self.file(SUMMARY_FILE).exists():
            raise RunError(
                f"{path} holds an unfinished gsae-train run (no {SUMMARY_FILE}): finish it "
                f"with gsae-train --resume {path}"
            )
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
        if self.file(GROUPS_FILE).exists():
            try:
                grouping = Grouping.load(self.file(GROUPS_FILE))
            except (ValueError, KeyError, TypeError) as err:
                raise RunError(f"{self.file(GROUPS_FILE)}: {err}") from None
        position = self.position(summary)
        return FinishedRun(path, path.resolve().name, args, saes, grouping, summary, position)

    # ---- replacing a run

    def clear(self) -> None:
        """Remove the run in this folder, leaving other files alone. ``run.json`` goes first,
        all at once, so an interruption leaves no resumable half of the old run; the rest is
        moved into one folder and deleted. :meth:`finish_clearing` completes a cut-off one."""
        if not self.path.is_dir():
            return  # nothing to clear: --overwrite of a folder not made yet
        trash = self.file(OVERWRITING)
        trash.mkdir(exist_ok=True)
        entries = self.own_entries()
        entries.sort(key=lambda p: p.name != RUN_FILE)  # run.json first
        for entry in entries:
            os.replace(entry, trash / entry.name)
        shutil.rmtree(trash)

    def finish_clearing(self) -> None:
        if self.file(OVERWRITING).exists():
            self.clear()


def load_run(run_dir: str | Path) -> FinishedRun:
    """A finished gsae-train run (:meth:`RunFolder.finished`) or a folder of sparsify SAEs
    (:func:`load_sparsify_run`); a :class:`RunError` for anything else."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{path}: no such directory (expected a gsae-train output folder)")
    if not (path / RUN_FILE).exists():
        foreign = load_sparsify_run(path)
        if foreign is not None:
            return foreign
        raise RunError(
            f"{path} is not a gsae-train output folder (no {RUN_FILE}) nor a folder "
            "of sparsify SAEs"
        )
    return RunFolder(path).finished()


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON ({err}): not a gsae-train output") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a {what} (expected a JSON object)")
    return data


def _run_args(path: Path) -> dict:
    """Every setting of the run by its flag's name: ``run.json`` holds ``{"settings": ...}``
    (:class:`gsae.train.RunSettings`), or ``{"args": ...}`` in runs of earlier versions."""
    run = _read_json(path, "gsae-train run")
    if isinstance(run.get("settings"), dict):
        try:
            args = settings_flags(run["settings"])
        except (KeyError, TypeError, ValueError) as err:
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


def load_sparsify_run(path: Path) -> FinishedRun | None:
    """A folder of sparsify SAEs as a run of per-layer SAEs, or None if it holds none.

    Each ``<hookpoint>/`` (``layers.5``, ``h.5``, ...) with a sparsify ``cfg.json`` (``d_in``)
    covers the layer its name ends with. The model, dataset, split, column and context come from
    sparsify's ``config.json`` (its trainer's) or gsae-export's ``gsae_export.json``; without
    either the model must be given (gsae-eval ``--model``). The data these SAEs were trained on
    is unknown: gsae-eval asks for ``--allow-overlap`` or other text."""
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
            raise RunError(
                f"{folder}: a sparsify SAE whose hookpoint names no layer (expected a "
                "name ending in the layer number, e.g. layers.5)"
            )
        d = int(cfg["d_in"])
        m = int(cfg.get("num_latents") or 0) or d * int(cfg.get("expansion_factor", 32))
        entries.append(
            SaeEntry(
                folder.name, folder, [int(digits.group(1))], d, m, int(cfg.get("k", 32)), "sparsify"
            )
        )
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
        args.update(
            model=config.get("model"),
            dataset=config.get("dataset"),
            split=config.get("split", "train"),
            column=config.get("text_column", "text"),
            ctx_len=config.get("ctx_len"),
        )
    if (path / "gsae_export.json").exists():  # gsae-export's manifest
        manifest = _read_json(path / "gsae_export.json", "gsae-export manifest")
        args.update(
            {k: manifest.get(k) for k in ("model", "dataset", "split", "column", "ctx_len")}
        )
        if manifest.get("num_model_layers"):
            extra["num_model_layers"] = int(manifest["num_model_layers"])
    args = {k: v for k, v in args.items() if v is not None}
    entries.sort(key=lambda e: e.layers[0])
    return FinishedRun(path, path.resolve().name, args, entries, None, {}, None, extra)


def _sae_entry(run_dir: Path, name: str, info) -> SaeEntry:
    folder = run_dir / name
    if not (folder / "cfg.json").exists() or not (folder / "sae.safetensors").exists():
        raise RunError(
            f"{run_dir}: the SAE {name!r} listed in {SUMMARY_FILE} is missing "
            f"(expected {folder}/cfg.json and sae.safetensors)"
        )
    cfg = _read_json(folder / "cfg.json", "SAE config")
    layers = [int(x) for x in cfg.get("layers", [])]
    listed = [int(x) for x in (info or {}).get("layers", layers)]
    if not layers or layers != listed:
        raise RunError(f"{folder}/cfg.json covers layers {layers}, {SUMMARY_FILE} says {listed}")
    d = int(cfg["d"])
    m = int(cfg["num_latents"]) if cfg.get("num_latents") else d * int(cfg["expansion_factor"])
    return SaeEntry(name, folder, layers, d, m, int(cfg["k"]))
