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
``[N, d]``. Each costs O(N k d) instead of the O(N m d) of a dense product.

``sparse_transpose`` needs the ``N k`` entries grouped by latent: :func:`latent_segments`
sorts them once (stable, on the device, no host sync) into CSR form (``offsets [m+1]``,
``rows [E]``, ``order [E]``). Every latent's sum then runs in a fixed order, so gradients are
bit-identical from run to run: no float atomics anywhere.

Triton tiling:

- ``gather_combine``: one program per ``BLOCK_N`` rows x ``BLOCK_D`` columns; it walks the k
  slots, gathering one ``[BLOCK_N, BLOCK_D]`` tile of dictionary rows per slot (contiguous along
  d, so loads coalesce) and skipping the rows whose weight is 0 (ReLU zeros, padded AuxK slots).
- ``row_dot``: one program per ``BLOCK_N`` rows x ``BLOCK_K`` slots; it walks d in
  ``BLOCK_D`` chunks, gathering a ``[BLOCK_N, BLOCK_K, BLOCK_D]`` tile of dictionary rows and
  reducing it against the matching ``[BLOCK_N, BLOCK_D]`` tile of G.
- ``sparse_transpose``: one program per ``BLOCK_L`` latents x ``BLOCK_D`` columns; it walks the
  latents' CSR segments side by side, ``BLOCK_E`` entries of each at a time, gathering a
  ``[BLOCK_L, BLOCK_E, BLOCK_D]`` tile of X rows (a latent is chosen by ~N k / m rows, so the
  loop is short) and writes each output row exactly once.

