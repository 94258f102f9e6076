"""The training loop: one model forward per batch (stopped after the deepest layer any group
needs), then one step of every group SAE on its layers' activations.

A step is atomic with respect to Ctrl-C (see interrupt.py): the SAE updates, the token count,
the data position, the log line and a due checkpoint happen together or not at all. Every stop
leaves a checkpoint of what was trained: Ctrl-C, the data running out, a non-finite loss; a
write that fails (a full disk) leaves the previous checkpoint as it was. An exception inside a
step (a CUDA out-of-memory, a kernel that cannot launch, a CUDA error) stops the run with a
checkpoint of the last finished step when nothing of the failed step reached the SAEs' state
(:class:`StepFailed` says what was kept); a step that failed half-way through the updates
leaves the previous checkpoint. ``--save-every`` counts tokens or time (checked at every step
on one process, at log steps with several, where rank 0's clock decides for all).

On a GPU the model forward of the next batch runs on a stream of its own while the SAE steps of
the current batch run (:class:`Feed`); the activations are the same, only the order of launches
changes.

With several processes (torchrun) every process runs this loop on its own shards of the text
(shards.py) and the step is parallel.py's: they take part in the same collectives, step after
step; they stop together (the data of one running out, a Ctrl-C, a non-finite loss) because
those are decided from what every process says in the step's collective; checkpoints, logs and
outputs are written as checkpoint.py and distributed.py describe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hf.hooks import ActivationReader
from ..hf.models import LoadedModel
from ..hf.texts import TextSource
from ..hf.tokens import StreamPosition
from ..io import write_json
from ..progress import progress_bar
from ..run import LOG_FILE, SUMMARY_FILE
from ..sae import Sae
from . import checkpoint
from .distributed import World, plan_owners
from .groups import group_name
from .interrupt import StepGuard
from .log import JsonlLog, StepTimer, close_sinks, make_sinks
from .parallel import DistributedSteps, Group, LocalSteps, ReplicatedSteps
from .sampler import LayerSampler
from .settings import RunSettings, sae_seed, save_interval
from .shards import ShardLayout, ShardStreams, furthest
from .step import SaeTrainer, StepOutput

clock = time.monotonic  # the clock of --save-every as a time (a module name: tests set it)


class DataExhausted(Exception):
    """The data ran out before the token budget (a checkpoint of what was trained is saved)."""


class NonFiniteLoss(FloatingPointError):
    """Some steps had a non-finite loss; they changed nothing (a checkpoint is saved)."""


class StepFailed(RuntimeError):
    """An exception (its ``__cause__``) inside a training step; the message says what was
    kept: a checkpoint of the last finished step (``saved``), or the checkpoint before."""

    def __init__(self, message: str, saved: bool):
        super().__init__(message)
        self.saved = saved


def state_version(trainers) -> tuple:
    """A fingerprint of the trainers' state that any change to it alters: every in-place write
    to a tensor bumps its version counter (optimiser steps, renormalisation, the dead-latent
    counters, the init), and the host counters are read as they are. Equal before and after a
    failed step: that step changed nothing, and what is in memory is the last finished step."""
    parts = []
    for t in trainers:
        tensors = [*t.sae.parameters(), t.tokens_since_fired, t.skipped_steps, t.skipped_tokens]
        for state in t.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        parts.append(
            (
                t.steps,
                t.tokens_seen,
                t.initialized,
                len(t.optimizer.state),
                tuple(x._version for x in tensors),
            )
        )
    return tuple(parts)


class Feed:
    """The batches of a run, each with its activations ``[L, N, d]``.

    On a GPU, as soon as a batch is handed out the forward of the next one is launched on a side
    stream, so that it runs on the GPU while the SAE steps of the current one do (the host
    launches both before it waits on either); the main stream waits for that forward's event
    before the next SAE step reads its activations. On a CPU there is nothing to overlap: the
    activations are None and :meth:`TrainingLoop.train_batch` runs the forward itself, in the
    step. ``forward_ahead`` True or False forces either order on any device (the tests compare
    them)."""

    forward_ahead: bool | None = None  # None: ahead on a GPU

    def __init__(self, run: TrainingLoop, batches):
        self.run, self.batches = run, batches
        cuda = run.device.type == "cuda"
        self.ahead = cuda if self.forward_ahead is None else self.forward_ahead
        self.side = torch.cuda.Stream(run.device) if cuda and self.ahead else None
        self.next_up: tuple | None = None  # (batch, hidden, event) launched ahead

    def _launch(self) -> tuple:
        batch = next(self.batches, None)
        if self.side is None:
            return batch, self.run.hidden(batch), None
        with torch.cuda.stream(self.side):
            hidden = self.run.hidden(batch)
            event = torch.cuda.Event()
            event.record(self.side)
        return batch, hidden, event

    def next(self) -> tuple:
        """``(batch, hidden)``: batch None when this process's data ran out."""
        if not self.ahead:
            return next(self.batches, None), None
        batch, hidden, event = self.next_up or self._launch()
        self.next_up = None
        if event is not None:
            main = torch.cuda.current_stream(self.run.device)
            main.wait_event(event)
            hidden.record_stream(main)  # freed after main's last use, not the side stream's
        if batch is not None:
            self.next_up = self._launch()  # the next forward, on the side stream, runs meanwhile
        return batch, hidden

    def following(self) -> tuple:
        """``(batch, hidden)`` after the last batch handed out (for the held-out FVU); hidden
        None unless its forward ran ahead."""
        if self.next_up is None:
            return next(self.batches, None), None
        batch, hidden, event = self.next_up
        self.next_up = None
        if event is not None:
            torch.cuda.current_stream(self.run.device).wait_event(event)
        return batch, hidden


