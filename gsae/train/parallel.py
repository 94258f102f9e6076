"""One training step of every group SAE, on one process or on several.

- :class:`LocalSteps`: one process holds every SAE and the whole batch.
- :class:`ReplicatedSteps` (the default with several processes): every process holds every SAE
  and its own part of the batch. The FVU and AuxK of the whole batch share one denominator, the
  batch's total variance, so their gradient is the sum over parts of the unnormalised terms'
  gradients divided by it (:meth:`.step.SaeTrainer.backward_part`). Each process writes those
  gradients, every SAE's, with the latents that fired, the parts' statistics and the step's
  flags, into one flat buffer (:class:`GradientBucket`); one ``all_reduce`` per step sums it;
  every process then applies the same update and holds the same weights, bit for bit. The
  dead-latent counters, the logged losses and L0 are those of the whole batch.
- :class:`DistributedSteps` (``--distribute-saes``): each SAE is trained by its owners
  (:func:`gsae.train.distributed.plan_owners`). Every process draws the layers of its own
  tokens for every SAE and sends the drawn rows to the SAE's owner in one ``all_to_all`` per step
  (not one per SAE); the owner trains on the whole batch's rows, as a single process would. With
  fewer SAEs than processes an SAE has several owners, each getting a share of every process's
  rows; they train it data-parallel, as above, within their own process group.

Every process makes the same collective calls in the same order whatever its data: a process
whose shards ran out still takes part, saying so in the step's flags, and then nobody updates
(the data of a step is complete or not used). The same flags carry a Ctrl-C: every process
stops after the same step. Reading them is the step's one host synchronisation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .distributed import World
from .sampler import LayerSampler
from .shards import ShardLayout
from .step import SaeTrainer, StepOutput, mean_output, warmup_split


@dataclass
class Group:
    """One group SAE of the run: its name (its output folder), model layers and trainer (None
    on a process that does not hold it)."""

    name: str
    layers: list[int]
    trainer: SaeTrainer | None


class StepResult(NamedTuple):
    """``outs``: the step's outputs of the SAEs this process trained; ``exhausted``: some process
    had no data for this step (nothing was updated); ``stop``: some process was asked to stop
    (Ctrl-C): every process stops after this step."""

    outs: dict[str, StepOutput]
    exhausted: bool = False
    stop: bool = False


def summarize(out: StepOutput, trainer: SaeTrainer) -> dict:
    """The logged numbers of one SAE's step (reading them syncs the GPU: at log steps only)."""
    return {
        "fvu": float(out.fvu),
        "auxk": float(out.auxk),
        "l0": float(out.l0),
        "dead": float(out.dead_fraction),
        "skipped": int(trainer.skipped_steps),
    }


def weights_digest(trainer: SaeTrainer) -> str:
    """A digest of an SAE's exact weights (to check that replicas are identical)."""
    h = hashlib.sha256()
    for p in trainer.sae.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LocalSteps:
    """Every SAE and the whole batch in this process."""

    def __init__(self, groups: list[Group], sampler: LayerSampler, layout: ShardLayout):
        self.groups = groups
        self.sampler = sampler
        # several shards in one process: layer draws by batch position, as with one per process
        self.positions = None
        if layout.strict:
            self.positions = layout.positions(0, sampler.device)
        self.total = layout.tokens

    def held(self) -> list[Group]:
        return self.groups

    def writes(self) -> list[Group]:
        """The groups whose files this process writes."""
        return self.groups

    def step(self, hidden, step: int, exhausted: bool = False, stop: bool = False) -> StepResult:
        batches = self.sampler.draw(hidden, step, self.positions, self.total)
        outs = {
            g.name: g.trainer.step(b.x, b.layer, check_finite=False, tokens=b.tokens)
            for g, b in zip(self.groups, batches, strict=True)
        }
        return StepResult(outs)

    def metrics(self, outs: dict[str, StepOutput]) -> dict[str, dict]:
        return {g.name: summarize(outs[g.name], g.trainer) for g in self.groups}

    def check_replicas(self, step: int) -> None:
        pass


class _Part(NamedTuple):
    hits: torch.Tensor  # [m]
    stats: torch.Tensor  # [d + 6], see SaeTrainer.backward_part


