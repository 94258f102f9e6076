"""The training loop: one model forward per batch (stopped after the deepest layer any group
needs), then one step of every group SAE on its layers' activations.

A step is atomic with respect to Ctrl-C (see interrupt.py): the SAE updates, the token count,
the data position, the log line and a due checkpoint happen together or not at all. Every stop
leaves a checkpoint of what was trained: Ctrl-C, the data running out, a non-finite loss; a
write that fails (a full disk) leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..activations import ActivationReader, LoadedModel, StreamPosition, TextSource, TokenStream
from ..io import write_json
from ..progress import progress_bar
from ..sae import Sae, SaeTrainer, StepOutput
from . import checkpoint
from .groups import group_name
from .interrupt import StepGuard
from .log import JsonlLog, StepTimer, make_sinks
from .rundir import LOG_FILE, SUMMARY_FILE
from .sampler import LayerSampler
from .settings import RunSettings, sae_seed


class DataExhausted(Exception):
    """The data ran out before the token budget (a checkpoint of what was trained is saved)."""


class NonFiniteLoss(FloatingPointError):
    """Some steps had a non-finite loss; they changed nothing (a checkpoint is saved)."""


@dataclass
class Group:
    """One group SAE of the run: its name (its output folder), model layers and trainer."""

    name: str
    layers: list[int]
    trainer: SaeTrainer


class Run:
    """A run's SAEs and counters; :meth:`train` runs the loop until the token budget."""

    def __init__(
        self,
        out: str | Path,
        settings: RunSettings,
        loaded: LoadedModel,
        groups: list[list[int]],
        scales: dict[int, float],
        ctx_len: int,
    ):
        self.out = Path(out)
        self.settings = settings
        self.loaded = loaded
        self.ctx_len = ctx_len
        self.device = next(loaded.model.parameters()).device
        self.layers = sorted({layer for g in groups for layer in g})  # rows of the activations
        self.groups = [self._group(layers, scales) for layers in groups]
        every = settings.layers_per_token == "all"
        self.sampler = LayerSampler(groups, self.layers, settings.seed, self.device, every)
        self.reader = ActivationReader(loaded, self.layers)
        self.timer = StepTimer(self.device)
        self.guard = StepGuard()
        self.tokens = 0  # tokens of text trained on (each once, whatever the layers per token)
        self.steps = 0
        self.position: StreamPosition | None = None  # the data position after the last step
        self.seconds = 0.0  # training time of earlier sessions of this run
        self.log_bytes = 0  # log.jsonl's length at the last checkpoint
        self.saved_steps = -1  # steps at the last checkpoint
        self.session_start = (0.0, 0)  # (clock, tokens) when this session's loop began
        self.log: JsonlLog | None = None
        self.sinks: list = []

    def _group(self, layers: list[int], scales: dict[int, float]) -> Group:
        cfg = self.settings.sae_config(self.loaded.d_model, sae_seed(self.settings.seed, layers))
        sae = Sae(cfg, layers, device=self.device)
        for layer in layers:
            sae.set_scale(layer, scales[layer])
        return Group(group_name(layers), list(layers), SaeTrainer(sae))

    # ---- checkpoints

    def state(self) -> dict:
        """The run's own state, as the checkpoint's manifest holds it."""
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "position": self.position.to_dict() if self.position else None,
            "seconds": round(self.seconds + self._session_seconds(), 3),
            "log_bytes": self.log.size if self.log else self.log_bytes,
            "groups": {g.name: g.layers for g in self.groups},
        }

    def save_checkpoint(self) -> None:
        checkpoint.save(self.out, self.state(), {g.name: g.trainer for g in self.groups})
        self.saved_steps = self.steps

    def load_checkpoint(self) -> dict:
        state = checkpoint.load(self.out, {g.name: g.trainer for g in self.groups})
        self.tokens, self.steps = int(state["tokens"]), int(state["steps"])
        self.position = StreamPosition.from_dict(state["position"]) if state["position"] else None
        self.seconds, self.log_bytes = float(state["seconds"]), int(state["log_bytes"])
        self.saved_steps = self.steps
        return state

    # ---- the loop

    def train(self, texts: TextSource, resumed: bool = False) -> dict:
        """Train until the token budget; returns the final FVU (see :meth:`final_fvu`)."""
        s = self.settings
        self.log = JsonlLog(self.out / LOG_FILE, truncate_to=self.log_bytes if resumed else None)
        self.sinks = make_sinks(s.tensorboard, s.wandb, self.out, s.to_json())
        stream = TokenStream(
            texts, self.loaded.tokenizer, self.ctx_len, s.batch_size, self.position, s.repeat
        )
        try:
            with self.guard, stream, progress_bar(s.tokens, "train") as bar:
                bar.update(min(self.tokens, s.tokens))
                batches = iter(stream)
                self._loop(batches, bar)
                return self.final_fvu(next(batches, None))
        finally:
            self.log.close()

    def _loop(self, batches, bar) -> None:
        s = self.settings
        self.session_start = (time.perf_counter(), self.tokens)
        try:
            while self.tokens < s.tokens:
                self.timer.waiting()
                batch = next(batches, None)
                if batch is None:
                    raise DataExhausted(
                        f"the dataset ran out after {self.tokens:,} tokens of {s.tokens:,}"
                    )
                self.train_batch(batch, bar)
            self.check_finite()
        except KeyboardInterrupt:
            if not self.guard.broken and self.saved_steps != self.steps:
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
        if self.saved_steps != self.steps:
            self.save_checkpoint()

    def train_batch(self, batch, bar=None) -> None:
        """One training step. The forward may be interrupted (nothing has changed yet); from
        there on Ctrl-C waits until every SAE is updated, the counters and the data position
        moved on, the log line written and a due checkpoint saved."""
        s = self.settings
        self.timer.mark()
        hidden = self.reader(batch.input_ids, batch.attention_mask)  # [L, N, d]
        self.timer.mark()
        with self.guard.step():
            outs = self.step(hidden)
            self.timer.mark()
            self.tokens += hidden.shape[1]
            self.steps += 1
            self.position = batch.position
            if bar is not None:
                bar.update(hidden.shape[1])
            if self.steps % s.log_every == 0:
                text = self.log_step(outs)
                if bar is not None:
                    bar.set_postfix_str(text)
            if self.tokens // s.save_every > (self.tokens - hidden.shape[1]) // s.save_every:
                self.save_checkpoint()

    def step(self, hidden: torch.Tensor) -> list[StepOutput]:
        """Every group SAE's step on its layers' activations, from ``hidden [L, N, d]``."""
        batches = self.sampler.draw(hidden, self.steps)
        return [
            g.trainer.step(b.x, b.layer, check_finite=False, tokens=b.tokens)
            for g, b in zip(self.groups, batches, strict=True)
        ]

    # ---- reporting

    def _session_seconds(self) -> float:
        return time.perf_counter() - self.session_start[0] if self.session_start[0] else 0.0

    def log_step(self, outs: list[StepOutput]) -> str:
        """Write a log record (a GPU sync, once per --log-every steps); stop on skipped steps."""
        elapsed = self._session_seconds()
        record = {
            "step": self.steps,
            "tokens": self.tokens,
            "elapsed": round(elapsed, 2),
            "tokens_per_s": round((self.tokens - self.session_start[1]) / max(elapsed, 1e-9), 1),
            "seconds": {k: round(v, 3) for k, v in self.timer.totals().items()},
            "groups": {},
        }
        for group, out in zip(self.groups, outs, strict=True):
            record["groups"][group.name] = {
                "fvu": round(float(out.fvu), 5),
                "auxk": round(float(out.auxk), 5),
                "l0": round(float(out.l0), 2),
                "dead": round(float(out.dead_fraction), 4),
            }
        self.log.write(record)
        for sink in self.sinks:
            sink(record)
        self.check_finite()
        return " ".join(f"{g.name}:{record['groups'][g.name]['fvu']:.3f}" for g in self.groups)

    def check_finite(self) -> None:
        skipped = {g.name: int(g.trainer.skipped_steps) for g in self.groups}
        bad = {name: n for name, n in skipped.items() if n}
        if bad:
            raise NonFiniteLoss(
                f"non-finite loss in {bad} step(s) (NaN/inf in the activations?);"
                " those steps were skipped and changed nothing"
            )

    @torch.no_grad()
    def final_fvu(self, batch) -> dict:
        """Every SAE's FVU on each of its layers for the batch after the last trained one:
        ``held_out`` says whether that text was unseen (not when ``--repeat`` cycled the data:
        then every token had been trained on)."""
        if batch is None:
            return {}
        hidden = self.reader(batch.input_ids, batch.attention_mask)
        row = {layer: i for i, layer in enumerate(self.layers)}
        groups = {}
        for group in self.groups:
            per_layer = {}
            with group.trainer.averaged():  # signum: the averaged weights are the model
                for layer in group.layers:
                    out = group.trainer.sae(hidden[row[layer]].float(), layer=layer)
                    per_layer[str(layer)] = round(float(out.loss.fvu), 5)
            groups[group.name] = {
                "fvu": round(sum(per_layer.values()) / len(per_layer), 5),
                "fvu_per_layer": per_layer,
            }
        held_out = batch.position.epoch == 0
        note = (
            "text after the last trained batch, never trained on"
            if held_out
            else "text already trained on: --repeat cycled the data"
        )
        return {
            "tokens": int(hidden.shape[1]),
            "held_out": held_out,
            "note": note,
            "groups": groups,
        }

    def save_outputs(self, final: dict, complete: bool, stopped: str | None = None) -> None:
        """Every SAE in ``OUT/<group>/`` and ``summary.json``."""
        for group in self.groups:
            with group.trainer.averaged():  # signum: the averaged weights are the model
                group.trainer.sae.save(self.out / group.name)
        seconds = self.seconds + self._session_seconds()
        final_groups = final.get("groups", {})
        summary = {
            "model": self.settings.model,
            "complete": complete,
            "stopped": stopped,
            "tokens": self.tokens,
            "steps": self.steps,
            "position": self.position.to_dict() if self.position else None,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(self.tokens / max(seconds, 1e-9), 1),
            "seconds_split": {k: round(v, 3) for k, v in self.timer.totals().items()},
            "final_fvu": {k: v for k, v in final.items() if k != "groups"},
            "groups": {
                g.name: {
                    "layers": g.layers,
                    "tokens_trained": g.trainer.tokens_trained,
                    "skipped_steps": int(g.trainer.skipped_steps),
                    **final_groups.get(g.name, {}),
                }
                for g in self.groups
            },
        }
        write_json(self.out / SUMMARY_FILE, summary)
