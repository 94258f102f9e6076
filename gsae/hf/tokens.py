"""Tokens: the text of each token for display (:class:`TokenText`), and the token stream
(:class:`TokenStream`) that tokenizes in a background thread and packs documents into
``ctx_len`` chunks, joined by EOS, no BOS, in time linear in the text; its position (a few
numbers, :class:`StreamPosition`) can be saved and restored exactly (for resuming a run)."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .texts import IterableSource, TextSource


class TokenText:
    """The text of each token of a sequence, for display (the latent browser, auto-interp
    prompts). Tokens are decoded one by one (cached); where that gives a broken character (a
    byte-level BPE splits a multi-byte character over tokens), the sequence is decoded
    incrementally instead, so each token shows the characters it completes ("" for a token
    that completes none)."""

    BROKEN = "\ufffd"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._one: dict[int, str] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def __call__(self, ids: Sequence[int]) -> list[str]:
        ids = [int(i) for i in ids]
        pieces = []
        for i in ids:
            if i not in self._one:
                self._one[i] = self._decode([i])
            pieces.append(self._one[i])
        if not any(self.BROKEN in p for p in pieces):
            return pieces
        out, done = [], ""
        for j in range(len(ids)):
            text = self._decode(ids[: j + 1])
            if text.endswith(self.BROKEN) and j + 1 < len(ids):
                out.append("")  # an unfinished character: shown with the token that ends it
            elif text.startswith(done):
                out.append(text[len(done) :])
                done = text
            else:  # decoding is not prefix-stable here: the token on its own
                out.append(pieces[j])
                done = text
        return out


@dataclass
class StreamPosition:
    """Where a token stream stands after a chunk, in a few numbers whatever the documents' length:
    ``source``, the text source's state before the document being packed (None: the first one);
    ``offset``, how many of that document's tokens (its EOS included) are already emitted;
    ``documents``, how many documents of this pass over the data came before it; ``epoch``, the
    pass (``repeat`` cycles). Restoring it reproduces the rest of the stream exactly, reading
    and tokenizing only that one document again."""

    epoch: int = 0
    documents: int = 0
    source: dict | None = None
    offset: int = 0

    def to_dict(self) -> dict:
        return asdict(self)  # (a copy: the source state is not shared with the saved form)

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(
            int(d.get("epoch", 0)),
            int(d.get("documents", 0)),
            d.get("source"),
            int(d.get("offset", 0)),
        )


@dataclass
class TokenBatch:
    """``input_ids``/``attention_mask`` ``[B, T]``, and the stream position after this batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position: StreamPosition

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