@dataclass
class _StepMark:
    """What the state was when the current step began (see :meth:`TrainingLoop._failed`)."""

    steps: int
    version: tuple
    done: bool = False  # the step's updates and counters are all in


class TrainingLoop:
    """A run's SAEs and counters; :meth:`train` runs the loop until the token budget."""

    def __init__(
        self,
        out: str | Path,
        settings: RunSettings,
        loaded: LoadedModel,
        groups: list[list[int]],
        scales: dict[int, float],
        ctx_len: int,
        world: World | None = None,
        layout: ShardLayout | None = None,
    ):
        self.out = Path(out)
        self.settings = settings
        self.loaded = loaded
        self.ctx_len = ctx_len
        self.world = world or World()
        self.layout = layout or ShardLayout(1, settings.batch_size, ctx_len)
        self.device = next(loaded.model.parameters()).device
        self.layers = sorted({layer for g in groups for layer in g})  # rows of the activations
        every = settings.layers_per_token == "all"
        self.owners = self._owners(groups, every)
        rank = self.world.rank
        self.groups = [
            Group(
                group_name(layers),
                list(layers),
                self._trainer(layers, scales) if rank in owners else None,
            )
            for layers, owners in zip(groups, self.owners, strict=True)
        ]
        self.sampler = LayerSampler(groups, self.layers, settings.seed, self.device, every)
        self.engine = self._engine()
        self.reader = ActivationReader(loaded, self.layers)
        self.timer = StepTimer(self.device)
        self.guard = StepGuard(deferred=self.world.distributed)
        self.tokens = 0  # tokens of text trained on (each once, whatever the layers per token)
        self.steps = 0
        self.positions: dict[int, StreamPosition] = {}  # per shard read here, after the last step
        self.seconds = 0.0  # training time of earlier sessions of this run
        self.log_bytes = 0  # log.jsonl's length at the last checkpoint
        self.saved_steps = -1  # steps at the last checkpoint
        self.session_start = (0.0, 0)  # (clock, tokens) when this session's loop began
        self.saved_at = clock()  # clock of the last checkpoint (or the session start)
        self.every_tokens, self.every_seconds = save_interval(settings.save_every)
        self.mark: _StepMark | None = None
        self.log: JsonlLog | None = None
        self.sinks: list = []

    def _owners(self, groups: list[list[int]], every: bool) -> list[list[int]]:
        """The processes that hold each group SAE: all of them, unless --distribute-saes."""
        size = self.world.size
        if not (self.world.distributed and self.settings.distribute_saes):
            return [list(range(size)) for _ in groups]
        m = self.settings.sae_config(self.loaded.d_model).m
        return plan_owners([m * (len(g) if every else 1) for g in groups], size)

    def _trainer(self, layers: list[int], scales: dict[int, float]) -> SaeTrainer:
        cfg = self.settings.sae_config(self.loaded.d_model, sae_seed(self.settings.seed, layers))
        sae = Sae(cfg, layers, device=self.device)
        for layer in layers:
            sae.set_scale(layer, scales[layer])
        return SaeTrainer(sae, precision=self.settings.sae_precision)

    def _engine(self):
        if not self.world.distributed:
            return LocalSteps(self.groups, self.sampler, self.layout)
        if not self.settings.distribute_saes:
            return ReplicatedSteps(self.world, self.groups, self.sampler, self.layout)
        dtype = next(self.loaded.model.parameters()).dtype
        return DistributedSteps(
            self.world,
            self.groups,
            self.owners,
            self.sampler,
            self.layout,
            dtype,
            self.loaded.d_model,
        )

    @property
    def main(self) -> bool:
        return self.world.is_main

    # ---- checkpoints

    def all_positions(self) -> dict[int, dict]:
        """Every shard's position (from every process: a collective when distributed)."""
        mine = {s: p.to_dict() for s, p in self.positions.items()}
        merged: dict[int, dict] = {}
        for part in self.world.gather_objects(mine):
            merged.update(part)
        return merged

    def state(self) -> dict:
        """The run's own state, as the checkpoint's manifest holds it (a collective)."""
        positions = self.all_positions()
        state = {
            "tokens": self.tokens,
            "steps": self.steps,
            "position": positions.get(0),
            "seconds": round(self.seconds + self._session_seconds(), 3),
            "log_bytes": self.log.size if self.log else self.log_bytes,
            "groups": {g.name: g.layers for g in self.groups},
        }
        if self.layout.strict:  # one position per shard; "position": where unread text begins
            shards = [positions.get(s) for s in range(self.layout.shards)]
            state.update(
                position=furthest(shards), data_shards=self.layout.shards, positions=shards
            )
        return state

    def save_checkpoint(self) -> None:
        """Every process writes the SAEs it owns (replicas: rank 0 writes them all), rank 0
        commits (see checkpoint.py); a collective when distributed."""
        state = self.state()
        trainers = {g.name: g.trainer for g in self.engine.writes()}
        checkpoint.save(self.out, state, trainers, world=self.world)
        self.saved_steps = self.steps
        self.saved_at = clock()

    def load_checkpoint(self) -> dict:
        held = {g.name: g.trainer for g in self.groups if g.trainer is not None}
        names = [g.name for g in self.groups]
        state = checkpoint.load(self.out, held, names=names, world=self.world)
        self.tokens, self.steps = int(state["tokens"]), int(state["steps"])
        shards = state.get("positions")
        if shards is None:  # written by a run of one shard
            shards = [state.get("position")]
        if len(shards) != self.layout.shards:
            raise checkpoint.CheckpointError(
                f"{self.out / checkpoint.LATEST} holds the positions of {len(shards)} data "
                f"shard(s); this run reads {self.layout.shards}"
            )
        self.positions = {
            s: StreamPosition.from_dict(shards[s])
            for s in self.layout.owned(self.world.rank)
            if shards[s]
        }
        self.seconds, self.log_bytes = float(state["seconds"]), int(state["log_bytes"])
        self.saved_steps = self.steps
        return state

    # ---- the loop

    def train(self, texts: TextSource, resumed: bool = False) -> dict:
        """Train until the token budget; returns the final FVU (see :meth:`final_fvu`)."""
        s = self.settings
        if self.main:
            truncate = self.log_bytes if resumed else None
            self.log = JsonlLog(self.out / LOG_FILE, truncate_to=truncate)
            self.sinks = make_sinks(s.tensorboard, s.wandb, self.out, s.to_json())
        stream = ShardStreams(
            texts, self.loaded.tokenizer, self.layout, self.world.rank, self.positions, s.repeat
        )
        try:
            with self.guard, stream, progress_bar(s.tokens, "train") as bar:
                bar.update(min(self.tokens, s.tokens))
                feed = Feed(self, iter(stream))
                self._loop(feed, bar)
                return self.final_fvu(*feed.following())
        finally:
            if self.log is not None:
                self.log.close()
            close_sinks(self.sinks)
            self.sinks = []

    def _loop(self, feed: Feed, bar) -> None:
        s = self.settings
        self.session_start = (time.perf_counter(), self.tokens)
        self.saved_at = clock()
        try:
            while self.tokens < s.tokens:
                self.timer.waiting()
                batch, hidden = feed.next()
                if batch is None and not self.world.distributed:
                    raise self._exhausted()
                self.train_batch(batch, bar, hidden)  # distributed: all stop together, in the step
            self.check_finite()
        except KeyboardInterrupt:
            if not self.guard.broken and self.saved_steps != self.steps:
                if self.main:
                    bar.write(
                        f"interrupted: saving a checkpoint at {self.tokens:,} tokens (Ctrl-C "
                        "again stops at once, keeping the previous one)"
                    )
                self.save_checkpoint()
            raise
        except (DataExhausted, NonFiniteLoss):
            if self.saved_steps != self.steps:
                self.save_checkpoint()
            raise
        except checkpoint.CheckpointWriteError:
            raise  # the previous checkpoint stays; writing again would fail the same way
        except Exception as err:
            if self.world.distributed:
                raise  # the other processes are in a collective: distributed.py's errors apply
            raise self._failed(err) from err
        if self.saved_steps != self.steps:
            self.save_checkpoint()

    def _failed(self, err: Exception) -> StepFailed:
        """Save the last finished step after ``err`` if the SAEs' state is still that step's."""
        what = f"{type(err).__name__} in training step {self.steps + 1}"
        mark = self.mark
        intact = mark is None or mark.done or state_version(self._trainers()) == mark.version
        if not intact:
            return StepFailed(
                f"{what}, after some SAE updates of that step: the step's state "
                f"is not saved; {self._kept()}",
                saved=False,
            )
        if self.saved_steps == self.steps:
            return StepFailed(
                f"{what}; the checkpoint holds step {self.steps} (the last finished one)",
                saved=True,
            )
        try:
            self.save_checkpoint()
        except Exception as again:  # e.g. a CUDA error: the device cannot be read any more
            return StepFailed(
                f"{what}; saving step {self.steps} failed too ({type(again).__name__}"
                f": {again}); {self._kept()}",
                saved=False,
            )
        return StepFailed(
            f"{what}; saved a checkpoint of step {self.steps} ({self.tokens:,} "
            "tokens), the last finished one",
            saved=True,
        )

    def _kept(self) -> str:
        if self.saved_steps < 0:
            return "no checkpoint was written yet"
        return f"the checkpoint of step {self.saved_steps} is kept"

    def _trainers(self) -> list[SaeTrainer]:
        return [g.trainer for g in self.groups if g.trainer is not None]

    def _save_due(self, n: int) -> bool:
        """A checkpoint after this step: --save-every tokens crossed or its time passed."""
        if self.every_tokens is not None:
            return self.tokens // self.every_tokens > (self.tokens - n) // self.every_tokens
        if not self.world.distributed:
            return clock() - self.saved_at >= self.every_seconds
        if self.steps % self.settings.log_every:
            return False  # several processes: rank 0's clock, at log steps (one broadcast)
        due = self.main and clock() - self.saved_at >= self.every_seconds
        return bool(self.world.broadcast_object(due))

    def _exhausted(self) -> DataExhausted:
        return DataExhausted(
            f"the dataset ran out after {self.tokens:,} tokens of {self.settings.tokens:,}"
        )

    def hidden(self, batch) -> torch.Tensor:
        """The activations ``[L, N, d]`` of a batch (of none: ``[L, 0, d]``)."""
        if batch is None or batch.input_ids.shape[0] == 0:
            dtype = next(self.loaded.model.parameters()).dtype
            return torch.zeros(
                len(self.layers), 0, self.loaded.d_model, dtype=dtype, device=self.device
            )
        return self.reader(batch.input_ids, batch.attention_mask)

    def train_batch(self, batch, bar=None, hidden: torch.Tensor | None = None) -> None:
        """One training step. The forward may be interrupted (nothing has changed yet); from
        there on Ctrl-C waits until every SAE is updated, the counters and the data position
        moved on, the log line written and a due checkpoint saved. With several processes a
        Ctrl-C is only noted, and every process stops after the step in whose collective one
        of them said so; ``batch`` None: this process's data ran out (every process then stops
        before updating anything). ``hidden``: the batch's activations if :class:`Feed` ran
        the forward ahead (on a GPU; the "forward" time is then what the SAE steps waited)."""
        s = self.settings
        self.mark = _StepMark(self.steps, state_version(self._trainers()))
        self.timer.mark()
        if hidden is None:
            hidden = self.hidden(batch)  # [L, N, d]
        self.timer.mark()
        with self.guard.step():
            result = self.step(hidden, exhausted=batch is None, stop=self.guard.pending)
            if result.exhausted:
                raise self._exhausted()
            self.timer.mark()
            n = self.layout.tokens if self.layout.strict else hidden.shape[1]
            self.tokens += n
            self.steps += 1
            self.positions.update(batch.positions)
            self.mark.done = True
            if bar is not None:
                bar.update(n)
            if self.steps % s.log_every == 0:
                text = self.log_step(result.outs)
                if bar is not None:
                    bar.set_postfix_str(text)
            if self._save_due(n):
                self.save_checkpoint()
        if result.stop and self.world.distributed:  # a Ctrl-C, on some process: all stop here
            raise KeyboardInterrupt

    def step(self, hidden: torch.Tensor, exhausted: bool = False, stop: bool = False):
        """Every group SAE's step on its layers' activations, from ``hidden [L, N, d]`` (this
        process's part of the batch); a :class:`gsae.train.parallel.StepResult`."""
        return self.engine.step(hidden, self.steps, exhausted, stop)

    # ---- reporting

    def _session_seconds(self) -> float:
        return time.perf_counter() - self.session_start[0] if self.session_start[0] else 0.0

    def log_step(self, outs: dict[str, StepOutput]) -> str:
        """Write a log record (a GPU sync, once per --log-every steps; with --distribute-saes a
        gather of every SAE's numbers); stop on skipped steps. With ``check_replicas`` (a --config
        setting), also check that every copy of each SAE is identical."""
        metrics = self.engine.metrics(outs)
        if self.settings.check_replicas:
            self.engine.check_replicas(self.steps)
        elapsed = self._session_seconds()
        record = {
            "step": self.steps,
            "tokens": self.tokens,
            "elapsed": round(elapsed, 2),
            "tokens_per_s": round((self.tokens - self.session_start[1]) / max(elapsed, 1e-9), 1),
            "seconds": {k: round(v, 3) for k, v in self.timer.totals().items()},
            "groups": {},
        }
        for group in self.groups:
            m = metrics[group.name]
            record["groups"][group.name] = {
                "fvu": round(m["fvu"], 5),
                "auxk": round(m["auxk"], 5),
                "l0": round(m["l0"], 2),
                "dead": round(m["dead"], 4),
            }
        if self.log is not None:
            self.log.write(record)
        for sink in self.sinks:
            sink(record)
        self.check_finite({name: m["skipped"] for name, m in metrics.items()})
        return " ".join(f"{g.name}:{record['groups'][g.name]['fvu']:.3f}" for g in self.groups)

    def check_finite(self, skipped: dict[str, int] | None = None) -> None:
        """Raise :class:`NonFiniteLoss` if any SAE skipped a step (every process alike)."""
        if skipped is None:
            skipped = self.group_counts("skipped_steps")
        bad = {name: n for name, n in skipped.items() if n}
        if bad:
            raise NonFiniteLoss(
                f"non-finite loss in {bad} step(s) (NaN/inf in the activations?);"
                " those steps were skipped and changed nothing"
            )

    def group_counts(self, what: str) -> dict[str, int]:
        """``skipped_steps`` or ``tokens_trained`` of every SAE, from the process that writes
        it (a collective when distributed)."""
        if not (self.world.distributed and self.settings.distribute_saes):
            return {g.name: int(getattr(g.trainer, what)) for g in self.groups}  # all held here
        merged: dict[str, int] = {}
        mine = {g.name: int(getattr(g.trainer, what)) for g in self.engine.writes()}
        for part in self.world.gather_objects(mine):
            merged.update(part)
        return merged

    @torch.no_grad()
    def final_fvu(self, batch, hidden: torch.Tensor | None = None) -> dict:
        """Every SAE's FVU on each of its layers for the batch after the last trained one:
        ``held_out`` says whether that text was unseen (not when ``--repeat`` cycled the data:
        then every token had been trained on). With several processes, each SAE is measured
        where it is written, on that process's next batch (a collective)."""
        groups, tokens, held_out = {}, 0, True
        if batch is not None and batch.input_ids.shape[0] > 0:
            hidden = self.hidden(batch) if hidden is None else hidden
            tokens = int(hidden.shape[1])
            held_out = all(p.epoch == 0 for p in batch.positions.values())
            row = {layer: i for i, layer in enumerate(self.layers)}
            for group in self.engine.writes():
                per_layer = {}
                with group.trainer.averaged():  # signum: the averaged weights are the model
                    for layer in group.layers:
                        out = group.trainer.sae(hidden[row[layer]].float(), layer=layer)
                        per_layer[str(layer)] = round(float(out.loss.fvu), 5)
                groups[group.name] = {
                    "fvu": round(sum(per_layer.values()) / len(per_layer), 5),
                    "fvu_per_layer": per_layer,
                }
        parts = self.world.gather_objects((groups, tokens, held_out))
        groups = {name: v for part, _, _ in parts for name, v in part.items()}
        tokens = max(t for _, t, _ in parts)
        if not groups:
            return {}
        held_out = all(h for _, t, h in parts if t)
        note = (
            "text after the last trained batch, never trained on"
            if held_out
            else "text already trained on: --repeat cycled the data"
        )
        return {
            "tokens": tokens,
            "held_out": held_out,
            "note": note,
            "groups": groups,
        }

    def save_outputs(self, final: dict, complete: bool, stopped: str | None = None) -> None:
        """Every SAE in ``OUT/<group>/`` (by the process that writes it) and ``summary.json``
        (by rank 0); a collective when distributed."""
        error = None
        try:
            for group in self.engine.writes():
                with group.trainer.averaged():  # signum: the averaged weights are the model
                    group.trainer.sae.save(self.out / group.name)
        except OSError as err:
            error = err
        self.world.agree(error)
        trained = self.group_counts("tokens_trained")
        skipped = self.group_counts("skipped_steps")
        positions = self.all_positions()
        error = None
        if self.main:
            try:
                self._write_summary(final, complete, stopped, trained, skipped, positions)
            except OSError as err:
                error = err
        self.world.agree(error)

    def _write_summary(self, final, complete, stopped, trained, skipped, positions) -> None:
        seconds = self.seconds + self._session_seconds()
        final_groups = final.get("groups", {})
        shards = [positions.get(s) for s in range(self.layout.shards)]
        summary = {
            "model": self.settings.model,
            "complete": complete,
            "stopped": stopped,
            "tokens": self.tokens,
            "steps": self.steps,
            "position": furthest(shards) if self.layout.strict else positions.get(0),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(self.tokens / max(seconds, 1e-9), 1),
            "seconds_split": {k: round(v, 3) for k, v in self.timer.totals().items()},
            "final_fvu": {k: v for k, v in final.items() if k != "groups"},
            "groups": {
                g.name: {
                    "layers": g.layers,
                    "tokens_trained": trained[g.name],
                    "skipped_steps": skipped[g.name],
                    **final_groups.get(g.name, {}),
                }
                for g in self.groups
            },
        }
        if self.layout.strict:
            summary["data_shards"] = self.layout.shards
            summary["positions"] = shards
        if self.world.distributed:
            summary["processes"] = self.world.size
            summary["placement"] = "distributed" if self.settings.distribute_saes else "replicated"
            summary["owners"] = {g.name: o for g, o in zip(self.groups, self.owners, strict=True)}
        write_json(self.out / SUMMARY_FILE, summary)