class GradientBucket:
    """One flat float32 buffer holding, for the SAEs a process trains data-parallel, every
    parameter's gradient (the parameters' ``.grad`` are views into it), the latents that fired
    and the batch statistics, then ``flags`` numbers: one all_reduce sums all of it."""

    def __init__(self, trainers: list[SaeTrainer], device, flags: int = 0):
        sizes = sum(
            sum(p.numel() for p in t.sae.parameters()) + t.sae.m + t.part_stats_size()
            for t in trainers
        )
        self.flat = torch.zeros(sizes + flags, dtype=torch.float32, device=device)
        self._offset = 0
        self.parts: list[_Part] = []
        for t in trainers:
            for p in t.sae.parameters():
                p.grad = self._take(p.numel()).view_as(p)
            self.parts.append(_Part(self._take(t.sae.m), self._take(t.part_stats_size())))
        self.flags = self._take(flags)

    def _take(self, n: int) -> torch.Tensor:
        view = self.flat[self._offset : self._offset + n]
        self._offset += n
        return view

    def zero(self) -> None:
        self.flat.zero_()


def _init_replicas(world: World, group, groups, batches) -> None:
    """The first step's init of ``groups`` (each on its part ``batches``) within process group
    ``group``: the whole batch's statistics, the same on every replica."""
    total = world.summer(group)
    for g, b in zip(groups, batches, strict=True):
        if not g.trainer.initialized:
            g.trainer.initialized = g.trainer.sae.init_from_batch(b.x, b.layer, total) is not None


def _warmup_steps(trainer: SaeTrainer, batches, tokens: int) -> list[tuple[list, int]]:
    """The steps a data-parallel batch makes (several during the batch warm-up, the same number
    on every process: it depends on the whole batch's ``tokens`` and the replicas' common
    state): each step's part of every group's ``batches``, and its tokens."""
    parts = trainer.warmup_parts(tokens)
    if parts == 1:
        return [(list(batches), tokens)]
    split = [warmup_split(b.x, b.layer, tokens, parts) for b in batches]
    counts = split[0][2]
    return [([_Rows(xs[j], ls[j]) for xs, ls, _ in split], counts[j]) for j in range(parts)]


def _data_parallel(world: World, group, groups, batches, bucket: GradientBucket, tokens: int):
    """The data-parallel step of ``groups`` (each on its part ``batches``, initialised) within
    process group ``group``: backward, one all_reduce of ``bucket``, then the update. The
    bucket's flags must be set by the caller before; returns a function applying the update."""
    for g, b, part in zip(groups, batches, bucket.parts, strict=True):
        g.trainer.backward_part(b.x, b.layer, part.hits, part.stats)
    world.all_reduce(bucket.flat, group)

    def apply() -> dict[str, StepOutput]:
        return {
            g.name: g.trainer.apply_reduced(part.hits, part.stats, tokens)
            for g, part in zip(groups, bucket.parts, strict=True)
        }

    return apply


def _mean_outputs(outs: list[dict[str, StepOutput]]) -> dict[str, StepOutput]:
    """Each SAE's numbers over the steps of one batch (several during the batch warm-up)."""
    if len(outs) == 1:
        return outs[0]
    return {name: mean_output([o[name] for o in outs]) for name in outs[0]}


class ReplicatedSteps:
    """Every SAE on every process, each with its own part of the batch (see the module)."""

    FLAGS = 2  # [some process had no data, some process was asked to stop]

    def __init__(
        self, world: World, groups: list[Group], sampler: LayerSampler, layout: ShardLayout
    ):
        self.world, self.groups, self.sampler = world, groups, sampler
        self.positions = layout.positions(world.rank, sampler.device)
        self.total = layout.tokens
        device = groups[0].trainer.sae.W_dec.device
        self.bucket = GradientBucket([g.trainer for g in groups], device, self.FLAGS)

    def held(self) -> list[Group]:
        return self.groups

    def writes(self) -> list[Group]:
        return self.groups if self.world.is_main else []  # replicas: rank 0 writes them all

    def step(self, hidden, step: int, exhausted: bool = False, stop: bool = False) -> StepResult:
        positions = self.positions if hidden.shape[1] == len(self.positions) else None
        if positions is None:  # no data here (used up, or no shard): take part with nothing
            hidden, positions = hidden[:, :0], self.positions[:0]
        batches = self.sampler.draw(hidden, step, positions, self.total)
        _init_replicas(self.world, None, self.groups, batches)
        outs = []
        for j, (part, tokens) in enumerate(
            _warmup_steps(self.groups[0].trainer, batches, self.total)
        ):
            self.bucket.zero()
            self.bucket.flags[0], self.bucket.flags[1] = float(exhausted), float(stop)
            apply = _data_parallel(self.world, None, self.groups, part, self.bucket, tokens)
            if j == 0:  # the flags are the batch's, the same in every warm-up part: read once
                exhausted_any, stop_any = (self.bucket.flags > 0).tolist()  # the step's one sync
                if exhausted_any:  # nothing is updated
                    return StepResult({}, True, stop_any)
            outs.append(apply())
        return StepResult(_mean_outputs(outs), False, stop_any)

    def metrics(self, outs: dict[str, StepOutput]) -> dict[str, dict]:
        # the replicas hold the same numbers: no exchange needed
        return {g.name: summarize(outs[g.name], g.trainer) for g in self.groups}

    def check_replicas(self, step: int) -> None:
        _check_replicas(
            self.world,
            self.groups,
            {g.name: list(range(self.world.size)) for g in self.groups},
            step,
        )


