"""The three sparse products every TopK SAE step is made of, for a selection of ``k`` latents
per row given as ``idx [N, k]`` (latent ids) and ``w [N, k]`` (weights):

====================  ==========================================  =============================
op                    computes                                    used for
====================  ==========================================  =============================
``gather_combine``    ``out[n] = b + sum_j w[n,j] * T[idx[n,j]]``   decode; encoder grad of x
``row_dot``           ``out[n,j] = <G[n], T[idx[n,j]]>``            decoder grad of the values
``sparse_transpose``  ``out[i] = sum_{idx[n,j]=i} w[n,j] * X[n]``   grad of W_enc and of W_dec
                      ``out_b[i] = sum_{idx[n,j]=i} w[n,j]``        grad of b_enc
====================  ==========================================  =============================

``T`` is an ``[m, d]`` dictionary (W_enc or W_dec, one row per latent); ``X``/``G`` are
``[N, d]``. Each costs O(N k d) instead of the O(N m d) of a dense product. Every kernel takes
both strides of every matrix it reads (a transposed or sliced weight is read in place, not
copied); the Triton launcher specialises a unit stride, so contiguous inputs pay nothing.

``sparse_transpose`` needs the ``E = N k`` entries grouped by latent: :func:`latent_segments`
sorts them (stable, on the device, with no host sync: the offsets come from a binary search in
the sorted ids) into CSR form (``offsets [m+1]``, ``rows [E]``, ``order [E]``). It is computed
inside each backward that needs it and dropped with it: nothing outlives the step. Every
latent's sum then runs in a fixed order, so gradients are bit-identical from run to run: no
float atomics anywhere.

Triton tiling:

- ``gather_combine``: one program per ``BLOCK_N`` rows x ``BLOCK_D`` columns; it walks the k
  slots, gathering one ``[BLOCK_N, BLOCK_D]`` tile of dictionary rows per slot (contiguous along
  d, so loads coalesce) and skipping the rows whose weight is 0 (ReLU zeros, padded AuxK slots).
- ``row_dot``: one program per ``BLOCK_N`` rows x ``BLOCK_K`` slots; it walks d in
  ``BLOCK_D`` chunks, gathering a ``[BLOCK_N, BLOCK_K, BLOCK_D]`` tile of dictionary rows and
  reducing it against the matching ``[BLOCK_N, BLOCK_D]`` tile of G.
- ``sparse_transpose``: load-balanced, see :func:`sparse_transpose`.

The torch path uses the same decomposition: ``F.embedding_bag`` with per-sample weights for
``gather_combine`` and, on the latent-sorted entries, for ``sparse_transpose``;
``torch.sparse.sampled_addmm`` on the latent-major CSR for ``row_dot``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._backend import cdiv, next_power_of_2, tl, triton

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


# Helpers the kernels here and in topk_encode.py share (@triton.jit: inlined where called).


@triton.jit
def block(axis: tl.constexpr, BLOCK: tl.constexpr, bound):
    """This program's ``BLOCK`` offsets along grid axis ``axis`` (int64: no overflow in the
    pointer arithmetic of large tensors) and their mask ``< bound``."""
    offs = (tl.program_id(axis) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    return offs, offs < bound


@triton.jit
def load_tile(P, rows, cols, stride_r, stride_c, rmask, cmask):
    """``P[rows, cols]`` in fp32, 0 where masked: ``[len(rows), len(cols)]``."""
    return tl.load(
        P + rows[:, None] * stride_r + cols[None, :] * stride_c,
        mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _gather_combine_kernel(
    W,
    IDX,
    T,
    BIAS,
    OUT,
    N,
    D,
    K,
    stride_wn,
    stride_wk,
    stride_in,
    stride_ik,
    stride_tm,
    stride_td,
    stride_b,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, rmask = block(0, BLOCK_N, N)
    cols, cmask = block(1, BLOCK_D, D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(W + rows * stride_wn + j * stride_wk, mask=rmask, other=0.0).to(tl.float32)
        lat = tl.load(IDX + rows * stride_in + j * stride_ik, mask=rmask, other=0).to(tl.int64)
        live = rmask & (w != 0.0)  # a zero weight needs no row: skip its memory traffic
        t = tl.load(
            T + lat[:, None] * stride_tm + cols[None, :] * stride_td,
            mask=live[:, None] & cmask[None, :],
            other=0.0,
        )
        acc += w[:, None] * t.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_b, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + rows[:, None] * D + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _row_dot_kernel(
    G,
    IDX,
    T,
    OUT,
    N,
    D,
    K,
    stride_gn,
    stride_gd,
    stride_in,
    stride_ik,
    stride_tm,
    stride_td,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, rmask = block(0, BLOCK_N, N)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    smask = rmask[:, None] & (slots < K)[None, :]  # [BLOCK_N, BLOCK_K]
    lat = tl.load(
        IDX + rows[:, None] * stride_in + slots[None, :] * stride_ik, mask=smask, other=0
    ).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        cmask = cols < D
        g = load_tile(G, rows, cols, stride_gn, stride_gd, rmask, cmask)  # [BLOCK_N, BLOCK_D]
        t = tl.load(
            T + lat[:, :, None] * stride_tm + cols[None, None, :] * stride_td,
            mask=smask[:, :, None] & cmask[None, None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_K, BLOCK_D]
        acc += tl.sum(t * g[:, None, :], axis=2)
    tl.store(OUT + rows[:, None] * K + slots[None, :], acc.to(OUT.dtype.element_ty), mask=smask)


@triton.jit
def _transpose_tail_kernel(
    OFFS,
    ROWS,
    WS,
    X,
    SHIFT,
    PART,
    PART_B,
    XOFFS,
    PLAT,
    M,
    D,
    SPLIT,
    stride_xn,
    stride_xd,
    stride_s,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Overflow piece q (the piece-th SPLIT entries of a long segment): its partial sums."""
    q = tl.program_id(0)
    cols, cmask = block(1, BLOCK_D, D)
    if q < tl.load(XOFFS + M):  # the grid is an upper bound on the number of pieces
        lat = tl.load(PLAT + q)
        piece = q - tl.load(XOFFS + lat) + 1  # piece 0 is summed by the head kernel
        start = tl.load(OFFS + lat) + piece * SPLIT
        end = tl.minimum(tl.load(OFFS + lat + 1), start + SPLIT)
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_E], dtype=tl.float32)
        if HAS_SHIFT:
            s = tl.load(SHIFT + cols * stride_s, mask=cmask, other=0.0).to(tl.float32)
        for e0 in range(0, SPLIT, BLOCK_E):
            e = start + e0 + tl.arange(0, BLOCK_E)
            emask = e < end
            r = tl.load(ROWS + e, mask=emask, other=0).to(tl.int64)
            w = tl.load(WS + e, mask=emask, other=0.0).to(tl.float32)
            x = load_tile(X, r, cols, stride_xn, stride_xd, emask, cmask)  # [BLOCK_E, BLOCK_D]
            if HAS_SHIFT:
                x -= s[None, :]
            acc += w[:, None] * x
            acc_b += w
        tl.store(PART + q.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cmask)
        if HAS_BIAS:
            if tl.program_id(1) == 0:
                tl.store(PART_B + q, tl.sum(acc_b, axis=0))


