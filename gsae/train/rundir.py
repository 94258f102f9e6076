"""A gsae-train output folder: the files a run writes, what they say, and how it is replaced.

::

    run.json          the settings (written first, once everything was checked)
    groups.json       the groups, as soon as they are known (a measurement is not lost)
    scales.json       each layer's activation scale, as soon as it is estimated
    checkpoint/       the latest checkpoint (see checkpoint.py); checkpoint.prev/ the one before
    log.jsonl         one line per --log-every steps
    <group>/          the trained SAEs (sae.safetensors + cfg.json), at the end or on a stop
    summary.json      tokens, time, final FVU; "complete": false when the run stopped early

:class:`RunDir` reads them for the trainer and for anything built on a finished run (evaluation
reads the settings, the SAEs and the final data position from here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .. import grouping as gp
from ..hf.tokens import StreamPosition
from ..io import temp_origin, write_json
from ..sae import Sae
from . import checkpoint
from .settings import RunSettings

RUN_FILE, GROUPS_FILE, SCALES_FILE = "run.json", "groups.json", "scales.json"
LOG_FILE, SUMMARY_FILE = "log.jsonl", "summary.json"
OVERWRITING = ".overwriting"  # the old run's files on their way out (see RunDir.clear)
SAE_DIR = re.compile(r"layers?_[0-9_-]+(\.old)?")
OWN_NAMES = (
    RUN_FILE,
    GROUPS_FILE,
    SCALES_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    "tensorboard",
    "wandb",
    *checkpoint.NAMES,
)


class RunDirError(ValueError):
    """An output folder that cannot be used as asked; the message says why."""


class RunDir:
    """The files of one run; nothing is read or written until asked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- what is there

    def holds_run(self) -> bool:
        return self.file(RUN_FILE).exists() or checkpoint.exists(self.path)

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

    def describe(self) -> str:
        """What a resume would start from, in words (after finishing any interrupted save)."""
        checkpoint.recover(self.path)
        try:
            state = checkpoint.read_manifest(self.path / checkpoint.LATEST, missing_ok=True)
        except checkpoint.CheckpointError as err:
            return f"a damaged checkpoint ({err})"
        if state is not None:
            return f"a checkpoint at {state['tokens']:,} tokens (step {state['steps']})"
        kept = [n for n in (GROUPS_FILE, SCALES_FILE) if self.file(n).exists()]
        if kept:
            return " and ".join(kept) + " (no checkpoint yet)"
        if self.file(RUN_FILE).exists():
            return "the settings (run.json), nothing measured or trained yet"
        return "nothing"

    # ---- settings, groups, scales

    def read_settings(self) -> RunSettings:
        path = self.file(RUN_FILE)
        if not path.exists():
            raise RunDirError(f"{self.path}: no gsae-train run there ({path} is missing)")
        try:
            return RunSettings.from_json(json.loads(path.read_text())["settings"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise RunDirError(
                f"{path} cannot be read ({err}); it was not written by this "
                "version of gsae-train: start a new run (--overwrite)"
            ) from None

    def write_settings(self, settings: RunSettings, extra: dict | None = None) -> None:
        write_json(self.file(RUN_FILE), {"settings": settings.to_json(), **(extra or {})})

    def read_groups(self) -> gp.Grouping | None:
        path = self.file(GROUPS_FILE)
        return gp.Grouping.load(path) if path.exists() else None

    def write_groups(self, grouping: gp.Grouping) -> None:
        grouping.save(self.file(GROUPS_FILE))

    def read_scales(self) -> dict[int, float] | None:
        path = self.file(SCALES_FILE)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return {int(layer): float(s) for layer, s in data["scales"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise RunDirError(
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
            raise RunDirError(f"{self.path}: no SAEs written yet (no {SUMMARY_FILE})")
        return {name: Sae.load(self.path / name, device=device) for name in summary["groups"]}

    def final_position(self) -> StreamPosition | None:
        """Where the training data stopped: the text after it was not trained on (unless the
        run cycled its data, see ``summary["final_fvu"]["held_out"]``)."""
        summary = self.read_summary()
        position = (summary or {}).get("position")
        return StreamPosition.from_dict(position) if position else None

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
