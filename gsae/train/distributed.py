"""Several processes training one run, on torch.distributed, launched by torchrun.

``torchrun --nproc_per_node N --no-python gsae-train ...`` starts N copies of the command. Each
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment torchrun sets, takes its
own GPU (``cuda:LOCAL_RANK``, backend ``nccl``: NCCL on NVIDIA, RCCL on AMD) or the CPU (backend
``gloo``), streams its own shards of the text (shards.py), runs the model forward on them and
trains the group SAEs with the others (parallel.py). Only rank 0 prints, logs and writes the
run's files; every rank writes the SAEs it owns into a checkpoint that rank 0 commits.

:class:`World` is the one place collectives are called from: with one process each method is
a no-op, so the training code reads the same for one process and for many. Every collective
has a timeout (``--dist-timeout``): when a process dies or hangs, the others' collectives fail
with a :class:`CollectiveError` within it instead of waiting for ever, and torchrun then stops
whatever is left. An error that one process meets on its own (a file missing on one node, a
GPU out of memory) is shared at the stage boundaries with :meth:`World.agree`: every process
stops there, the one that failed prints its error, the others stop quietly (:class:`PeerFailed`).

:func:`plan_owners` decides which processes train which SAE with ``--distribute-saes``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch

from ..device import resolve_device

DEFAULT_TIMEOUT = 600.0  # seconds, torch's own default for NCCL


class CollectiveError(RuntimeError):
    """A collective operation failed: another process died or stopped first (its own error is
    printed by it), or it timed out (``--dist-timeout``)."""


class PeerFailed(RuntimeError):
    """Another process failed at a point where every process checks in (:meth:`World.agree`);
    that process printed its own error."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"process {rank} failed: {message}")
        self.rank = rank