@triton.jit
def _sparse_transpose_kernel(
    OFFS,
    ROWS,
    WS,
    X,
    SHIFT,
    OUT,
    OUT_B,
    PART,
    PART_B,
    XOFFS,
    M,
    D,
    SPLIT,
    stride_xn,
    stride_xd,
    stride_s,
    HAS_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Head: the first SPLIT entries of each of BLOCK_L latents, then their tails' partials."""
    lats, lmask = block(0, BLOCK_L, M)
    cols, cmask = block(1, BLOCK_D, D)
    start = tl.load(OFFS + lats, mask=lmask, other=0)  # [BLOCK_L]: each latent's CSR segment
    end = tl.minimum(tl.load(OFFS + lats + 1, mask=lmask, other=0), start + SPLIT)
    longest = tl.max(end - start, axis=0)
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    if HAS_SHIFT:
        s = tl.load(SHIFT + cols * stride_s, mask=cmask, other=0.0).to(tl.float32)
    for e0 in range(0, longest, BLOCK_E):
        e = start[:, None] + e0 + tl.arange(0, BLOCK_E)[None, :]  # [BLOCK_L, BLOCK_E]
        emask = e < end[:, None]
        r = tl.load(ROWS + e, mask=emask, other=0).to(tl.int64)
        w = tl.load(WS + e, mask=emask, other=0.0).to(tl.float32)
        x = tl.load(
            X + r[:, :, None] * stride_xn + cols[None, None, :] * stride_xd,
            mask=emask[:, :, None] & cmask[None, None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_E, BLOCK_D]
        if HAS_SHIFT:
            x -= s[None, None, :]  # masked entries carry w = 0, so they still add nothing
        acc += tl.sum(w[:, :, None] * x, axis=1)
        acc_b += w
    bias = tl.sum(acc_b, axis=1)  # [BLOCK_L]
    if HAS_TAIL:
        # the partial sums of each latent's later pieces, in piece order: a fixed order
        p0 = tl.load(XOFFS + lats, mask=lmask, other=0)
        p1 = tl.load(XOFFS + lats + 1, mask=lmask, other=0)
        for p in range(0, tl.max(p1 - p0, axis=0)):
            pmask = (p0 + p) < p1
            part = tl.load(
                PART + (p0 + p)[:, None] * D + cols[None, :],
                mask=pmask[:, None] & cmask[None, :],
                other=0.0,
            )
            acc += part
            if HAS_BIAS:
                bias += tl.load(PART_B + p0 + p, mask=pmask, other=0.0)
    out_ptrs = OUT + lats[:, None] * D + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=lmask[:, None] & cmask[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(OUT_B + lats, bias.to(OUT_B.dtype.element_ty), mask=lmask)


# --------------------------------------------------------------------------------------------
# Entry grouping
# --------------------------------------------------------------------------------------------


class LatentSegments(NamedTuple):
    """The ``E = N k`` entries of an ``[N, k]`` selection grouped by latent (CSR, latent-major).

    Entry ``e`` of the flattened selection is ``(row e // k, slot e % k)``; sorted position ``p``
    holds entry ``order[p]``, whose row is ``rows[p]``; latent ``i`` owns sorted positions
    ``offsets[i]:offsets[i+1]``.
    """

    order: torch.Tensor  # [E] int64
    rows: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [m + 1] int64


def stable_sort(keys: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of integer ``keys`` in ``[0, bound)``: (the sorted keys, in some integer
    dtype, and the permutation).

    Sorted as int16 (one pass for ``bound <= 2^15``, else two: the low 15 bits, then the rest),
    because torch radix-sorts narrow keys far faster than int64 ones (measured on this project's
    CPU at E = 4096 x 128: 11 ms against 170 ms)."""
    if bound <= 1 << 15:
        values, order = torch.sort(keys.to(torch.int16), stable=True)
        return values, order
    order = torch.sort((keys & 0x7FFF).to(torch.int16), stable=True).indices
    high = keys[order] >> 15
    high = high.to(torch.int16) if bound <= 1 << 30 else high
    order = order[torch.sort(high, stable=True).indices]
    return keys[order], order


def stable_argsort(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """The permutation of :func:`stable_sort`."""
    return stable_sort(keys, bound)[1]


def latent_segments(idx: torch.Tensor, num_latents: int) -> LatentSegments:
    """Sort the entries of ``idx [N, k]`` by latent (stable: each latent's entries keep row
    order, so every sum over them runs in a fixed order)."""
    flat = idx.reshape(-1).long()
    ids, order = stable_sort(flat, num_latents)  # [E] sorted ids, [E]
    # each latent's first sorted position, by binary search in the sorted ids: unlike
    # torch.bincount, which reads the ids' min and max back to the host on a GPU, no sync
    # (latent m's start is E: the bounds stay below m, which fits the ids' int16)
    bounds = torch.arange(num_latents, dtype=ids.dtype, device=idx.device)
    offsets = flat.new_full((num_latents + 1,), flat.numel())
    torch.searchsorted(ids, bounds, out=offsets[:-1])
    rows = torch.div(order, max(1, idx.shape[1]), rounding_mode="floor")
    return LatentSegments(order, rows, offsets)


# --------------------------------------------------------------------------------------------
# Host functions: one per op, each with a Triton and a torch body
# --------------------------------------------------------------------------------------------


def _blocks_d(d: int) -> int:
    return min(128, max(16, next_power_of_2(d)))


# Launch meta-parameters, one function per kernel (tests/kernels/test_aot.py compiles these
# exact configurations for sm_80, sm_90, gfx90a and gfx942 and fails on register spills).


def gather_combine_meta(d: int) -> dict:
    return {"BLOCK_N": 16, "BLOCK_D": _blocks_d(d), "num_warps": 4}


def row_dot_meta(k: int, d: int) -> dict:
    # [8, 16, 32] gathered tiles: no spills on sm_80/sm_90/gfx90a/gfx942
    return {
        "BLOCK_N": 8,
        "BLOCK_K": min(16, next_power_of_2(k)),
        "BLOCK_D": min(32, _blocks_d(d)),
        "num_warps": 4,
    }


def sparse_transpose_meta(d: int) -> dict:
    # [16, 8, 32] gathered tiles over 8 warps: no spills on sm_80/sm_90/gfx90a/gfx942 for every
    # variant the trainer launches, fp32 and bf16 (at [16, 8, 64] and 4 warps the decoder's
    # variant, without shift or bias sums, spilled 16 bytes on sm_80 and bf16's on sm_90)
    return {"BLOCK_L": 16, "BLOCK_E": 8, "BLOCK_D": min(32, _blocks_d(d)), "num_warps": 8}


def transpose_tail_meta(d: int) -> dict:
    return {"BLOCK_E": 32, "BLOCK_D": min(64, _blocks_d(d)), "num_warps": 4}


TAIL_BLOCK = 32  # transpose_tail_meta's BLOCK_E: every split is a multiple of it
MIN_SPLIT = 64


def transpose_split(entries: int, num_latents: int) -> int:
    """Most entries of one latent that one program sums: 8x the mean segment length (at least
    ``MIN_SPLIT``), so a typical step splits nothing while the overflow buffer stays at most
    1/8 of the output (``E / split <= m / 8`` rows)."""
    split = max(MIN_SPLIT, 8 * cdiv(entries, max(1, num_latents)))
    return cdiv(split, TAIL_BLOCK) * TAIL_BLOCK


def _launch(kernel, out: torch.Tensor, blocks, meta: dict, *args, **constants) -> torch.Tensor:
    """Run ``kernel`` with ``meta`` over the grid of ``blocks`` ((size, the meta entry that
    tiles it) per axis), unless ``out`` is empty; return ``out``."""
    if out.numel():
        grid = tuple(cdiv(size, meta[name]) for size, name in blocks)
        kernel[grid](*args, **constants, **meta)
    return out


def gather_combine(
    w: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """``bias + sum_j w[:, j] * table[idx[:, j]]`` -> ``[N, d]`` (contiguous)."""
    n, k = idx.shape
    d = table.shape[1]
    if backend == "triton":
        out = torch.empty(n, d, dtype=table.dtype, device=table.device)
        b = bias if bias is not None else table
        return _launch(
            _gather_combine_kernel,
            out,
            ((n, "BLOCK_N"), (d, "BLOCK_D")),
            gather_combine_meta(d),
            w,
            idx,
            table,
            b,
            out,
            n,
            d,
            k,
            *w.stride(),
            *idx.stride(),
            *table.stride(),
            b.stride(0),
            HAS_BIAS=bias is not None,
        )
    if k == 0 or n == 0:
        out = table.new_zeros(n, d)
    else:
        weights = w.to(table.dtype)
        out = F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")
    return out if bias is None else out.add_(bias)


def row_dot(
    g: torch.Tensor,
    idx: torch.Tensor,
    table: torch.Tensor,
    segs: LatentSegments | None,
    backend: str,
) -> torch.Tensor:
    """``out[n, j] = <g[n], table[idx[n, j]]>`` -> ``[N, k]``."""
    n, k = idx.shape
    d = table.shape[1]
    if backend == "triton":
        out = torch.empty(n, k, dtype=g.dtype, device=g.device)
        blocks = ((n, "BLOCK_N"), (k, "BLOCK_K"))
        strides = (*g.stride(), *idx.stride(), *table.stride())
        return _launch(
            _row_dot_kernel, out, blocks, row_dot_meta(k, d), g, idx, table, out, n, d, k, *strides
        )
    if n * k == 0:
        return g.new_zeros(n, k)
    if table.dtype in (torch.float32, torch.float64) and segs is not None:
        # latent-major SDDMM: each dictionary row is read once for all the rows that chose it;
        # the pattern values must be zeros, not empty: beta=0 still multiplies them (0 * NaN)
        with warnings.catch_warnings():  # torch flags CSR as beta on every construction
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                segs.offsets,
                segs.rows,
                torch.zeros_like(segs.rows, dtype=table.dtype),
                size=(table.shape[0], n),
                check_invariants=False,
            )
        dots = torch.sparse.sampled_addmm(pattern, table, g.t(), beta=0.0).values()
        out = torch.empty(n * k, dtype=g.dtype, device=g.device)
        out[segs.order] = dots.to(g.dtype)
        return out.view(n, k)
    return _row_dot_chunked(g, idx, table)


def _row_dot_chunked(g: torch.Tensor, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # half-precision CPU fallback (sampled_addmm is fp32/fp64 only): gather a chunk, reduce in fp32
    n, k = idx.shape
    out = torch.empty(n, k, dtype=g.dtype, device=g.device)
    step = max(1, (1 << 22) // max(1, k * table.shape[1]))
    for s in range(0, n, step):
        rows = F.embedding(idx[s : s + step], table).float()  # [c, k, d]
        out[s : s + step] = (rows @ g[s : s + step].float().unsqueeze(-1)).squeeze(-1)
    return out


def sparse_transpose(
    segs: LatentSegments,
    w: torch.Tensor,
    x: torch.Tensor,
    num_latents: int,
    with_bias: bool,
    backend: str,
    shift: torch.Tensor | None = None,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out[i] = sum over entries e of latent i of w_e * (x[row_e] - shift)`` and, with
    ``with_bias``, ``out_b[i] = sum w_e`` -> ``([m, d], [m] | None)``.

    ``w`` is the ``[N, k]`` weight of every entry, in the selection's own (unsorted) layout.

    Triton, load-balanced: a latent chosen by every row (common early in training) would
    otherwise cost one program N serial entries while the others idle. Each latent's segment is
    cut into pieces of ``split`` entries (:func:`transpose_split`: 8x the mean segment, at least
    64). ``_transpose_tail_kernel`` sums every piece after the first into an fp32 buffer, one
    program per (piece, ``BLOCK_D`` columns); then ``_sparse_transpose_kernel``, one program per
    ``BLOCK_L`` latents x ``BLOCK_D`` columns, sums the first piece of each of its latents and
    adds that latent's later pieces in piece order, writing each output row once. The grid of
    the tail kernel is the bound ``ceil(E / split)`` on the number of pieces (no host sync; the
    programs beyond the real count return at once). Worst-case work per program: ``split``
    gathered entries (tail), or ``split`` entries of each of ``BLOCK_L`` latents plus
    ``ceil(E / split) - 1 <= m / 8`` partial-sum rows of ``BLOCK_D`` (head); before the split a
    program could walk ``E`` entries. Every sum still runs in a fixed order and no atomics are
    used, so results are bit-identical run to run.
    """
    d = x.shape[1]
    w_sorted = w.reshape(-1)[segs.order]
    if backend == "triton":
        return _sparse_transpose_triton(segs, w_sorted, x, num_latents, with_bias, shift, split)
    if shift is not None:
        x = x - shift
    if w_sorted.numel() == 0:
        out = x.new_zeros(num_latents, d)
        return out, x.new_zeros(num_latents) if with_bias else None
    bags = segs.offsets[:-1]
    w_sorted = w_sorted.to(x.dtype)
    out = F.embedding_bag(segs.rows, x, bags, per_sample_weights=w_sorted, mode="sum")
    if not with_bias:
        return out, None
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    out_b = F.embedding_bag(segs.rows, ones, bags, per_sample_weights=w_sorted, mode="sum")
    return out, out_b.view(-1)


def _sparse_transpose_triton(segs, w_sorted, x, m, with_bias, shift, split):
    d = x.shape[1]
    entries = segs.rows.numel()
    out = torch.empty(m, d, dtype=x.dtype, device=x.device)
    out_b = torch.empty(m, dtype=x.dtype, device=x.device) if with_bias else None
    if out.numel() == 0:
        return out, out_b
    split = split if split is not None else transpose_split(entries, m)
    pieces = cdiv(entries, split) if entries > split else 0  # bound on the overflow pieces
    s = shift if shift is not None else x
    strides = (*x.stride(), s.stride(0) if shift is not None else 0)
    part = part_b = xoffs = out
    if pieces:
        lengths = segs.offsets[1:] - segs.offsets[:-1]  # [m]
        extra = torch.div((lengths - 1).clamp_(min=0), split, rounding_mode="floor")
        xoffs = torch.zeros(m + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(extra, 0, out=xoffs[1:])  # overflow pieces of latent i: xoffs[i]:xoffs[i+1]
        ids = torch.arange(pieces, device=x.device)
        piece_latent = torch.searchsorted(xoffs[1:], ids, right=True)  # [pieces]
        part = torch.empty(pieces, d, dtype=torch.float32, device=x.device)
        part_b = torch.empty(pieces, dtype=torch.float32, device=x.device)
        meta = transpose_tail_meta(d)
        _transpose_tail_kernel[(pieces, cdiv(d, meta["BLOCK_D"]))](
            segs.offsets,
            segs.rows,
            w_sorted,
            x,
            s,
            part,
            part_b,
            xoffs,
            piece_latent,
            m,
            d,
            split,
            *strides,
            HAS_SHIFT=shift is not None,
            HAS_BIAS=with_bias,
            **meta,
        )
    meta = sparse_transpose_meta(d)
    grid = (cdiv(m, meta["BLOCK_L"]), cdiv(d, meta["BLOCK_D"]))
    _sparse_transpose_kernel[grid](
        segs.offsets,
        segs.rows,
        w_sorted,
        x,
        s,
        out,
        out_b if with_bias else out,
        part,
        part_b,
        xoffs,
        m,
        d,
        split,
        *strides,
        HAS_SHIFT=shift is not None,
        HAS_BIAS=with_bias,
        HAS_TAIL=pieces > 0,
        **meta,
    )
    return out, out_b
