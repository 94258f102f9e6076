"""``gsae-train`` as torchrun starts it, with a fault injected into one process for
tests/train/test_distributed.py: ``python -m torch.distributed.run ... tests/dist_worker.py ARGS``.

``GSAE_TEST_FAULT=RANK:STEP:KIND`` makes process RANK, right after its training step STEP:
``sigint`` send itself a Ctrl-C, ``raise`` raise an error, ``hang`` stop answering (sleep),
``perturb`` change its copy of the first SAE (the replicas then differ), ``nospace`` find the
disk full from then on (writing its SAEs into a checkpoint fails). Each process writes its
pid into ``GSAE_TEST_PIDS`` (a folder), so that the test can check none is left running.
"""

import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

from gsae.cli.train import main
from gsae.train import checkpoint, loop

RANK = int(os.environ.get("RANK", "0"))


def inject(rank: int, step: int, kind: str) -> None:
    train_batch = loop.TrainingLoop.train_batch

    def faulty(run, *args, **kwargs):
        train_batch(run, *args, **kwargs)
        if RANK != rank or run.steps != step:
            return
        if kind == "sigint":
            signal.raise_signal(signal.SIGINT)
        elif kind == "raise":
            raise RuntimeError(f"injected fault in process {RANK} after step {step}")
        elif kind == "hang":
            time.sleep(3600)
        elif kind == "nospace":

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            checkpoint.write_group = full
        elif kind == "perturb":
            with torch.no_grad():
                run.engine.held()[0].trainer.sae.b_dec.add_(1e-3)
        else:
            raise ValueError(f"unknown fault {kind}")

    loop.TrainingLoop.train_batch = faulty


if __name__ == "__main__":
    if os.environ.get("GSAE_TEST_PIDS"):
        Path(os.environ["GSAE_TEST_PIDS"], f"{RANK}.pid").write_text(str(os.getpid()))
    if os.environ.get("GSAE_TEST_FAULT"):
        rank, step, kind = os.environ["GSAE_TEST_FAULT"].split(":")
        inject(int(rank), int(step), kind)
    sys.exit(main(sys.argv[1:]))