class World:
    """The processes of a run and this one's place among them (rank, size, device)."""

    def __init__(
        self,
        rank: int = 0,
        size: int = 1,
        local_rank: int = 0,
        device="cpu",
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.timeout = timeout  # seconds a collective waits for the others
        self.device = torch.device(device)  # where this process's tensors and collectives run
        self._groups: dict[tuple[int, ...], object] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, device={self.device})"

    # ---- collectives (no-ops for one process)

    def _call(self, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # torch.distributed's errors (DistError) are RuntimeErrors
            raise CollectiveError(
                f"{name} failed on process {self.rank}: another process stopped (its own error "
                f"is above), or did not answer within --dist-timeout {self.timeout:g} s: {err}"
            ) from err

    def all_reduce(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """Sum ``tensor`` in place over the processes (of ``group``, default all)."""
        if self.distributed:
            import torch.distributed as dist

            self._call("all_reduce", dist.all_reduce, tensor, group=group)
        return tensor

    def all_to_all(
        self, out: torch.Tensor, inp: torch.Tensor, out_rows: list[int], in_rows: list[int]
    ) -> torch.Tensor:
        """Send ``in_rows[q]`` consecutive rows of ``inp`` to process q; receive ``out_rows[q]``
        rows from each q into ``out``, in rank order."""
        if not self.distributed:
            out.copy_(inp)
            return out
        import torch.distributed as dist

        self._call("all_to_all", dist.all_to_all_single, out, inp, out_rows, in_rows)
        return out

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.size
        self._call("all_gather_object", dist.all_gather_object, result, obj)
        return result

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        return self.gather_objects(obj if self.is_main else None)[0]

    def barrier(self) -> None:
        if self.distributed:
            self.all_reduce(torch.zeros(1, device=self.device))

    def group(self, ranks: list[int]):
        """The process group of ``ranks`` (every process must ask for the same groups, in the
        same order); None for all processes or for a single one."""
        ranks = tuple(sorted(ranks))
        if not self.distributed or len(ranks) == self.size or len(ranks) < 2:
            return None
        if ranks not in self._groups:
            import torch.distributed as dist

            self._groups[ranks] = self._call("new_group", dist.new_group, list(ranks))
        return self._groups[ranks]

    def summer(self, group=None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f(t)``: the sum of a float64 tensor over ``group`` (an SAE's init statistics)."""

        def total(t: torch.Tensor) -> torch.Tensor:
            buf = t.to(device=self.device, dtype=torch.float64).contiguous()
            return self.all_reduce(buf, group).to(t.device)

        return total

    # ---- stage boundaries

    def agree(self, error: BaseException | None = None, payload=None) -> list:
        """Every process says whether its part of a stage failed, with a payload; returns every
        process's payload, in rank order. If any failed, raises on every process: the first
        failing process re-raises its own error (and prints it, being the only one to), the
        others raise :class:`PeerFailed`."""
        if not self.distributed:
            if error is not None:
                raise error
            return [payload]
        mine = None if error is None else f"{type(error).__name__}: {error}"
        reports = self.gather_objects((mine, payload))
        failed = [(rank, message) for rank, (message, _) in enumerate(reports) if message]
        if failed:
            rank, message = failed[0]
            if rank == self.rank and error is not None:
                raise error
            raise PeerFailed(rank, message)
        return [p for _, p in reports]

    def checked(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, then :meth:`agree`: its result, or an error on every process
        if it failed on any."""
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            self.agree(err)
            raise  # not reached: agree raises
        self.agree()
        return result

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_world(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> World:
    """This process's :class:`World`: one process unless started by torchrun (``WORLD_SIZE`` >
    1), else its rank in the process group, joined with ``timeout`` seconds for every collective.
    ``device`` is ``--device``: ``auto`` or ``cuda`` take the GPU ``cuda:LOCAL_RANK`` (NCCL),
    ``cpu`` the CPU (gloo)."""
    if not launched():
        return World(device=resolve_device(device))
    import torch.distributed as dist

    rank, size = env_rank(), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout}")
    name = resolve_device(device)
    kind = torch.device(name).type
    if kind == "cuda":
        if torch.device(name).index is not None:
            raise ValueError(
                f"--device {device}: with torchrun each process takes the GPU of its local rank "
                "(cuda:LOCAL_RANK); pass --device cuda (or set CUDA_VISIBLE_DEVICES)"
            )
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(
                f"process {rank} has local rank {local} but this node has {count} GPU(s): start "
                f"at most {count} processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        here, backend = torch.device("cuda", local), "nccl"  # RCCL on ROCm
    elif kind == "cpu":
        here, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(
            f"--device {device}: several processes train on GPUs (CUDA or ROCm, nccl) or on "
            "the CPU (gloo)"
        )
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=timeout),
        device_id=here if backend == "nccl" else None,
    )
    return World(rank, size, local, here, timeout)


# ---- which process trains which SAE (--distribute-saes)


def plan_owners(costs: list[float], size: int) -> list[list[int]]:
    """The processes that train each SAE, from each SAE's cost (latents x rows per token): one
    owner each when there are at least as many SAEs as processes, the costliest first to the
    least loaded process (longest processing time first); with fewer SAEs than processes, every
    process gets one SAE and each SAE as many owners as its share of the total cost, which
    split its batch between them (data-parallel)."""
    g = len(costs)
    if g == 0 or size < 1:
        raise ValueError(f"cannot place {g} SAEs on {size} processes")
    if g >= size:
        loads = [0.0] * size
        owners: list[list[int]] = [[] for _ in range(g)]
        for i in sorted(range(g), key=lambda i: (-costs[i], i)):
            rank = min(range(size), key=lambda r: (loads[r], r))
            owners[i] = [rank]
            loads[rank] += costs[i]
        return owners
    counts = [1] * g  # then one more owner at a time to the SAE with the most cost per owner
    for _ in range(size - g):
        i = max(range(g), key=lambda i: (costs[i] / counts[i], -i))
        counts[i] += 1
    owners, start = [], 0
    for count in counts:
        owners.append(list(range(start, start + count)))
        start += count
    return owners
