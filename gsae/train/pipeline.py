"""A whole gsae-train run, stage by stage. Each stage's result is saved as soon as it exists, so
an interruption loses at most the stage it was in, and ``resume=True`` goes on from whichever
stage the run reached:

1. :meth:`TrainingRun.prepare`: load the model (once), open the data (once), check every setting
   and the output folder; only then write ``run.json`` (``--overwrite`` first removes the old
   run's files);
2. :meth:`TrainingRun.resolve_groups`: ``groups.json``;
3. :meth:`TrainingRun.estimate_scales`: ``scales.json``;
4. :meth:`TrainingRun.train`: the loop, checkpointing; then the SAEs and ``summary.json``.

With several processes (``world``) every stage runs on each, on its own shards of the text:
the grouping pass and the scale pass each take whole steps' batches and sum what every process
measured, so every process gets the same groups and scales; rank 0 alone writes the run's files,
and a stage that fails on any process stops every process at the end of that stage
(:meth:`gsae.train.distributed.World.agree`). ``OUT`` must be a folder every process can read
and write (one shared filesystem for a multi-node run): that is checked before training.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from contextlib import contextmanager
from pathlib import Path

from .. import grouping as gp
from ..device import default_dtype
from ..hf.hooks import ActivationReader, hidden_states
from ..hf.models import ContextLength, LoadedModel, context_length, load_model
from ..hf.texts import TextSource, open_texts
from ..init import activation_scales
from ..outdir import acquire
from ..progress import progress_bar
from ..run import GROUPS_FILE, RUN_FILE, SCALES_FILE, SUMMARY_FILE, RunError, RunFolder
from . import checkpoint, groups
from .distributed import World
from .loop import DataExhausted, NonFiniteLoss, TrainingLoop
from .settings import RunSettings
from .shards import ShardLayout, ShardStreams


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
        world: World | None = None,
    ):
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it: pick one")
        if previous_checkpoint and not resume:
            raise ValueError("--previous-checkpoint goes with --resume")
        self.dir = RunFolder(out)
        self.settings = settings.check()
        self.world = world or World()
        self.layout: ShardLayout | None = None  # how each step's batch is split (prepare)
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
        self.run: TrainingLoop | None = None
        self.outputs_written = False  # the SAEs and summary.json of this session
        self.summary: dict | None = None
        self._lock = None  # rank 0: the writer lock on the output folder (see close)

    def close(self) -> None:
        """Release the output folder's lock (the process's end does too, however it ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- 1. everything checked before anything is written

    def prepare(self) -> None:
        s, w = self.settings, self.world
        self.stage = "checking the output folder"
        if w.is_main:
            w.checked(self._check_out_dir)
        else:
            w.agree()
            self.written = self.resume
        self.stage = "opening the dataset"  # first: a bad file is named before the model loads
        self.texts = w.checked(open_texts, s.dataset, s.split, s.column)
        self.stage = "loading the model"
        dtype = s.model_dtype or default_dtype(self.device)
        self.loaded = w.checked(load_model, s.model, dtype, self.device)
        self.stage = "checking the settings"
        w.checked(self._check_settings, dtype)
        if w.is_main:
            w.checked(self._write_settings)
        else:
            w.agree()
        if w.distributed:
            self._check_shared()
        self.written = True

    @property
    def device(self) -> str:
        """This process's device: --device, or with several processes the one it was given."""
        return str(self.world.device) if self.world.distributed else self.settings.device

    def _check_settings(self, dtype: str) -> None:
        s = self.settings
        self.ctx = context_length(self.loaded, s.ctx_len)
        s.ctx_len, s.model_dtype = self.ctx.tokens, dtype
        s.sae_config(self.loaded.d_model)  # k > m and friends
        if s.data_shards is None:  # a new run: one shard per process
            s.data_shards = self.world.size
        self.layout = ShardLayout(s.data_shards, s.batch_size, s.ctx_len, self.world.size)
        if not (self.resume and self.dir.file(GROUPS_FILE).exists()):
            self.groups_file = groups.check_spec(s, self.loaded.num_layers)
            if self.groups_file is not None:
                groups.check_file(self.groups_file, s.groups_file, self.loaded, s.include_last)

    def _write_settings(self) -> None:
        if self.overwrite:
            self.stage = "removing the old run (--overwrite)"
            self.dir.clear()
        self.stage = "writing run.json"
        try:
            self.dir.path.mkdir(parents=True, exist_ok=True)
            # on resume: the flags it may change, for good
            self.dir.write_settings(self.settings.to_json())
        except OSError as err:
            raise PermissionError(
                f"cannot write the run to {self.dir.path}: {err.strerror or err}"
            ) from err

    def _check_shared(self) -> None:
        """Every process must see the run.json rank 0 wrote: one folder, shared by all."""
        self.stage = "checking that every process sees the output folder"
        path = self.dir.file(RUN_FILE)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if self.world.is_main else None
        digest = self.world.broadcast_object(digest)
        error = None
        try:
            mine = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            mine = None
        if mine != digest:
            error = RunError(
                f"process {self.world.rank} cannot see the {RUN_FILE} that process 0 wrote in "
                f"{self.dir.path}: with several nodes, --out must be a folder every node "
                "shares (a network filesystem)"
            )
        self.world.agree(error)

    def _check_out_dir(self) -> None:
        d = self.dir
        existing = next(p for p in (d.path, *d.path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {existing} (permission denied)")
        if self.resume and not d.file(RUN_FILE).exists():
            raise RunError(f"--resume {d.path}: no gsae-train run there (no run.json)")
        self._lock = self._lock or acquire(d.path, "gsae-train")  # one writer per run
        d.finish_clearing()  # an --overwrite cut off half-way: the old run goes, as asked
        if self.resume:
            self.written = True
            if self.previous_checkpoint:  # the latest is damaged: set aside, kept for a look
                checkpoint.use_previous(d.path)
            self.resumed_from = self.describe()
            if not checkpoint.exists(d.path) and d.file(SUMMARY_FILE).exists():
                raise RunError(
                    f"--resume {d.path}: its SAEs are trained (summary.json) but its "
                    f"checkpoint ({d.path / checkpoint.LATEST}) is missing: resuming would "
                    "train new SAEs from zero over them. Put the checkpoint back to train "
                    "further, or start a new run (another --out)"
                )
        elif d.holds_run() and not self.overwrite:
            raise RunError(
                f"{d.path} already holds a gsae-train run: pass --resume {d.path} "
                "to continue it or --overwrite to replace it"
            )
        elif d.path.exists() and any(d.path.iterdir()) and not self.overwrite:
            raise RunError(
                f"{d.path} is not empty and holds no gsae-train run; pick another "
                "--out or pass --overwrite"
            )

    def describe(self) -> str:
        """What a resume would start from, in words (after finishing any interrupted save)."""
        out = self.dir.path
        checkpoint.recover(out)
        try:
            state = checkpoint.read_manifest(out / checkpoint.LATEST, missing_ok=True)
        except checkpoint.CheckpointError as err:
            return f"a damaged checkpoint ({err})"
        if state is not None:
            return f"a checkpoint at {state['tokens']:,} tokens (step {state['steps']})"
        kept = [n for n in (GROUPS_FILE, SCALES_FILE) if self.dir.file(n).exists()]
        if kept:
            return " and ".join(kept) + " (no checkpoint yet)"
        if self.dir.file(RUN_FILE).exists():
            return "the settings (run.json), nothing measured or trained yet"
        return "nothing"

    # ---- 2. groups

    def resolve_groups(self) -> list[list[int]]:
        self.stage = "grouping the layers"
        w = self.world
        grouping = w.checked(self.dir.read_groups) if self.resume else None
        if grouping is None:
            passes = {}
            if self.layout.strict:  # every process measures its shards; the sums are merged
                passes = dict(
                    batches=self._pass_batches,
                    merge=self._merge_distances,
                    tokens=self._pass_tokens(self.settings.grouping_tokens),
                )
            grouping = w.checked(
                groups.resolve,
                self.settings,
                self.loaded,
                self.texts,
                self.ctx.tokens,
                self.groups_file,
                **passes,
            )
            if w.is_main:
                w.checked(self.dir.write_groups, grouping)
            else:
                w.agree()
        else:
            w.checked(
                groups.check_file,
                grouping,
                str(self.dir.file(GROUPS_FILE)),
                self.loaded,
                self.settings.include_last,
            )
        self.grouping = grouping
        self.groups = groups.trained_groups(grouping, self.loaded.num_layers)
        return self.groups

    # ---- several shards or processes: grouping and scales over whole steps' batches

    def _pass_steps(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.layout.tokens))

    def _pass_tokens(self, tokens: int) -> int:
        """This process's tokens of a pass over ``tokens`` tokens, in whole steps' batches."""
        return self._pass_steps(tokens) * self.layout.local_tokens(self.world.rank)

    @contextmanager
    def _pass_batches(self, layers: list[int], tokens: int | None = None):
        """This process's ``[L, N, d]`` activations of ``layers`` over the first steps' batches
        covering ``tokens`` (default: the grouping budget)."""
        s = self.settings
        steps = self._pass_steps(s.grouping_tokens if tokens is None else tokens)
        reader = ActivationReader(self.loaded, layers)
        stream = ShardStreams(
            self.texts, self.loaded.tokenizer, self.layout, self.world.rank, None, s.repeat
        )
        with stream:
            yield (
                reader(b.input_ids, b.attention_mask)
                for b in itertools.islice(stream, steps)
                if b.input_ids.shape[0] > 0
            )

    def _merge_distances(self, acc: gp.AngularDistances) -> gp.AngularDistances:
        merged = gp.AngularDistances(acc.num_layers, acc.center)
        for sums, count in self.world.gather_objects((acc.sums, acc.count)):
            merged.sums += sums
            merged.count += count
        return merged

    def _merge_sums(self, local: tuple) -> tuple:
        total, seen = None, 0
        for sums, count in self.world.gather_objects(local):
            if sums is not None:
                total = sums.clone() if total is None else total + sums
            seen += count
        return total, seen

    # ---- 3. scales

    def estimate_scales(self) -> dict[int, float]:
        self.stage = "estimating activation scales"
        s, w = self.settings, self.world
        needed = sorted({layer for g in self.groups for layer in g})
        scales = w.checked(self.dir.read_scales) if self.resume else None
        if scales is None or sorted(scales) != needed:
            if s.sae.scale_mode == "none":  # nothing to measure: skip the pass over the data
                scales = dict.fromkeys(needed, 1.0)
            else:
                scales = w.checked(self._measure_scales, needed)
            if w.is_main:
                w.checked(self.dir.write_scales, scales, s.sae.scale_mode, s.sae.scale_tokens)
            else:
                w.agree()
        self.scales = scales
        return scales

    def _measure_scales(self, needed: list[int]) -> dict[int, float]:
        s = self.settings
        if self.layout.strict:
            tokens, merge = self._pass_tokens(s.sae.scale_tokens), self._merge_sums
            source = self._pass_batches(needed, s.sae.scale_tokens)
        else:
            tokens, merge = s.sae.scale_tokens, None
            source = hidden_states(
                self.loaded, needed, self.texts, self.ctx.tokens, s.batch_size, s.repeat
            )
        label = "scales" if merge is None else "scales, own shards"  # tokens: this process's
        with source as batches, progress_bar(tokens, label) as bar:
            values = activation_scales(_counted(batches, bar), tokens, s.sae.scale_mode, merge)
        return dict(zip(needed, values, strict=True))

    # ---- 4. training and outputs

    def train(self) -> dict:
        """The loop until the token budget, then the SAEs and summary.json; returns the
        summary. Raises :class:`DataExhausted` or :class:`NonFiniteLoss` after saving a
        checkpoint and the SAEs of what was trained."""
        self.stage = "training"
        w = self.world
        out = self.dir.path
        run = w.checked(
            TrainingLoop,
            out,
            self.settings,
            self.loaded,
            self.groups,
            self.scales,
            self.ctx.tokens,
            w,
            self.layout,
        )
        self.run = run
        resumed = w.broadcast_object(self.resume and checkpoint.exists(out))
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
        self.summary = w.broadcast_object(self.dir.read_summary() if w.is_main else None)
        return self.summary

    @property
    def out(self) -> Path:
        return self.dir.path


def _counted(batches, bar):
    for hidden in batches:
        bar.update(hidden.shape[1])
        yield hidden