class TokenStream:
    """Packs documents into ``[B, ctx_len]`` batches in a background thread.

    Documents are tokenized without special tokens and joined by EOS (no BOS, as the paper).
    The last, partial chunk of a finite source is padded and masked. ``repeat=True`` cycles over
    a finite source (small local corpora). ``texts`` is a :class:`TextSource` or a function
    returning an iterator of documents. Iterate to get :class:`TokenBatch` objects.

    ``shard=(i, n)`` packs only the documents whose number in each pass is ``i`` modulo ``n``
    (the others are read but not tokenized): n such streams split the text between them, for
    several processes. Positions are those of the whole text, so each shard resumes alone.
    """

    def __init__(
        self,
        texts: TextSource | Callable[[], Iterator[str]],
        tokenizer,
        ctx_len: int = 1024,
        batch_size: int = 8,
        position: StreamPosition | None = None,
        repeat: bool = False,
        prefetch: int = 4,
        docs_per_call: int = 64,
        shard: tuple[int, int] = (0, 1),
    ):
        if ctx_len < 2 or batch_size < 1:
            raise ValueError(f"need ctx_len >= 2 and batch_size >= 1, got {ctx_len}, {batch_size}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
        self.shard = (int(shard[0]), int(shard[1]))
        self.source = texts if isinstance(texts, TextSource) else IterableSource(texts)
        self.tokenizer = tokenizer
        self.ctx_len, self.batch_size = ctx_len, batch_size
        self.start = position or StreamPosition()
        self.repeat = repeat
        self.docs_per_call = docs_per_call
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.eos = eos if eos is not None else tokenizer.sep_token_id  # BERT-style: [SEP]
        self.pad = pad if pad is not None else (self.eos or 0)
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS (or SEP) token to join documents with")
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name="gsae-tokenize")
        self._thread.start()

    # -- worker

    def _documents(self) -> Iterator[tuple[int, int, dict | None, str]]:
        """(epoch, documents before it in the epoch, source state before it, text) from the
        saved position on."""
        epoch, number, state = self.start.epoch, self.start.documents, self.start.source
        index, count = self.shard
        while True:
            read_any, whole_pass = False, state is None
            for text, after in self.source.read(state):
                if number % count == index:
                    read_any = True
                    yield epoch, number, state, text
                number, state = number + 1, after
            if not self.repeat or (whole_pass and not read_any):  # the end, or nothing to cycle
                return
            epoch, number, state = epoch + 1, 0, None

    def _chunks(self) -> Iterator[tuple[np.ndarray, int, StreamPosition]]:
        """(tokens [ctx_len], real length, position after the chunk), tokenizing documents
        ``docs_per_call`` at a time (fast tokenizers run a batch in parallel, outside the GIL).
        Linear in the text: each document's tokens are copied once, chunks are views."""
        ctx = self.ctx_len
        pending = np.empty(0, dtype=np.int64)  # tokens of earlier documents, fewer than ctx
        skip = self.start.offset  # the saved position is inside the first document
        last = None
        documents = self._documents()
        while True:
            block = [doc for _, doc in zip(range(self.docs_per_call), documents, strict=False)]
            if not block:
                break
            ids = self.tokenizer([doc[3] for doc in block], add_special_tokens=False)["input_ids"]
            for (epoch, number, state, _), tokens in zip(block, ids, strict=True):
                doc = np.empty(len(tokens) + 1, dtype=np.int64)
                doc[:-1] = tokens
                doc[-1] = self.eos
                carry = np.concatenate([pending, doc[skip:]])
                done = skip - len(pending)  # tokens of this document emitted, minus the offset
                full = len(carry) // ctx
                for i in range(full):
                    end = (i + 1) * ctx
                    yield (
                        carry[end - ctx : end],
                        ctx,
                        StreamPosition(epoch, number, state, done + end),
                    )
                pending, skip = carry[full * ctx :], 0
                last = StreamPosition(epoch, number, state, len(doc))
        if len(pending):  # a finite source's last, partial chunk: padded, and masked in the batch
            padded = np.full(ctx, self.pad, dtype=np.int64)
            padded[: len(pending)] = pending
            yield padded, len(pending), last

    def _work(self) -> None:
        try:
            rows, lengths = [], []
            for chunk, length, pos in self._chunks():
                rows.append(chunk)
                lengths.append(length)
                if len(rows) == self.batch_size:
                    if not self._put(self._batch(rows, lengths, pos)):
                        return  # closed by the consumer
                    rows, lengths = [], []
            if rows and not self._put(self._batch(rows, lengths, pos)):
                return
            self._put(None)
        except BaseException as err:  # hand it to the consumer
            self._put(err)

    def _batch(self, rows, lengths, pos) -> TokenBatch:
        ids = torch.from_numpy(np.stack(rows))
        mask = torch.arange(self.ctx_len)[None, :] < torch.tensor(lengths)[:, None]
        return TokenBatch(ids, mask.long(), pos)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- consumer

    def __iter__(self) -> Iterator[TokenBatch]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the worker and wait for it (a thread left inside the tokenizer at interpreter
        exit aborts the process)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def next_document(texts: TextSource, position: StreamPosition) -> StreamPosition:
    """The position at the start of the document after the one ``position`` stopped inside
    (itself when no token of that document was emitted): text that shares no document with
    what came before it."""
    if position.offset == 0:
        return position
    with contextlib.closing(texts.read(position.source)) as documents:
        after = next(documents, None)
    if after is None:  # the text ends there
        return position
    return StreamPosition(position.epoch, position.documents + 1, after[1], 0)