The torch path uses the same decomposition: ``F.embedding_bag`` with per-sample weights for
``gather_combine`` and, on the latent-sorted entries, for ``sparse_transpose``;
``torch.sparse.sampled_addmm`` on the latent-major CSR for ``row_dot``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._backend import tl, triton

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gather_combine_kernel(
    W, IDX, T, BIAS, OUT,
    N, D, K, stride_t, stride_o,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        w = tl.load(W + rows * K + j, mask=rmask, other=0.0).to(tl.float32)  # [BLOCK_N]
        lat = tl.load(IDX + rows * K + j, mask=rmask, other=0).to(tl.int64)
        live = rmask & (w != 0.0)  # a zero weight needs no row: skip its memory traffic
        t = tl.load(
            T + lat[:, None] * stride_t + cols[None, :],
            mask=live[:, None] & cmask[None, :],
            other=0.0,
        )
        acc += w[:, None] * t.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + rows[:, None] * stride_o + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _row_dot_kernel(
    G, IDX, T, OUT,
    N, D, K, stride_g, stride_t,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < N
    smask = rmask[:, None] & (slots < K)[None, :]  # [BLOCK_N, BLOCK_K]
    lat = tl.load(IDX + rows[:, None] * K + slots[None, :], mask=smask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(
            G + rows[:, None] * stride_g + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        t = tl.load(
            T + lat[:, :, None] * stride_t + cols[None, None, :],
            mask=smask[:, :, None] & cmask[None, None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_K, BLOCK_D]
        acc += tl.sum(t * g[:, None, :], axis=2)
    tl.store(OUT + rows[:, None] * K + slots[None, :], acc.to(OUT.dtype.element_ty), mask=smask)


@triton.jit
def _sparse_transpose_kernel(
    OFFS, ROWS, WS, X, OUT, OUT_B,
    M, D, stride_x, stride_o,
    HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    lats = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lmask = lats < M
    cmask = cols < D
    start = tl.load(OFFS + lats, mask=lmask, other=0)  # [BLOCK_L]: each latent's CSR segment
    end = tl.load(OFFS + lats + 1, mask=lmask, other=0)
    longest = tl.max(end - start, axis=0)
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    for e0 in range(0, longest, BLOCK_E):
        e = start[:, None] + e0 + tl.arange(0, BLOCK_E)[None, :]  # [BLOCK_L, BLOCK_E]
        emask = e < end[:, None]
        r = tl.load(ROWS + e, mask=emask, other=0).to(tl.int64)
        w = tl.load(WS + e, mask=emask, other=0.0).to(tl.float32)
        x = tl.load(
            X + r[:, :, None] * stride_x + cols[None, None, :],
            mask=emask[:, :, None] & cmask[None, None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_L, BLOCK_E, BLOCK_D]
        acc += tl.sum(w[:, :, None] * x, axis=1)
        acc_b += w
    out_ptrs = OUT + lats[:, None] * stride_o + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=lmask[:, None] & cmask[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            bias = tl.sum(acc_b, axis=1)
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


_last_segments: list = []  # [(idx, version, num_latents, segments)]: one entry, see below


def latent_segments(idx: torch.Tensor, num_latents: int) -> LatentSegments:
    """Sort the entries of ``idx [N, k]`` by latent.

    The decoder's backward and then the encoder's backward of one SAE step group the same
    indices: the last result is kept (with a reference to ``idx``, so its memory cannot be reused
    by another tensor while cached; the version counter catches in-place edits) and reused.
    """
    if _last_segments:
        cached, version, m, segs = _last_segments[0]
        same = cached.data_ptr() == idx.data_ptr() and cached.shape == idx.shape
        if same and version == idx._version and m == num_latents and cached.dtype == idx.dtype:
            return segs
    segs = _sort_by_latent(idx, num_latents)
    _last_segments[:] = [(idx, idx._version, num_latents, segs)]
    return segs


def _sort_by_latent(idx: torch.Tensor, num_latents: int) -> LatentSegments:
    flat = idx.reshape(-1)
    # stable: entries of one latent keep row order, so the sums below run in a fixed order
    _, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_latents)
    offsets = torch.zeros(num_latents + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    rows = torch.div(order, idx.shape[1], rounding_mode="floor")
    return LatentSegments(order, rows, offsets)


# --------------------------------------------------------------------------------------------
# Host functions: one per op, each with a Triton and a torch body
# --------------------------------------------------------------------------------------------


def _blocks_d(d: int) -> int:
    return min(128, max(16, triton.next_power_of_2(d)))


# Launch meta-parameters, one function per kernel (tests/test_triton_compile.py compiles these
# exact configurations for sm_80 and gfx90a and reports registers and spills).


def gather_combine_meta(d: int) -> dict:
    return {"BLOCK_N": 16, "BLOCK_D": _blocks_d(d), "num_warps": 4}


def row_dot_meta(k: int, d: int) -> dict:
    # [8, 16, 32] gathered tiles: <= 168 registers on sm_80, no spills
    return {"BLOCK_N": 8, "BLOCK_K": min(16, triton.next_power_of_2(k)),
            "BLOCK_D": min(32, _blocks_d(d)), "num_warps": 4}  # fmt: skip


def sparse_transpose_meta(d: int) -> dict:
    # [16, 8, 64] gathered tiles: <= 168 registers on sm_80, no spills
    return {"BLOCK_L": 16, "BLOCK_E": 8, "BLOCK_D": min(64, _blocks_d(d)), "num_warps": 4}


def gather_combine(
    w: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """``bias + sum_j w[:, j] * table[idx[:, j]]`` -> ``[N, d]``."""
    n, k = idx.shape
    d = table.shape[1]
    if backend == "triton":
        out = torch.empty(n, d, dtype=table.dtype, device=table.device)
        meta = gather_combine_meta(d)
        grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))
        _gather_combine_kernel[grid](
            w.contiguous(), idx.contiguous(), table, bias if bias is not None else table, out,
            n, d, k, table.stride(0), out.stride(0), HAS_BIAS=bias is not None, **meta,
        )  # fmt: skip
        return out
    out = F.embedding_bag(idx, table, per_sample_weights=w.to(table.dtype), mode="sum")
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
        meta = row_dot_meta(k, d)
        grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))
        _row_dot_kernel[grid](
            g, idx.contiguous(), table, out, n, d, k, g.stride(0), table.stride(0), **meta
        )
        return out
    if table.dtype in (torch.float32, torch.float64) and segs is not None:
        # latent-major SDDMM: each dictionary row is read once for all the rows that chose it;
        # the pattern values must be zeros, not empty: beta=0 still multiplies them (0 * NaN)
        with warnings.catch_warnings():  # torch flags CSR as beta on every construction
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                segs.offsets, segs.rows, torch.zeros_like(segs.rows, dtype=table.dtype),
                size=(table.shape[0], n), check_invariants=False,
            )  # fmt: skip
        dots = torch.sparse.sampled_addmm(pattern, table, g.t(), beta=0.0).values()
        out = torch.empty(n * k, dtype=g.dtype, device=g.device)
        out[segs.order] = dots
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out[i] = sum over entries e of latent i of w_e * x[row_e]`` -> ``([m, d], [m] | None)``.

    ``w`` is the ``[N, k]`` weight of every entry, in the selection's own (unsorted) layout.
    """
    d = x.shape[1]
    w_sorted = w.reshape(-1)[segs.order]
    if backend == "triton":
        out = torch.empty(num_latents, d, dtype=x.dtype, device=x.device)
        out_b = torch.empty(num_latents, dtype=x.dtype, device=x.device) if with_bias else None
        meta = sparse_transpose_meta(d)
        grid = (triton.cdiv(num_latents, meta["BLOCK_L"]), triton.cdiv(d, meta["BLOCK_D"]))
        _sparse_transpose_kernel[grid](
            segs.offsets, segs.rows, w_sorted.contiguous(), x, out,
            out_b if out_b is not None else out,
            num_latents, d, x.stride(0), out.stride(0), HAS_BIAS=with_bias, **meta,
        )  # fmt: skip
        return out, out_b
    bags = segs.offsets[:-1]
    w_sorted = w_sorted.to(x.dtype)
    out = F.embedding_bag(segs.rows, x, bags, per_sample_weights=w_sorted, mode="sum")
    if not with_bias:
        return out, None
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    out_b = F.embedding_bag(segs.rows, ones, bags, per_sample_weights=w_sorted, mode="sum")
    return out, out_b.view(-1)
