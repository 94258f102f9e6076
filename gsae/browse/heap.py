"""Per-row fixed-size heaps of token windows, filled on the device from sparse top-k latents.

A *row* is one (layer, latent) pair of an SAE. A candidate is one window of ``W`` consecutive
tokens (fixed, non-overlapping windows of each sequence, as EleutherAI's delphi cuts its
examples) in which the row's latent fired; its activation is the latent's largest value in the
window. :class:`WindowHeap` keeps, per row, the ``n`` candidates with the largest *keys* seen so
far, with the window's tokens and the latent's activation at each of its tokens:

- key = the activation: the top-activating windows;
- key = a uniform random number drawn per candidate: a uniform sample without replacement of
  the windows where the latent fired (the n largest of i.i.d. keys are a uniform n-subset),
  i.e. reservoir sampling, in the same code.

Memory is fixed at construction (``rows x n x W`` tokens and activations), whatever the number
of tokens streamed through :meth:`WindowHeap.update`; no per-token Python loop runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Candidates(NamedTuple):
    """Per (window, row) where the row's latent fired in a batch: the row, the window (an
    index into the batch's ``[B * n_windows, W]`` windows), the latent's largest value in the
    window, and ``acts [C, W]``: its value at each token of the window (0 where it did not
    fire)."""

    row: torch.Tensor  # [C] int64
    window: torch.Tensor  # [C] int64
    value: torch.Tensor  # [C] float32
    acts: torch.Tensor  # [C, W] float32


def window_candidates(
    values: torch.Tensor,
    indices: torch.Tensor,
    token_pos: torch.Tensor,
    row_offset: int,
    rows: int,
    window: int,
    seq_len: int,
) -> Candidates:
    """Group the sparse latents of a batch's tokens by (window, latent).

    ``values``/``indices`` ``[N, k]``: the top-k latents of N tokens; ``token_pos [N]``: each
    token's flat position ``b * seq_len + t`` in the ``[B, seq_len]`` batch; rows are
    ``row_offset + latent``, below ``rows``. Windows are ``t // window`` within each
    sequence, numbered ``b * n_windows + t // window``."""
    n_windows = -(-seq_len // window)
    k = values.shape[1]
    on = values.reshape(-1) > 0
    val = values.reshape(-1)[on].float()  # [E]
    row = indices.reshape(-1)[on].long() + row_offset  # [E]
    pos = token_pos.repeat_interleave(k)[on]  # [E]
    b, t = pos // seq_len, pos % seq_len
    win = b * n_windows + t // window  # [E]
    uniq, inverse = torch.unique(win * rows + row, return_inverse=True)  # [C], [E]
    best = torch.zeros(uniq.numel(), dtype=torch.float32, device=val.device)
    best.scatter_reduce_(0, inverse, val, "amax", include_self=False)
    acts = torch.zeros(uniq.numel(), window, dtype=torch.float32, device=val.device)
    acts[inverse, t % window] = val  # one token gives a latent at most one value
    return Candidates(uniq % rows, uniq // rows, best, acts)


class WindowHeap:
    """The ``n`` windows with the largest keys per row, kept sorted by key (descending).

    ``keys [R, n]`` (-inf in empty slots), ``value [R, n]`` (the latent's largest activation in
    the window), ``tokens [R, n, W]`` (token ids, -1 for padding and empty slots), ``acts [R, n,
    W]`` (float16: the latent's value at each token), ``where [R, n]`` (an id of the window's
    place in the stream, -1 when empty)."""

    def __init__(
        self,
        rows: int,
        n: int,
        window: int,
        device=None,
        random: bool = False,
        generator: torch.Generator | None = None,
    ):
        if rows < 1 or n < 1 or window < 1:
            raise ValueError(f"need rows, n and window >= 1, got {rows}, {n}, {window}")
        self.rows, self.n, self.window, self.random = rows, n, window, random
        self.generator = generator
        device = torch.device(device or "cpu")
        self.keys = torch.full((rows, n), float("-inf"), device=device)
        self.value = torch.zeros(rows, n, device=device)
        self.tokens = torch.full((rows, n, window), -1, dtype=torch.int32, device=device)
        self.acts = torch.zeros(rows, n, window, dtype=torch.float16, device=device)
        self.where = torch.full((rows, n), -1, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.value, self.tokens, self.acts, self.where)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def update(self, cand: Candidates, windows: torch.Tensor, where: torch.Tensor) -> None:
        """Offer a batch's candidates. ``windows [B * n_windows, W]``: the batch's token ids cut
        into windows (-1 for padding); ``where [B * n_windows]``: a stream-wide id per window."""
        if cand.row.numel() == 0:
            return
        if self.random:
            keys = torch.rand(cand.row.numel(), device=cand.row.device, generator=self.generator)
        else:
            keys = cand.value
        keep = keys > self.keys[cand.row, -1]  # beats the row's current n-th
        row, keys = cand.row[keep], keys[keep]
        if row.numel() == 0:
            return
        chosen = keep.nonzero().squeeze(1)
        # rank the survivors within their row: by key (descending), then stably by row
        order = torch.argsort(keys, descending=True, stable=True)
        order = order[torch.argsort(row[order], stable=True)]
        row_sorted = row[order]
        first = torch.searchsorted(row_sorted, row_sorted, side="left")
        rank = torch.arange(row_sorted.numel(), device=row.device) - first
        top = rank < self.n
        order, rank, row_sorted = order[top], rank[top], row_sorted[top]
        self._merge(row_sorted, rank, keys[order], chosen[order], cand, windows, where)

    def _merge(self, row, rank, keys, cand_idx, cand: Candidates, windows, where) -> None:
        """Merge the ranked survivors into their rows: ``[U, 2n]`` slots, top n kept."""
        rows, slot_row = torch.unique(row, return_inverse=True)  # [U], [S]
        u, n = rows.numel(), self.n
        new_keys = torch.full((u, n), float("-inf"), device=keys.device)
        new_keys[slot_row, rank] = keys
        new_src = torch.full((u, n), -1, dtype=torch.int64, device=keys.device)
        new_src[slot_row, rank] = cand_idx
        both = torch.cat([self.keys[rows], new_keys], dim=1)  # [U, 2n]
        best, pick = both.topk(n, dim=1)  # sorted, descending
        from_new = pick >= n
        src = torch.gather(new_src, 1, (pick - n).clamp_min(0))  # [U, n] candidate or -1
        old = pick.clamp_max(n - 1)  # [U, n] old slot
        u_idx = rows[:, None].expand(u, n)
        value = torch.where(from_new, cand.value[src.clamp_min(0)], self.value[u_idx, old])
        win = cand.window[src.clamp_min(0)]  # [U, n]
        tokens = torch.where(
            from_new[..., None], windows[win].to(torch.int32), self.tokens[u_idx, old]
        )
        acts = torch.where(
            from_new[..., None], cand.acts[src.clamp_min(0)].half(), self.acts[u_idx, old]
        )
        place = torch.where(from_new, where[win], self.where[u_idx, old])
        self.keys[rows], self.value[rows], self.tokens[rows] = best, value, tokens
        self.acts[rows], self.where[rows] = acts, place

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.{name}": getattr(self, name).cpu()
            for name in ("keys", "value", "tokens", "acts", "where")
        }
