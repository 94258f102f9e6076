"""``gsae-train`` with torch.distributed's collectives wrapped to count the bytes each process
hands them during the training steps after the first (benchmarks/bench_distributed.py starts
it, under torchrun or alone; the first step also sums each SAE's init statistics, once). Writes
``$GSAE_BENCH_BYTES/<rank>.json``: the steps and, per collective, the bytes of all of them,
where ``all_to_all`` counts only the rows sent to other processes."""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from gsae.cli.train import main
from gsae.train import loop
from gsae.train.distributed import World

RANK = int(os.environ.get("RANK", "0"))
counts: Counter = Counter()
inside = {"step": False, "steps": 0}


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def wrap(name, count):
    original = getattr(dist, name)

    def wrapped(*args, **kwargs):
        if inside["step"] and inside["steps"] > 0:  # the first step also sums the SAEs' init
            counts[name] += count(*args, **kwargs)
            counts[f"{name}_calls"] += 1
        return original(*args, **kwargs)

    setattr(dist, name, wrapped)


def _to_others(out, inp, out_rows=None, in_rows=None, *args, **kwargs) -> int:
    row = _bytes(inp) // max(1, inp.shape[0])
    return (sum(in_rows) - in_rows[RANK]) * row


wrap("all_reduce", lambda t, *a, **k: _bytes(t))
wrap("all_to_all_single", _to_others)
step = loop.TrainingLoop.step


def counted_step(run, *args, **kwargs):
    inside["step"] = True
    try:
        return step(run, *args, **kwargs)
    finally:
        inside["step"] = False
        inside["steps"] += 1


loop.TrainingLoop.step = counted_step


def write_counts() -> None:
    folder = os.environ.get("GSAE_BENCH_BYTES")
    if folder:
        record = {"steps": inside["steps"], "counted": max(0, inside["steps"] - 1), **counts}
        Path(folder, f"{RANK}.json").write_text(json.dumps(record))


close = World.close


def close_and_write(world) -> None:  # a process of several ends in gsae-train's main
    write_counts()
    close(world)


World.close = close_and_write

if __name__ == "__main__":
    code = main(sys.argv[1:])
    write_counts()  # one process
    sys.exit(code)
