"""What a gsae-train run is: its settings, as ``run.json`` records them, and each group's
:class:`~gsae.sae.SaeConfig`.

Field names are the names gsae-train's parser stores its flags under (``ctx_len`` is
``--ctx-len``, ``init_encoder`` is ``--init``): ``gsae.cli.train.setting_flags`` names the flag
of any setting. ``sae`` holds the :class:`~gsae.sae.SaeConfig` fields set by flags (all
but ``d``, which comes from the model): a new SaeConfig field needs no change here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from dataclasses import dataclass, field

from ..grouping import DEFAULT_THRESHOLD, check_threshold
from ..hf.hub import local_name
from ..hf.texts import DEFAULT_DATASET
from ..run import SETTINGS_VERSION, RunFolder, settings_flags, upgrade_settings
from ..sae import SaeConfig, legacy_fields
from ..units import parse_count

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


@dataclass
class RunSettings:
    """Everything a run needs besides its output folder; defaults follow the paper."""

    # model and data
    model: str = "pythia-160m"
    dataset: str = DEFAULT_DATASET
    split: str = "train"
    column: str = "text"
    ctx_len: int | None = None  # None: 1024, capped at the model's position limit
    batch_tokens: int = 32768
    repeat: bool = False
    device: str = "auto"
    model_dtype: str | None = None  # None: bf16 on a GPU, fp32 on a CPU
    # which layers share an SAE
    groups: str = "auto"  # auto | N | per-layer | even:N
    groups_file: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    include_last: bool = False
    grouping_tokens: int = 10_000_000
    # training
    tokens: int = 1_000_000_000  # per SAE
    layers_per_token: str = "one"  # one (the paper) | all
    seed: int = 0
    recipe: str = "default"  # a key of RECIPES; the flags given override its values
    sae: dict = field(default_factory=dict)  # SaeConfig fields but d
    sae_precision: str = "auto"  # the encoder's matmul: auto (bf16 on a GPU) | bf16 | tf32 | fp32
    # several processes (torchrun)
    data_shards: int | None = None  # None: the number of processes when the run starts
    distribute_saes: bool = False  # each SAE on its owners (default: replicated on every one)
    dist_timeout: float = 600.0  # seconds a collective may wait for the other processes
    check_replicas: bool = False  # compare the copies of every SAE at each log step
    # checkpoints and logs
    save_every: int | str = "15m"  # tokens (an int) or a time ("15m"): see parse_save_every
    log_every: int = 20
    wandb: bool = False
    tensorboard: bool = False

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
        if self.scale_mode != "none" and self.scale_tokens < 1:
            raise ValueError(
                f"--scale-tokens {self.scale_tokens}: the activation scales need "
                "at least 1 token (or --scale-mode none)"
            )
        if self.log_every < 1:
            raise ValueError(
                f"--log-every {self.log_every}: need at least 1 step between log lines"
            )
        check_threshold(self.threshold)  # --groups N records G_hat beside G too
        # the SAE's own settings (--lr, --k, ...) now, not once the model has loaded: a width
        # wide enough for any k stands in for the model's, which only the checks of m use
        self.sae_config(64 * max(1, int(self.sae.get("k", SaeConfig.k))))
        return self

    def sae_config(self, d: int, layers_seed: int | None = None) -> SaeConfig:
        """The SaeConfig of every group SAE of this run, for a model of width ``d``."""
        kwargs = legacy_fields({**self.sae, "d": d})  # a run saved before a field existed
        if layers_seed is not None:
            kwargs["seed"] = layers_seed
        return SaeConfig(**kwargs).validate()

    @property
    def scale_mode(self) -> str:
        return self.sae.get("scale_mode", SaeConfig.scale_mode)

    @property
    def scale_tokens(self) -> int:
        return int(self.sae.get("scale_tokens", SaeConfig.scale_tokens))

    @property
    def batch_size(self) -> int:
        """Sequences per forward (needs ``ctx_len`` resolved)."""
        return max(1, self.batch_tokens // int(self.ctx_len or 1))

    def flags(self) -> dict:
        """Every setting by its flag's name (``--k`` is ``k``), the SAE's too."""
        return settings_flags(self.to_json())

    def to_json(self) -> dict:
        return {"version": SETTINGS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> RunSettings:
        data = upgrade_settings(data)  # a run's of an earlier version too
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"version"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunSettings:
        """The settings of the run in the folder ``path`` (its ``run.json``)."""
        folder = RunFolder(path)
        data = folder.read_settings()
        try:
            return cls.from_json(data)
        except (TypeError, ValueError) as err:
            raise folder.unreadable_settings(err) from None