def _split(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` consecutive chunks of ``n`` rows (the first ``n mod parts`` one
    longer), as torch.tensor_split cuts them."""
    base, extra = divmod(n, parts)
    return [base + (j < extra) for j in range(parts)]


class DistributedSteps:
    """Each SAE on its owners only; the drawn rows sent to them (see the module).

    ``owners[i]``: the processes that train group i. ``dtype``: the model's (the activations
    are sent in it); ``d`` the model width."""

    def __init__(
        self,
        world: World,
        groups: list[Group],
        owners: list[list[int]],
        sampler: LayerSampler,
        layout: ShardLayout,
        dtype: torch.dtype,
        d: int,
    ):
        self.world, self.groups, self.owners, self.sampler = world, groups, owners, sampler
        self.total, self.d, self.dtype = layout.tokens, d, dtype
        rank, size = world.rank, world.size
        device = sampler.device
        self.device = device
        self.positions = layout.positions(rank, device)
        tokens = [layout.local_tokens(r) for r in range(size)]
        per_token = [len(g.layers) if sampler.every_layer else 1 for g in groups]
        # chunk[i][r][j]: rows of process r for SAE i that go to its j-th owner
        chunk = [
            [_split(per_token[i] * tokens[r], len(owners[i])) for r in range(size)]
            for i in range(len(groups))
        ]
        # every process asks for every owners' group, in the same order (a collective call)
        self.process_groups = [world.group(o) if len(o) > 1 else None for o in owners]
        self.held_index = [i for i, o in enumerate(owners) if rank in o]
        # what this process sends to each q: per SAE that q owns, its chunk; then a flag row
        self.send_pieces: list[list[tuple[int, int, int]]] = []  # (SAE, first row, rows)
        for q in range(size):
            pieces = []
            for i, o in enumerate(owners):
                if q in o:
                    j = o.index(q)
                    first = sum(chunk[i][rank][:j])
                    pieces.append((i, first, chunk[i][rank][j]))
            self.send_pieces.append(pieces)
        self.send_rows = [sum(p[2] for p in pieces) + 1 for pieces in self.send_pieces]
        # what it receives from each r: its chunk of every SAE it holds, then r's flag row
        self.recv_rows, self.flag_rows, rows_of = [], [], {i: [] for i in self.held_index}
        start = 0
        for r in range(size):
            for i in self.held_index:
                n = chunk[i][r][owners[i].index(rank)]
                rows_of[i].append(torch.arange(start, start + n))
                start += n
            self.flag_rows.append(start)
            start += 1
            self.recv_rows.append(start - sum(self.recv_rows))
        self.recv_index = {i: torch.cat(rows_of[i]).to(device) for i in self.held_index}
        # the layer of every received row: its sender's token's batch position, or (every layer
        # of the group) its place in the sender's layer-major rows
        self.recv_layer: dict[int, torch.Tensor | int] = {}
        for i in self.held_index:
            layers = groups[i].layers
            j = owners[i].index(rank)
            parts = []
            for r in range(size):
                first = sum(chunk[i][r][:j])
                index = torch.arange(first, first + chunk[i][r][j])
                if len(layers) == 1:
                    continue
                if sampler.every_layer:
                    parts.append(index // max(1, tokens[r]))  # the group's layer position
                else:
                    parts.append(layout.positions(r)[index])  # the token's batch position
            if len(layers) == 1:
                self.recv_layer[i] = layers[0]
            else:
                self.recv_layer[i] = torch.cat(parts).to(device)
        self.bucket = {
            i: GradientBucket([groups[i].trainer], groups[i].trainer.sae.W_dec.device)
            for i in self.held_index
            if len(owners[i]) > 1
        }

    def held(self) -> list[Group]:
        return [self.groups[i] for i in self.held_index]

    def writes(self) -> list[Group]:
        """The first owner of each SAE writes it (its co-owners hold the same weights)."""
        return [self.groups[i] for i in self.held_index if self.owners[i][0] == self.world.rank]

    def _send_buffer(self, hidden, step: int, exhausted: bool, stop: bool) -> torch.Tensor:
        flag = torch.zeros(1, self.d, dtype=self.dtype, device=self.device)
        flag[0, 0], flag[0, 1] = float(exhausted), float(stop)
        if exhausted:  # nothing to send but the flags (zeros keep every size as agreed)
            send = torch.zeros(sum(self.send_rows), self.d, dtype=self.dtype, device=self.device)
            ends = torch.tensor(self.send_rows).cumsum(0) - 1  # each process's flag row: its last
            send[ends.to(self.device)] = flag
            return send
        batches = self.sampler.draw(hidden, step, self.positions, self.total)
        pieces = []
        for q_pieces in self.send_pieces:
            for i, first, n in q_pieces:
                pieces.append(batches[i].x[first : first + n])
            pieces.append(flag)
        return torch.cat(pieces)

    def step(self, hidden, step: int, exhausted: bool = False, stop: bool = False) -> StepResult:
        exhausted = exhausted or hidden.shape[1] != len(self.positions)
        send = self._send_buffer(hidden, step, exhausted, stop)
        recv = torch.empty(sum(self.recv_rows), self.d, dtype=send.dtype, device=self.device)
        self.world.all_to_all(recv, send, self.recv_rows, self.send_rows)
        flags = recv[self.flag_rows, :2].amax(0) > 0
        exhausted_any, stop_any = flags.tolist()  # the step's one sync
        if exhausted_any:
            return StepResult({}, True, stop_any)
        picks = None
        outs = {}
        for i in self.held_index:
            group = self.groups[i]
            x = recv[self.recv_index[i]]  # [rows, d]: every process's rows, in rank order
            layer = self.recv_layer[i]
            ids = self.sampler.layer_ids[i]
            if isinstance(layer, torch.Tensor):
                if self.sampler.every_layer:
                    layer = ids[layer]
                else:
                    if picks is None:
                        picks = self.sampler.draws(step, self.total)
                    layer = ids[picks[i][layer]]
            if len(self.owners[i]) == 1:  # the whole batch here: the one-process step
                outs[group.name] = group.trainer.step(
                    x, layer, check_finite=False, tokens=self.total
                )
            else:  # a share of it: data-parallel with the SAE's other owners
                rows, bucket, pg = [_Rows(x, layer)], self.bucket[i], self.process_groups[i]
                _init_replicas(self.world, pg, [group], rows)
                done = []
                for part, tokens in _warmup_steps(group.trainer, rows, self.total):
                    bucket.zero()
                    done.append(_data_parallel(self.world, pg, [group], part, bucket, tokens)())
                outs.update(_mean_outputs(done))
        return StepResult(outs, False, stop_any)

    def metrics(self, outs: dict[str, StepOutput]) -> dict[str, dict]:
        """Every SAE's numbers, from its first owner (a collective: at log steps only)."""
        mine = {g.name: summarize(outs[g.name], g.trainer) for g in self.writes() if g.name in outs}
        merged = {}
        for part in self.world.gather_objects(mine):
            merged.update(part)
        return {g.name: merged[g.name] for g in self.groups if g.name in merged}

    def check_replicas(self, step: int) -> None:
        names = {self.groups[i].name: self.owners[i] for i in range(len(self.groups))}
        _check_replicas(self.world, self.held(), names, step)


class _Rows(NamedTuple):
    x: torch.Tensor
    layer: torch.Tensor | int


class ReplicaMismatch(RuntimeError):
    """Two processes hold different weights for an SAE they should hold identically."""


def _check_replicas(
    world: World, held: list[Group], holders: dict[str, list[int]], step: int
) -> None:
    """Compare the digests of every SAE held by several processes (a collective)."""
    mine = {g.name: weights_digest(g.trainer) for g in held if len(holders[g.name]) > 1}
    digests = world.gather_objects(mine)
    for name, ranks in holders.items():
        seen = {r: digests[r][name] for r in ranks if name in digests[r]}
        if len(set(seen.values())) > 1:
            raise ReplicaMismatch(
                f"step {step}: the copies of {name} differ between processes {sorted(seen)} "
                "(their weights should be identical after every step)"
            )
