"""What a gsae-train run is: its settings, as ``run.json`` records them, and each group's
:class:`~gsae.sae.SaeConfig`.

The fields are declared once: gsae-train's flags are generated from the
:func:`~gsae.options.option` fields of :class:`RunSettings` and :class:`~gsae.sae.SaeSettings`
(``ctx_len`` is ``--ctx-len``); the fields without a flag are research settings that
``gsae-train --config`` or the Python API sets. ``sae`` is the run's SaeSettings (SaeConfig but
``d``, which comes from the model): a new SaeSettings field needs no change here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..grouping import DEFAULT_THRESHOLD, check_threshold
from ..hf.hub import local_name
from ..hf.models import DEFAULT_CTX_LEN
from ..hf.texts import DEFAULT_DATASET
from ..options import counts, option, type_names
from ..run import SETTINGS_VERSION, RunFolder, settings_flags, upgrade_settings
from ..sae import SaeConfig, SaeSettings, legacy_fields
from ..units import parse_count
from .step import SAE_PRECISIONS

# what --resume may change: nothing that alters what is trained or how (the data order, the
# model's numerics, the SAEs); --tokens extends or shortens the run, --repeat lets a finished
# dataset cycle, --device moves it (CPU and GPU round differently: weights then differ in the
# last bits), the rest only decides what is logged and when
RESUMABLE = (
    "tokens",
    "repeat",
    "device",
    "save_every",
    "log_every",
    "wandb",
    "tensorboard",
    "distribute_saes",
    "dist_timeout",
    "check_replicas",
)
# --recipe NAME: the settings (by flag name) a recipe gives unless their flag is given. "default"
# is gsae's own (SaeConfig's defaults: the tuned optimiser and init, benchmarks/bench_quality.py);
# "paper" is the paper's Table 1 setting: Adam at 2e-4 / sqrt(m / 2^14), W_enc = W_dec^T, b_dec 0,
# an fp32 model, so that runs of the paper's setting reproduce its figures
RECIPES = {
    "default": {},
    "paper": {
        "optimizer": "adam",
        "lr": None,
        "init_encoder": "paper",
        "init_b_dec": "zeros",
        "model_dtype": "fp32",
        "sae_precision": "fp32",  # the encoder's matmul in IEEE fp32, as the paper trained
        "warmup_tokens": 0,  # every step the whole batch
    },
}
# several processes: where the SAEs live, the collectives' timeout and a debugging check change
# nothing that is computed (placements agree to float rounding); --data-shards fixes the batches


def sae_seed(seed: int, layers) -> int:
    """The init seed of the SAE of ``layers`` in a run seeded ``seed``: SAEs of different layer
    sets start from different random decoders, so that one of a Group-SAE run and one of a
    per-layer run are not alike merely by their init (MMCS between runs would measure that)."""
    return zlib.crc32(f"{seed}:{sorted(int(x) for x in layers)}".encode()) & 0x7FFFFFFF


# --save-every as a time: lowercase m is minutes (the count suffixes of parse_count are k, M, B)
TIME_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|sec|min|m|h)\s*$")


def parse_save_every(value: int | str) -> int | str:
    """``--save-every``: a token count (``100M``, ``500k``, ``1e6``; returned as an int) or a
    time (``30s``, ``15m`` or ``15min``, ``1h``; returned as given, stripped). Zero, negative
    and unreadable values raise ValueError with one line."""
    if isinstance(value, str) and _TIME.match(value):
        if save_interval(value)[1] <= 0:
            raise ValueError(f"--save-every {value}: the interval must be more than 0")
        return value.strip()
    try:
        tokens = parse_count(value)
    except ValueError:
        raise ValueError(
            f"--save-every {value}: not a token count (100M, 500k) or a time (30s, 15m, 1h)"
        ) from None
    if tokens <= 0:
        raise ValueError(f"--save-every {value}: the interval must be more than 0")
    return tokens


def save_interval(value: int | str) -> tuple[int | None, float | None]:
    """``(tokens, seconds)`` of a parsed ``--save-every``: one of the two is None."""
    if isinstance(value, int):
        return value, None
    number, unit = _TIME.match(value).groups()
    seconds = float(number) * TIME_UNITS[unit]
    return None, (seconds if math.isfinite(seconds) else math.inf)


def sae_settings(data: dict) -> dict:
    """A run's stored SaeSettings fields, completed for a run saved before a field existed."""
    old = "average_power" not in data
    if old and data.get("optimizer") == "signum" and data.get("lr") is None:
        raise ValueError(
            "signum at sparsify's learning rate, saved before --average-power existed: its "
            "learning rate depends on the model's width; give --lr to a new run"
        )
    data = legacy_fields({**data, "d": 0})  # d: not used by the upgrade of these fields
    data.pop("d")
    unknown = set(data) - {f.name for f in dataclasses.fields(SaeSettings)}
    if unknown:
        raise ValueError(f"unknown SAE settings {sorted(unknown)}")
    return from_json_values(data)


