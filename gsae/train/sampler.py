"""Which layer each group SAE trains on, per token (paper section 3.2).

For every token of a batch and every group, one layer of the group is drawn uniformly, on the
device, independently across tokens, groups and steps; with ``every_layer`` each SAE gets every
layer of its group instead (N tokens -> |group| x N rows, still counted as N tokens). The draws
of a step depend only on (seed, step), so there is no generator state to checkpoint and a
resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch


class GroupBatch(NamedTuple):
    """One group's training batch: ``x [R, d]`` (model units), the model layer of each row
    (``layer [R]``, or one int when all rows come from one layer), and the number of tokens the
    rows stand for."""

    x: torch.Tensor
    layer: torch.Tensor | int
    tokens: int


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed per (run seed, step), unrelated for neighbouring steps."""
    digest = hashlib.blake2b(f"gsae {seed} {step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class LayerSampler:
    """``groups``: the model layers of each group; ``layers``: the model layer of each row of
    the ``[L, N, d]`` activations it is given."""

    def __init__(
        self,
        groups: list[list[int]],
        layers: list[int],
        seed: int,
        device,
        every_layer: bool = False,
    ):
        row_of = {layer: i for i, layer in enumerate(layers)}
        missing = sorted({g for group in groups for g in group} - set(row_of))
        if missing:
            raise ValueError(f"layers {missing} are in a group but not among the rows {layers}")
        self.device = torch.device(device)
        self.groups = [list(g) for g in groups]
        self.rows = [torch.tensor([row_of[x] for x in g], device=device) for g in groups]
        self.layer_ids = [torch.tensor(g, device=device) for g in groups]
        self.single_rows = {g[0]: row_of[g[0]] for g in groups if len(g) == 1}
        self.seed = seed
        self.every_layer = every_layer
        self.generator = torch.Generator(device=self.device)

    def draws(self, step: int, n: int) -> list[torch.Tensor | None]:
        """Per group, the position in the group of the layer drawn for each of ``n`` tokens at
        ``step`` (``[n]``), or None where nothing is drawn (a one-layer group, every layer)."""
        self.generator.manual_seed(step_seed(self.seed, step))
        picks = []
        for rows in self.rows:
            if len(rows) == 1 or self.every_layer:
                picks.append(None)
            else:
                picks.append(
                    torch.randint(len(rows), (n,), generator=self.generator, device=self.device)
                )
        return picks

    def draw(
        self,
        hidden: torch.Tensor,
        step: int,
        positions: torch.Tensor | None = None,
        total: int | None = None,
    ) -> list[GroupBatch]:
        """Each group's batch from the activations ``hidden [L, N, d]`` of training step
        ``step``. With several processes (or data shards), ``hidden`` holds some tokens of a
        batch of ``total``: ``positions [N]`` says which, so that each token gets the layer it
        would get in one process holding the whole batch (draws depend on the batch position)."""
        n = hidden.shape[1]
        picks = self.draws(step, n if positions is None else int(total))
        tokens = None
        batches = []
        per_group = zip(self.groups, self.rows, self.layer_ids, picks, strict=True)
        for group, rows, ids, pick in per_group:
            if len(group) == 1:  # nothing to draw: the layer's rows as they are, no copy
                batches.append(GroupBatch(hidden[self.single_rows[group[0]]], group[0], n))
            elif self.every_layer:  # [|group| * N, d], layer-major
                batches.append(GroupBatch(hidden[rows].flatten(0, 1), ids.repeat_interleave(n), n))
            else:
                if tokens is None:
                    tokens = torch.arange(n, device=self.device)
                if positions is not None:
                    pick = pick[positions]
                batches.append(GroupBatch(hidden[rows[pick], tokens], ids[pick], n))  # [N, d]
        return batches
