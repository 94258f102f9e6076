"""The token stream of a run split into shards, so that several processes each read their own.

A run with S data shards (``--data-shards``, by default its number of processes when it
starts) splits the text by document: shard s packs the documents whose number is s modulo S
(gsae.hf.tokens.TokenStream with ``shard=(s, S)``). Each training step's batch of B sequences
is made of B/S sequences of every shard (the first B mod S shards give one more), side by side
in shard order; a process reads the shards s with ``s mod world size == rank`` and holds their
part of the batch. So the batches of a run depend on S alone: the same on 1 process or N, and
a run resumes on another number of processes from each shard's own position (a few numbers
per shard in the checkpoint).

With one shard and one process the stream is the plain one, whose last partial batch (a finite
text without ``--repeat``) is padded and trained on. With several, a step needs every part full
(every process then holds a known number of tokens, and no count has to be exchanged): the data
ends at the first shard that cannot fill its part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..hf.texts import TextSource
from ..hf.tokens import StreamPosition, TokenStream


@dataclass(frozen=True)
class ShardLayout:
    """How a step's batch of ``batch_size`` sequences of ``ctx_len`` tokens is made of
    ``shards`` parts, and which processes hold which (``world`` processes)."""

    shards: int
    batch_size: int
    ctx_len: int
    world: int = 1

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError(f"--data-shards must be >= 1, got {self.shards}")
        if self.batch_size < self.shards:
            raise ValueError(
                f"a step's batch holds {self.batch_size} sequence(s) of {self.ctx_len} tokens, "
                f"fewer than the {self.shards} data shards (one per process when the run "
                f"started): raise --batch-tokens to at least {self.shards * self.ctx_len}"
            )

    @property
    def strict(self) -> bool:
        """Whether every part of a step must be full (several shards or processes)."""
        return self.shards > 1 or self.world > 1

    @property
    def tokens(self) -> int:
        """Tokens of a whole step's batch."""
        return self.batch_size * self.ctx_len

    def rows(self, shard: int) -> int:
        """Sequences of shard ``shard`` in each step's batch."""
        base, extra = divmod(self.batch_size, self.shards)
        return base + (shard < extra)

    def first_row(self, shard: int) -> int:
        return sum(self.rows(s) for s in range(shard))

    def owned(self, rank: int) -> list[int]:
        """The shards process ``rank`` reads."""
        return [s for s in range(self.shards) if s % self.world == rank]

    def local_tokens(self, rank: int) -> int:
        """Tokens process ``rank`` holds of each step's batch."""
        return sum(self.rows(s) for s in self.owned(rank)) * self.ctx_len

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """``[local tokens]``: where each token process ``rank`` holds sits in a step's batch
        (flattened ``[batch_size, ctx_len]``), in the order the process holds them."""
        parts = [
            torch.arange(
                self.first_row(s) * self.ctx_len, (self.first_row(s) + self.rows(s)) * self.ctx_len
            )
            for s in self.owned(rank)
        ]
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return flat.to(device)


class LocalBatch(NamedTuple):
    """A process's part of a step's batch: ``input_ids``/``attention_mask`` ``[b, T]`` (b may be
    0) and, per shard it read, the stream position after its part."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: dict[int, StreamPosition]


class ShardStreams:
    """The shards process ``rank`` reads, from ``positions`` (shard -> position, None or absent:
    the start); iterating yields its :class:`LocalBatch` of each step, and ends when a shard
    cannot give its full part (or, with one shard and one process, when the text ends)."""

    def __init__(
        self,
        texts: TextSource,
        tokenizer,
        layout: ShardLayout,
        rank: int = 0,
        positions: dict[int, StreamPosition | None] | None = None,
        repeat: bool = False,
    ):
        self.layout = layout
        self.shards = layout.owned(rank)
        positions = positions or {}
        self.streams = [
            TokenStream(
                texts,
                tokenizer,
                layout.ctx_len,
                layout.rows(s),
                positions.get(s),
                repeat,
                shard=(s, layout.shards),
            )
            for s in self.shards
        ]

    def __iter__(self):
        layout, ctx = self.layout, self.layout.ctx_len
        iterators = [iter(stream) for stream in self.streams]
        while True:
            if not iterators:  # a process with no shard (more processes than shards)
                empty = torch.zeros(0, ctx, dtype=torch.int64)
                yield LocalBatch(empty, empty.clone(), {})
                continue
            parts = [next(it, None) for it in iterators]
            if not layout.strict:  # the plain stream: a last partial batch is padded and trained
                if parts[0] is None:
                    return
                batch = parts[0]
                yield LocalBatch(batch.input_ids, batch.attention_mask, {0: batch.position})
                continue
            for s, part in zip(self.shards, parts, strict=True):
                if part is None or part.input_ids.shape[0] != layout.rows(s):
                    return
                if not bool(part.attention_mask.all()):
                    return
            yield LocalBatch(
                torch.cat([p.input_ids for p in parts]),
                torch.cat([p.attention_mask for p in parts]),
                {s: p.position for s, p in zip(self.shards, parts, strict=True)},
            )

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def __enter__(self) -> ShardStreams:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def furthest(positions: list[dict | None]) -> dict | None:
    """Of the shards' positions (as dicts), the furthest into the text: every document after it
    is still unread by every shard (where evaluation can find held-out text)."""
    known = [p for p in positions if p]
    if not known:
        return None
    return max(known, key=lambda p: (p.get("epoch", 0), p.get("documents", 0), p.get("offset", 0)))
