"""A whole gsae-train run, stage by stage. Each stage's result is saved as soon as it exists, so
an interruption loses at most the stage it was in, and ``resume=True`` goes on from whichever
stage the run reached:

1. :meth:`TrainingRun.prepare`: load the model (once), open the data (once), check every setting
   and the output folder; only then write ``run.json`` (``--overwrite`` first removes the old
   run's files);
2. :meth:`TrainingRun.resolve_groups`: ``groups.json``;
3. :meth:`TrainingRun.estimate_scales`: ``scales.json``;
4. :meth:`TrainingRun.train`: the loop, checkpointing; then the SAEs and ``summary.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import grouping as gp
from ..activations import (
    ContextLength,
    LoadedModel,
    TextSource,
    context_length,
    default_dtype,
    hidden_states,
    load_model,
    open_texts,
)
from ..progress import progress_bar
from ..sae import activation_scales
from . import checkpoint, groups
from .loop import DataExhausted, NonFiniteLoss, Run
from .rundir import GROUPS_FILE, RunDir, RunDirError
from .settings import RunSettings


class TrainingRun:
    """One gsae-train run in ``out``; call the stages in order. ``stage`` names the one under
    way (for messages), ``dir`` reads what is on disk."""

    def __init__(
        self,
        out: str | os.PathLike,
        settings: RunSettings,
        *,
        resume: bool = False,
        overwrite: bool = False,
        previous_checkpoint: bool = False,
    ):
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it: pick one")
        if previous_checkpoint and not resume:
            raise ValueError("--previous-checkpoint goes with --resume")
        self.dir = RunDir(out)
        self.settings = settings
        self.resume = resume
        self.overwrite = overwrite
        self.previous_checkpoint = previous_checkpoint
        self.stage = "starting"
        self.written = False  # whether run.json (and so a resumable run) exists in out
        self.resumed_from: str | None = None  # with resume: what the folder held, in words
        self.loaded: LoadedModel | None = None
        self.texts: TextSource | None = None
        self.ctx: ContextLength | None = None
        self.groups_file: gp.Grouping | None = None
        self.grouping: gp.Grouping | None = None
        self.groups: list[list[int]] = []
        self.scales: dict[int, float] | None = None
        self.run: Run | None = None
        self.outputs_written = False  # the SAEs and summary.json of this session
        self.summary: dict | None = None

    # ---- 1. everything checked before anything is written

    def prepare(self) -> None:
        s = self.settings
        self.stage = "checking the output folder"
        self._check_out_dir()
        self.stage = "loading the model"
        dtype = s.model_dtype or default_dtype(s.device)
        self.loaded = load_model(s.model, dtype, s.device)
        self.stage = "opening the dataset"
        self.texts = open_texts(s.dataset, s.split, s.column)
        self.stage = "checking the settings"
        self.ctx = context_length(self.loaded, s.ctx_len)
        s.ctx_len, s.model_dtype = self.ctx.tokens, dtype
        s.sae_config(self.loaded.d_model)  # k > m and friends
        if not (self.resume and self.dir.file(GROUPS_FILE).exists()):
            self.groups_file = groups.check_spec(s, self.loaded.num_layers)
            if self.groups_file is not None:
                groups.check_file(self.groups_file, s.groups_file, self.loaded, s.include_last)
        if self.overwrite:
            self.stage = "removing the old run (--overwrite)"
            self.dir.clear()
        self.stage = "writing run.json"
        try:
            self.dir.path.mkdir(parents=True, exist_ok=True)
            self.dir.write_settings(s)  # on resume: the flags it may change, changed for good
        except OSError as err:
            raise PermissionError(
                f"cannot write the run to {self.dir.path}: {err.strerror or err}"
            ) from err
        self.written = True

    def _check_out_dir(self) -> None:
        d = self.dir
        d.finish_clearing()  # an --overwrite cut off half-way: the old run goes, as asked
        if self.resume:
            if not d.file("run.json").exists():
                raise RunDirError(f"--resume {d.path}: no gsae-train run there (no run.json)")
            self.written = True
            if self.previous_checkpoint:  # the latest is damaged: set aside, kept for a look
                checkpoint.use_previous(d.path)
            self.resumed_from = d.describe()
        elif d.holds_run() and not self.overwrite:
            raise RunDirError(
                f"{d.path} already holds a gsae-train run: pass --resume {d.path} "
                "to continue it or --overwrite to replace it"
            )
        elif d.path.exists() and any(d.path.iterdir()) and not self.overwrite:
            raise RunDirError(
                f"{d.path} is not empty and holds no gsae-train run; pick another "
                "--out or pass --overwrite"
            )
        existing = next(p for p in (d.path, *d.path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {existing} (permission denied)")

    # ---- 2. groups

    def resolve_groups(self) -> list[list[int]]:
        self.stage = "grouping the layers"
        grouping = self.dir.read_groups() if self.resume else None
        if grouping is None:
            grouping = groups.resolve(
                self.settings, self.loaded, self.texts, self.ctx.tokens, self.groups_file
            )
            self.dir.write_groups(grouping)
        else:
            groups.check_file(
                grouping, str(self.dir.file(GROUPS_FILE)), self.loaded, self.settings.include_last
            )
        self.grouping = grouping
        self.groups = groups.trained_groups(grouping, self.loaded.num_layers)
        return self.groups

    # ---- 3. scales

    def estimate_scales(self) -> dict[int, float]:
        self.stage = "estimating activation scales"
        s = self.settings
        needed = sorted({layer for g in self.groups for layer in g})
        scales = self.dir.read_scales() if self.resume else None
        if scales is None or sorted(scales) != needed:
            if s.scale_mode == "none":  # nothing to measure: skip the pass over the data
                scales = dict.fromkeys(needed, 1.0)
            else:
                with (
                    hidden_states(
                        self.loaded, needed, self.texts, self.ctx.tokens, s.batch_size, s.repeat
                    ) as batches,
                    progress_bar(s.scale_tokens, "scales") as bar,
                ):
                    values = activation_scales(_counted(batches, bar), s.scale_tokens, s.scale_mode)
                scales = dict(zip(needed, values, strict=True))
            self.dir.write_scales(scales, s.scale_mode, s.scale_tokens)
        self.scales = scales
        return scales

    # ---- 4. training and outputs

    def train(self) -> dict:
        """The loop until the token budget, then the SAEs and summary.json; returns the
        summary. Raises :class:`DataExhausted` or :class:`NonFiniteLoss` after saving a
        checkpoint and the SAEs of what was trained."""
        self.stage = "training"
        out = self.dir.path
        run = Run(out, self.settings, self.loaded, self.groups, self.scales, self.ctx.tokens)
        self.run = run
        resumed = self.resume and checkpoint.exists(out)
        if resumed:
            run.load_checkpoint()
        try:
            final = run.train(self.texts, resumed=resumed)
        except (DataExhausted, NonFiniteLoss) as err:
            self.stage = "writing the SAEs"
            run.save_outputs({}, complete=False, stopped=str(err))
            self.outputs_written = True
            raise
        self.stage = "writing the SAEs"
        run.save_outputs(final, complete=True)
        self.outputs_written = True
        self.summary = self.dir.read_summary()
        return self.summary

    @property
    def out(self) -> Path:
        return self.dir.path


def _counted(batches, bar):
    for hidden in batches:
        bar.update(hidden.shape[1])
        yield hidden