def from_json_values(data: dict) -> dict:
    """Settings as JSON holds them, as the fields hold them (a JSON list is a tuple)."""
    return {k: tuple(v) if k == "betas" else v for k, v in data.items()}


# the bundled demo model's defaults (a tiny model: the paper's budgets would take hours on a CPU),
# unless set; and the demo corpus's: its train part is smaller than the demo's 1M-token budget
DEMO_SETTINGS = {
    "tokens": 1_000_000,
    "grouping_tokens": 50_000,
    "scale_tokens": 20_000,
    "batch_tokens": 2048,
    "ctx_len": 128,
    "k": 32,
    "dead_threshold": 100_000,
    "save_every": 100_000,
}
DEMO_DATA_SETTINGS = {"repeat": True}


def resolve_settings(given: dict, config: str | None = None) -> RunSettings:
    """A new run's settings: ``given`` (flags by name), then the ``config`` file's, the
    recipe's, the demo's and RunSettings' own defaults. Counts may be text (``1M``)."""
    chosen = {**(read_config(config) if config else {}), **given}
    recipe = RECIPES[chosen.get("recipe", "default")]
    demo = DEMO_SETTINGS if chosen.get("model") == "demo" else {}
    data = DEMO_DATA_SETTINGS if chosen.get("dataset") == "demo" else {}
    values = {**demo, **data, **recipe, **chosen}
    for key in COUNTS:
        if key in values:
            values[key] = parse_count(values[key])
    if "save_every" in values:
        values["save_every"] = parse_save_every(values["save_every"])
    return RunSettings().replace(**values).check()


