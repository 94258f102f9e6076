"""The gsae-train run, in pieces with one job each.

- ``settings.py``: :class:`RunSettings`, what ``run.json`` records, and each group's SaeConfig
  (the run folder's files are :mod:`gsae.run`'s)
- ``groups.py``: which layers share an SAE (measured, from a file, or a layout), checked
- ``sampler.py``: :class:`LayerSampler`, per token the layer each group SAE trains on
- ``step.py``: :class:`SaeTrainer`, one SAE's optimiser, dead-latent counters and step (whole
  batch, or data-parallel halves)
- ``checkpoint.py``: JSON + safetensors, one atomic swap, recovery, the previous checkpoint
- ``interrupt.py``: :class:`StepGuard`, Ctrl-C held to step boundaries
- ``log.py``: ``log.jsonl``, TensorBoard, W&B and the time split
- ``shards.py``: the text split into shards, a part of every step's batch each (several processes)
- ``distributed.py``: :class:`World`, torchrun's processes and the collectives, SAE owners
- ``parallel.py``: one step of every SAE on one process, replicated or distributed over several
- ``loop.py``: :class:`TrainingLoop`, the training loop
- ``pipeline.py``: :class:`TrainingRun`, a whole run stage by stage (what gsae-train calls)
"""

from .checkpoint import CheckpointError, CheckpointWriteError
from .loop import DataExhausted, NonFiniteLoss, StepFailed, TrainingLoop
from .pipeline import TrainingRun
from .settings import RECIPES, RESUMABLE, RunSettings

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "DataExhausted",
    "NonFiniteLoss",
    "RunSettings",
    "RECIPES",
    "RESUMABLE",
    "StepFailed",
    "TrainingLoop",
    "TrainingRun",
]
