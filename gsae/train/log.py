"""What a run reports: ``log.jsonl``, TensorBoard, Weights & Biases, and where the time goes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..io import finite


class StepTimer:
    """Seconds spent waiting for data, in the model forward and in the SAE steps.

    The data wait is host time. On a GPU the forward and the SAE steps are timed with CUDA
    events, read (one synchronisation) only when :meth:`totals` is called at the logging
    interval: host clocks would measure kernel launches, not the work. On a CPU, where every op
    is synchronous, the host clock is exact."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._totals = {"data": 0.0, "forward": 0.0, "sae": 0.0}
        self._events: list[tuple] = []  # (forward start, sae start, sae end) per step
        self._marks: list = []
        self._wait_start = 0.0

    def waiting(self) -> None:
        """Before asking for the next batch."""
        self._marks = []  # a step cut off half-way (an interrupt) is not counted
        self._wait_start = time.perf_counter()

    def mark(self) -> None:
        """At the start of the forward, the start of the SAE steps, and their end."""
        if len(self._marks) == 0:
            self._totals["data"] += time.perf_counter() - self._wait_start
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the run's GPU, not the default
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        if len(self._marks) == 3:
            self._events.append(tuple(self._marks))
            self._marks = []
            if not self.cuda:
                self._resolve()

    def _resolve(self) -> None:
        for start, middle, end in self._events:
            if self.cuda:
                self._totals["forward"] += start.elapsed_time(middle) / 1000
                self._totals["sae"] += middle.elapsed_time(end) / 1000
            else:
                self._totals["forward"] += middle - start
                self._totals["sae"] += end - middle
        self._events.clear()

    def totals(self) -> dict[str, float]:
        """Seconds so far per phase (synchronises a GPU once)."""
        if self.cuda and self._events:
            self._events[-1][2].synchronize()
        self._resolve()
        return dict(self._totals)


class JsonlLog:
    """``log.jsonl``, one record per line. On resume it is first cut back to its length at the
    checkpoint: lines logged after it would otherwise appear twice."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = Path(path)
        if truncate_to is not None and self.path.exists():
            if self.path.stat().st_size > truncate_to:
                os.truncate(self.path, truncate_to)
        elif truncate_to is None and self.path.exists():
            os.truncate(self.path, 0)  # a new run: the log starts empty
        self.file = open(self.path, "a")

    @property
    def size(self) -> int:
        return self.file.tell()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(finite(record), allow_nan=False) + "\n")  # NaN: null
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def make_sinks(tensorboard: bool, wandb: bool, out: Path, config: dict) -> list:
    """TensorBoard and/or Weights & Biases loggers, when asked for and installed."""
    sinks = []

    def flat(record: dict) -> dict:
        return {f"{g}/{k}": v for g, m in record["groups"].items() for k, v in m.items()}

    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("gsae-train: --tensorboard: tensorboard is not installed", file=sys.stderr)
        else:
            writer = SummaryWriter(str(out / "tensorboard"))

            def to_tensorboard(r: dict) -> None:
                for k, v in flat(r).items():
                    writer.add_scalar(k, v, r["tokens"])

            to_tensorboard.close = writer.close
            sinks.append(to_tensorboard)
    if wandb:
        try:
            import wandb as wb
        except ImportError:
            print("gsae-train: --wandb: wandb is not installed", file=sys.stderr)
        else:
            wb.init(project="gsae", dir=str(out), config=config)

            def to_wandb(r: dict) -> None:
                wb.log(flat(r), step=r["tokens"])

            to_wandb.close = wb.finish
            sinks.append(to_wandb)
    return sinks


def close_sinks(sinks: list) -> None:
    """Flush and close the loggers of :func:`make_sinks` (a process of several ends without
    running the interpreter's exit handlers, so nothing may be left to them)."""
    for sink in sinks:
        close = getattr(sink, "close", None)
        if close is not None:
            close()