def read_config(path: str) -> dict:
    """``gsae-train --config``: a JSON object of settings by name (SaeSettings' too, or under
    "sae" as run.json writes them), or a run's run.json, whose "settings" are that."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: cannot be read ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]
    if not isinstance(data, dict) or not isinstance(data.get("sae", {}), dict):
        raise ValueError(f"--config {path}: not a JSON object of settings")
    flat = {k: v for k, v in data.items() if k not in ("version", "sae")}
    flat.update(data.get("sae", {}))
    fields = {**SaeSettings.__dataclass_fields__, **RunSettings.__dataclass_fields__}
    unknown = sorted(set(flat) - set(fields))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {', '.join(unknown)}")
    for name, value in flat.items():
        if not _fits(value, type_names(fields[name]), name in COUNTS):
            raise ValueError(f"--config {path}: {name} must be {fields[name].type}, not {value!r}")
        choices = fields[name].metadata.get("option", {}).get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"--config {path}: {name} must be one of {choices}, not {value!r}")
    return from_json_values(flat)


def _fits(value, annotation: list[str], count: bool) -> bool:
    """Whether a JSON value fits one of the names of a field's annotation (``int``, ``None``,
    ``tuple[float, float]``, ...); a token count may also be text (``"1M"``)."""
    if count and isinstance(value, str):
        return True
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = {
        "None": value is None,
        "bool": isinstance(value, bool),
        "int": number and float(value).is_integer(),
        "float": number,
        "str": isinstance(value, str),
        "tuple[float, float]": isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
    }
    return any(kinds.get(name, False) for name in annotation)


@dataclass
class RunSettings:
    """Everything a run needs besides its output folder; defaults follow the paper. Each field
    made with :func:`~gsae.options.option` is a flag of gsae-train (``DEMO_SETTINGS`` holds the
    bundled demo model's own defaults); the others, and ``sae``'s, a ``--config`` file sets."""

    # model and data
    model: str = option("pythia-160m", "local directory, hub id, pythia-<size> or 'demo'")
    dataset: str = option(
        DEFAULT_DATASET,
        "hub dataset id (streamed), local .txt/.jsonl/.parquet[.gz], saved datasets dir, or 'demo'",
    )
    split: str = option("train", "dataset split")
    column: str = option("text", "text column of the dataset")
    ctx_len: int | None = option(
        None,
        "tokens per sequence",
        shown=f"{DEFAULT_CTX_LEN}, or the model's position limit if lower",
    )
    batch_tokens: int = option(32768, "tokens per step")
    repeat: bool = option(False, "cycle over a finite dataset instead of stopping at its end")
    device: str = option("auto", "cpu, cuda, cuda:1, ...")
    model_dtype: str | None = option(
        None,
        "dtype of the model forward",
        choices=("bf16", "fp16", "fp32"),
        shown="bf16 on a GPU, fp32 on a CPU",
    )
    # which layers share an SAE
    groups: str = option("auto", "auto (AMAD < threshold), N, per-layer or even:N")
    groups_file: str | None = option(
        None, "a groups.json from gsae-groups (with --groups N: its partition N)"
    )
    threshold: float = option(DEFAULT_THRESHOLD, "AMAD threshold for --groups auto")
    include_last: bool = option(False, "group the last layer too (by default it gets its own SAE)")
    grouping_tokens: int = option(
        10_000_000, "tokens to measure the layer distances for --groups auto or N", count=True
    )
    # training
    tokens: int = option(1_000_000_000, "token budget per SAE", count=True)
    layers_per_token: str = "one"  # one (the paper: a random layer of the group per token) | all
    seed: int = option(0, "seed of the SAEs' init and the layer draws")
    recipe: str = option(
        "default",
        "default: gsae's tuned optimiser and init; paper: the paper's Table 1 setting (Adam at "
        "2e-4 / sqrt(m / 2^14), its init, b_dec 0, an fp32 model). Flags given override the "
        "recipe's values",
        choices=tuple(RECIPES),
    )
    sae: SaeSettings = field(default_factory=SaeSettings)
    sae_precision: str = option(
        "auto",
        "the SAE encoder's matmul: bf16 or tf32 (tensor cores, fp32 sums; weights and optimiser "
        "state stay fp32), fp32 (the paper's), or auto: bf16 on a GPU, fp32 on a CPU",
        choices=SAE_PRECISIONS,
    )
    # several processes (torchrun)
    data_shards: int | None = option(
        None,
        "split the text into this many shards, a part of every step's batch each (fixed for the "
        "run: it decides the batches)",
        shown="the number of processes",
    )
    distribute_saes: bool = option(
        False,
        "with several processes (torchrun): each process trains whole group SAEs and receives "
        "the activations they need (default: every SAE on every process; a resumed run may "
        "switch)",
        negatable=True,
    )
    dist_timeout: float = option(
        600.0, "seconds a process waits for the others in a collective before the job stops"
    )
    check_replicas: bool = False  # compare the copies of every SAE at each log step (debugging)
    # checkpoints and logs
    save_every: int | str = option(
        "15m",
        "checkpoint interval: a time (30s, 15m, 1h; lowercase m is minutes) or tokens (100M, "
        "500k); an exception or a kill loses at most that much work",
    )
    log_every: int = option(20, "steps between log lines")
    wandb: bool = option(False, "log to Weights & Biases if installed")
    tensorboard: bool = option(False, "log to TensorBoard if installed")

    def check(self) -> RunSettings:
        """Refuse, naming the flag, values that would train nothing or nothing sensible: checked
        before any work (the model, data and SAE sizes are checked once loaded). Local paths
        become absolute, so that the run reads the same from any directory."""
        self.model, self.dataset = local_name(self.model), local_name(self.dataset)
        if self.groups_file:
            self.groups_file = local_name(self.groups_file)
        if self.tokens < 1:
            raise ValueError(
                f"--tokens {self.tokens}: the run would train nothing; give a "
                "budget of at least 1 token per SAE (e.g. 1M)"
            )
        if self.batch_tokens < 1:
            raise ValueError(
                f"--batch-tokens {self.batch_tokens}: need at least 1 token per "
                "step (default 32768)"
            )
        measured = self.groups == "auto" or str(self.groups).isdigit()
        if measured and not self.groups_file:
            if self.grouping_tokens < 1:
                raise ValueError(
                    f"--grouping-tokens {self.grouping_tokens}: --groups "
                    f"{self.groups} measures the layer distances on at least 1 token"
                )
        if self.sae.scale_mode != "none" and self.sae.scale_tokens < 1:
            raise ValueError(
                f"--scale-tokens {self.sae.scale_tokens}: the activation scales need "
                "at least 1 token (or scale_mode none in a --config file)"
            )
        if self.log_every < 1:
            raise ValueError(
                f"--log-every {self.log_every}: need at least 1 step between log lines"
            )
        if self.layers_per_token not in ("one", "all"):
            raise ValueError(f"layers_per_token: one|all, not {self.layers_per_token!r}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout {self.dist_timeout}: need more than 0 seconds")
        check_threshold(self.threshold)  # --groups N records G_hat beside G too
        # the SAE's own settings (--lr, --k, ...) now, not once the model has loaded: a width
        # wide enough for any k stands in for the model's, which only the checks of m use
        self.sae_config(64 * max(1, self.sae.k))
        return self

    def sae_config(self, d: int, layers_seed: int | None = None) -> SaeConfig:
        """The SaeConfig of every group SAE of this run, for a model of width ``d``."""
        seed = self.sae.seed if layers_seed is None else layers_seed
        fields = {**dataclasses.asdict(self.sae), "seed": seed}
        return SaeConfig(d=d, **fields).validate()

    @property
    def batch_size(self) -> int:
        """Sequences per forward (needs ``ctx_len`` resolved)."""
        return max(1, self.batch_tokens // int(self.ctx_len or 1))

    def flags(self) -> dict:
        """Every setting by its flag's name (``--k`` is ``k``), the SAE's too."""
        return settings_flags(self.to_json())

    def to_json(self) -> dict:
        return {"version": SETTINGS_VERSION, **dataclasses.asdict(self)}

    def replace(self, **changes) -> RunSettings:
        """These settings with ``changes`` by name, SaeSettings' too (``seed`` is both's)."""
        sae = {k: v for k, v in changes.items() if k in SaeSettings.__dataclass_fields__}
        run = {k: v for k, v in changes.items() if k not in sae or k == "seed"}
        return dataclasses.replace(self, sae=dataclasses.replace(self.sae, **sae), **run)

    @classmethod
    def from_json(cls, data: dict) -> RunSettings:
        data = upgrade_settings(data)  # a run's of an earlier version too
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"version"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        settings = cls(**{k: v for k, v in data.items() if k in names and k != "sae"})
        settings.sae = SaeSettings(**sae_settings(data.get("sae", {})))
        return settings

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunSettings:
        """The settings of the run in the folder ``path`` (its ``run.json``)."""
        folder = RunFolder(path)
        data = folder.read_settings()
        try:
            return cls.from_json(data)
        except (TypeError, ValueError) as err:
            raise folder.unreadable_settings(err) from None


# the token-count settings, read by parse_count (``1M``) from a flag or a --config file
COUNTS = counts(RunSettings, SaeSettings)
