"""TopK encoder: ``values, indices = topk(relu((x - b_dec) @ W_enc.T + b_enc), k)`` per row, and
optionally, in the same pass, the top ``k_aux`` latents among the dead ones (for AuxK).

Selection is by the pre-activation (ties between equal pre-activations go to the lower latent
id in the Triton kernel); the values are then ReLU'd, so a row with fewer than ``k`` positive
latents gets value 0 in its spare slots. Order within a row is unspecified (the Triton kernel
returns it sorted, the torch path does not).

Triton backend forward: by default (:func:`resolve_encoder`) one tensor-core GEMM per chunk of
rows and ``torch.topk``, the torch path's, faster on an H200 than the fused kernel below, which
``encoder="fused"`` selects. ``_encode_topk_kernel``: one program owns ``BLOCK_N`` rows and
walks all ``m`` latents in ``BLOCK_M``-column tiles. For each tile it accumulates the
``[BLOCK_N, BLOCK_M]`` pre-activations with ``tl.dot`` over ``BLOCK_D`` slices of d (the
pre-bias is subtracted as x is loaded), packs every pre-activation with its latent id into one
order-preserving int64 key (float bits, sign-fixed, in the high word; the complemented id in the
low word) and merges the tile into a running per-row top-``K_PAD`` buffer with a bitonic network
(as ``tl.topk`` does). The ``[N, m]`` pre-activation matrix never reaches global memory. AuxK is
a second, separate selection over the dead latents only (:func:`_aux_select`: one GEMM over the
gathered dead rows of W_enc, then ``torch.topk``), so its cost follows the number of dead
latents and no kernel buffer grows with k_aux (a per-row top-1024 buffer needs 128 KiB of shared
memory at BLOCK_N = 16: twice an AMD GPU's 64 KiB). Block sizes are powers of two and at least
16, and kernels use only portable ``tl`` ops, so the same code runs on 32-wide NVIDIA warps and
64-wide AMD wavefronts.

Precision (:func:`resolve_precision`): the pre-activation matmul rounds its operands to fp32,
tf32 or bf16 and sums the products in fp32, the same on both backends (Triton: a bf16 copy of
W_enc and ``tl.dot`` on tensor cores, or ``input_precision="tf32"``; torch: the rounded
operands in an fp32 GEMM, on TF32 tensor cores on a CUDA GPU, which hold them exactly). The
values are the rounded GEMM's; the backward reads the fp32 weights and sums in fp32.

Backward (both backends): only the selected entries carry gradient. With ``g = grad_values *
(values > 0)``: ``grad_W_enc[i] = sum_{n,j: idx=i} g[n,j] (x[n] - b_dec)`` and ``grad_b_enc``
by one latent-sorted ``sparse_transpose``; ``grad_x = sum_j g[:, j] W_enc[idx[:, j]]`` by
``gather_combine`` (skipped when x needs no gradient, since then ``grad_b_dec = -grad_b_enc @
W_enc`` gives the pre-bias gradient without touching N x d). No ``[N, m]`` tensor is built.

Every tensor may have any strides: the kernel reads x, W_enc and both biases through both of
their strides, and the torch path hands them to strided torch ops. Forward and backward are the
custom ops ``gsae_kernels::topk_encode`` and ``gsae_kernels::topk_encode_backward`` (fake
implementations for torch.compile, autograd registered), so a compiled SAE step keeps them as
single graph nodes with no graph break.
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from ._backend import (
    cast,
    cdiv,
    check_floating,
    check_matrix,
    check_tensor,
    check_vector,
    compute_dtype,
    empty_like_none,
    launch_guard,
    resolve_backend,
    tl,
    triton,
)
from .sparse_ops import block, gather_combine, latent_segments, load_tile, sparse_transpose


class EncodeOutput(NamedTuple):
    """Sparse latents of a batch: ``values``/``indices`` are ``[N, k]``; ``aux_values``/
    ``aux_indices`` are ``[N, k_aux]`` (the best dead latents, value 0 in slots beyond the number
    of dead latents) or ``None`` when no AuxK selection was asked for."""

    values: torch.Tensor
    indices: torch.Tensor
    aux_values: torch.Tensor | None
    aux_indices: torch.Tensor | None


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

_SENTINEL = tl.constexpr(-9223372036854775807 - 1)  # int64 min: below every packed key


@triton.jit
def _pack(z, lat):
    """Order-preserving int64 key of (pre-activation, latent): larger z first, then lower id."""
    bits = z.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    return (bits.to(tl.int64) << 32) | (0xFFFFFFFF - lat.to(tl.int64))


@triton.jit
def _cas(x, J: tl.constexpr, S: tl.constexpr, DESC: tl.constexpr):
    """Compare-and-swap the partners p and p ^ 2^J of every row of ``x [R, W]``; element p goes
    descending when bit S of p differs from ``DESC`` is false, i.e. runs of 2^S alternate."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    A: tl.constexpr = W >> (J + 1)
    B: tl.constexpr = 1 << J
    a, b = tl.split(tl.permute(tl.reshape(x, [R, A, 2, B]), [0, 1, 3, 2]))  # [R, A, B] each
    p = (tl.arange(0, A)[:, None] << (J + 1)) + tl.arange(0, B)[None, :]  # position of a
    desc = (((p >> S) & 1) ^ DESC)[None, :, :] != 0
    lo = tl.minimum(a, b)
    hi = tl.maximum(a, b)
    ab = tl.join(tl.where(desc, hi, lo), tl.where(desc, lo, hi))  # [R, A, B, 2]
    return tl.reshape(tl.permute(ab, [0, 1, 3, 2]), [R, W])


@triton.jit
def _bitonic_merge(x, LOG_K: tl.constexpr, DESC: tl.constexpr):
    """Sort every bitonic run of 2^LOG_K; run r goes descending iff (r & 1) ^ DESC."""
    for jj in tl.static_range(LOG_K):
        x = _cas(x, LOG_K - 1 - jj, LOG_K, DESC)
    return x


@triton.jit
def _topk_rows(x, LOG_W: tl.constexpr, LOG_K: tl.constexpr, DESC: tl.constexpr):
    """Top 2^LOG_K of every row of ``x [R, 2^LOG_W]``, sorted (descending iff DESC).

    Bitonic top-k, as ``tl.topk`` does it, but with every step a whole-tile op (reshape, split,
    join, max), which the Triton interpreter runs vectorized: sort runs of K with alternating
    directions, then halve (the elementwise max of an ascending and a descending run is a
    bitonic run holding their top K) and re-merge, until one run is left."""
    R: tl.constexpr = x.shape[0]
    K: tl.constexpr = 1 << LOG_K
    for s in tl.static_range(1, LOG_K + 1):
        x = _bitonic_merge(x, s, DESC)
    for _ in tl.static_range(LOG_W - LOG_K):
        pairs = tl.reshape(x, [R, x.shape[1] // (2 * K), 2, K])
        x = tl.reshape(tl.max(pairs, axis=2), [R, x.shape[1] // 2])
        x = _bitonic_merge(x, LOG_K, DESC)
    return x


@triton.jit
def _widen(key, LOG_K: tl.constexpr):
    """Pad ``[R, C]`` keys with sentinels up to ``[R, 2^LOG_K]``."""
    for _ in tl.static_range(LOG_K):
        if key.shape[1] < (1 << LOG_K):
            pad = tl.full(key.shape, _SENTINEL, tl.int64)
            key = tl.reshape(tl.join(key, pad), [key.shape[0], key.shape[1] * 2])
    return key


@triton.jit
def _merge_topk(best, key, LOG_M: tl.constexpr, LOG_K: tl.constexpr):
    """Top-K of (running ``best [R, K]``, sorted descending) and a key tile ``[R, 2^LOG_M]``."""
    if LOG_M < LOG_K:
        top = _topk_rows(_widen(key, LOG_K), LOG_K, LOG_K, 0)
    else:
        top = _topk_rows(key, LOG_M, LOG_K, 0)  # [R, K] ascending
    # descending vs ascending: their elementwise max is the top K of both, as a bitonic run
    return _bitonic_merge(tl.maximum(best, top), LOG_K, 1)


@triton.jit
def _store_topk(best, VALS, IDX, rows, rmask, K: tl.constexpr, K_PAD: tl.constexpr):
    hi = (best >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    z = bits.to(tl.float32, bitcast=True)
    lat = 0xFFFFFFFF - (best & 0xFFFFFFFF)
    valid = best > _SENTINEL  # sentinels fill slots beyond the number of candidates
    val = tl.where(valid, tl.maximum(z, 0.0), 0.0)
    lat = tl.where(valid, lat, 0)
    slots = tl.arange(0, K_PAD)
    offs = rows[:, None] * K + slots[None, :]
    mask = rmask[:, None] & (slots < K)[None, :]
    tl.store(VALS + offs, val.to(VALS.dtype.element_ty), mask=mask)
    tl.store(IDX + offs, lat, mask=mask)


@triton.jit
def _encode_topk_kernel(
    X,
    W,
    B_ENC,
    B_DEC,
    VALS,
    IDX,
    N,
    M,
    D,
    stride_xn,
    stride_xd,
    stride_wm,
    stride_wd,
    stride_be,
    stride_bd,
    K: tl.constexpr,
    LOG_K: tl.constexpr,
    HAS_B_ENC: tl.constexpr,
    HAS_B_DEC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOG_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    K_PAD: tl.constexpr = 1 << LOG_K
    BLOCK_M: tl.constexpr = 1 << LOG_M
    rows, rmask = block(0, BLOCK_N, N)
    best = tl.full([BLOCK_N, K_PAD], _SENTINEL, tl.int64)
    for m0 in range(0, M, BLOCK_M):
        lat = m0 + tl.arange(0, BLOCK_M)
        lmask = lat < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            cmask = cols < D
            x = load_tile(X, rows, cols, stride_xn, stride_xd, rmask, cmask)  # [BLOCK_N, BLOCK_D]
            if HAS_B_DEC:
                b = tl.load(B_DEC + cols * stride_bd, mask=cmask, other=0.0).to(tl.float32)
                x -= b[None, :]
            w = tl.load(
                W + lat[None, :].to(tl.int64) * stride_wm + cols[:, None] * stride_wd,
                mask=lmask[None, :] & cmask[:, None],
                other=0.0,
            )  # [BLOCK_D, BLOCK_M]: W_enc rows read as columns, i.e. W_enc.T
            # a bf16 W (the bf16 precision's copy) makes this a bf16 x bf16 -> fp32 dot
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PRECISION)
        z = acc
        if HAS_B_ENC:
            z += tl.load(B_ENC + lat * stride_be, mask=lmask, other=0.0).to(tl.float32)[None, :]
        key = tl.where(lmask[None, :], _pack(z, lat[None, :]), _SENTINEL)  # [BLOCK_N, BLOCK_M]
        best = _merge_topk(best, key, LOG_M, LOG_K)
    _store_topk(best, VALS, IDX, rows, rmask, K, K_PAD)


# --------------------------------------------------------------------------------------------
# Host forward / backward
# --------------------------------------------------------------------------------------------


PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_precision(precision: str | None, x: torch.Tensor) -> str:
    """The encoder matmul's precision for compute dtype ``x.dtype``: ``"fp32"`` (IEEE),
    ``"tf32"`` or ``"bf16"`` (operands rounded to that format, products summed in fp32).

    None follows torch's own fp32 matmul setting (``torch.backends.cuda.matmul.allow_tf32``),
    as torch.mm would. Only an fp32 computation is rounded (a bf16/fp16/fp64 one already has its
    format); AMD GPUs have no TF32 in Triton, so ``"tf32"`` is fp32 there, on both backends."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    if x.dtype != torch.float32:
        return "fp32"
    if precision is None:
        precision = "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "fp32"
    if precision == "tf32" and torch.version.hip is not None:
        return "fp32"
    return precision


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """``t`` (fp32) rounded to the precision's input format, kept as fp32: a product of two
    such values is exact in fp32, so an fp32 matmul of rounded operands is what a tensor core
    computes (up to the order of the fp32 sums). Round to nearest even."""
    if precision == "bf16":
        return t.to(torch.bfloat16).to(t.dtype)
    if precision == "tf32":  # 10 mantissa bits: clear the low 13, rounding half to even
        bits = t.contiguous().view(torch.int32)
        bits = (bits + (0xFFF + ((bits >> 13) & 1))) & -0x2000
        return bits.view(torch.float32)
    return t


@contextlib.contextmanager
def _matmul_precision(device: torch.device, precision: str):
    """On a CUDA device, let torch.mm use TF32 tensor cores exactly when the operands were
    rounded (a bf16 or tf32 value is exact in TF32, so this is the rounded product); elsewhere
    nothing to set."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    old = flags.allow_tf32
    flags.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        flags.allow_tf32 = old


def encode_meta(k: int, precision: str = "fp32") -> dict:
    """Tiles checked with ptxas and the AMDGCN metadata (tests/kernels/test_aot.py, which
    fails on a spill or on shared memory over a target's limit): no spills on sm_80, sm_90,
    gfx90a or gfx942 for k up to 128, in every precision. bf16 operands take BLOCK_D = 16 (one
    MMA k-step): at 32 the sm_90 code spills 24 bytes (128 registers; 4 warps or BLOCK_M = 64
    would also fit, at half the threads or twice the merges). The AuxK selection is not in this
    kernel (see :func:`_aux_select`), so no buffer grows with k_aux."""
    log_k = (k - 1).bit_length()  # K_PAD = 2^log_k >= k
    return {
        "LOG_K": log_k,
        "BLOCK_N": 16,
        "LOG_M": max(6, min(log_k, 8)),
        "BLOCK_D": 16 if precision == "bf16" else 32,
        "num_warps": 8 if log_k >= 6 else 4,
    }


def kernel_weight_dtype(w_dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the Triton encoder reads W_enc in: a bf16 copy for the bf16 precision (half the
    bytes of the tile loads, and the dot's operands are bf16 either way)."""
    return torch.bfloat16 if precision == "bf16" and w_dtype == torch.float32 else w_dtype


def _aux_candidates(dead_mask: torch.Tensor, limit: int, exact: bool | None = None):
    """The latents AuxK chooses among (``[C]`` ids, C <= limit) and which of them are dead
    (``[C]`` bool, or None when all are). On a CPU exactly the dead ones (``nonzero`` is free
    there); on a GPU, where ``nonzero`` would sync the host, the first ``limit`` of a stable
    sort that puts the dead latents first: ``limit`` is the caller's bound on their number
    (e.g. read a few steps earlier), and any live latent inside it is masked out. ``exact``
    forces either way (None: by the device)."""
    if exact if exact is not None else dead_mask.device.type == "cpu":
        return dead_mask.nonzero().squeeze(1)[:limit], None
    order = torch.sort(dead_mask.to(torch.uint8), descending=True, stable=True).indices
    order = order[:limit]
    return order, dead_mask[order]


def _chunk_rows(n: int, m: int, gpu: bool = False) -> int:
    # CPU: one [rows, m] fp32 buffer of <= 32 MiB, reused by every chunk: big enough for an
    # efficient GEMM, small enough that glibc serves it from the heap (larger blocks are mmap'd,
    # and page-faulted in again on every call). GPU: <= 1 GiB, so a tensor-core GEMM gets
    # thousands of rows (4 chunks at N = m = 32768). Either way memory is bounded for any N.
    budget = 1 << 28 if gpu else 1 << 23  # fp32 elements
    return max(1, min(n, max(64, budget // max(1, m))))


ENCODERS = ("gemm", "fused")
ENCODER_ENV = "GSAE_ENCODER"


def resolve_encoder(encoder: str | None) -> str:
    """The Triton backend's forward: ``"gemm"`` (one tensor-core GEMM per row chunk by cuBLAS or
    hipBLAS, then ``torch.topk``) or ``"fused"`` (``_encode_topk_kernel``: GEMM and selection in
    one kernel, no ``[N, m]`` buffer). None: ``$GSAE_ENCODER``, else ``"gemm"``, which an H200
    ran 2.5-7.6x faster than the fused kernel at Pythia-160M's and Pythia-1B's shapes in every
    precision (benchmarks/results/gpu-h200-2026-12-04-run1.md, -run2.md). The backward is the
    same for both."""
    choice = encoder or os.environ.get(ENCODER_ENV) or "gemm"
    if choice not in ENCODERS:
        raise ValueError(f"encoder (or ${ENCODER_ENV}) must be one of {ENCODERS}, got {choice!r}")
    return choice


_OUT_DTYPE_MM: dict[str, bool] = {}


def native_bf16_mm(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on this device type: bf16
    tensor cores with the fp32 sums written out unrounded, i.e. exactly the bf16 precision's
    product at twice TF32's rate (CUDA, torch >= 2.8). Probed once per device type."""
    kind = torch.device(device).type
    if kind not in _OUT_DTYPE_MM:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_MM[kind] = ok and kind != "cpu"  # a CPU has no bf16 units to gain from
    return _OUT_DTYPE_MM[kind]


def _native(w: Tensor, a: Tensor) -> bool:
    """Whether :func:`_pre_acts` runs the bf16 GEMM with fp32 output (a bf16 copy of the weight
    for rows that are not bf16), which writes its own output: no buffer to pass it."""
    return w.dtype == torch.bfloat16 and a.dtype != torch.bfloat16


def _gemm_buffer(a: Tensor, w: Tensor, rows: int) -> Tensor | None:
    """The ``[rows, C]`` output buffer :func:`_pre_acts` fills, reused by every chunk."""
    return None if _native(w, a) else a.new_empty(rows, w.shape[0])


def _pre_acts(a: Tensor, w: Tensor, b: Tensor | None, precision: str, out: Tensor | None) -> Tensor:
    """``a [c, d] @ w[C, d].T + b`` into ``out [>= c, C]`` (fp32) in the precision. ``w`` is a
    bf16 copy when :func:`native_bf16_mm` (then ``a`` is rounded here), else already rounded."""
    if _native(w, a):
        z = torch.mm(a.to(torch.bfloat16), w.t(), out_dtype=torch.float32)  # [c, C]
        return z.add_(b) if b is not None else z
    a = round_operand(a, precision)
    rows = out[: a.shape[0]]
    return torch.addmm(b, a, w.t(), out=rows) if b is not None else torch.mm(a, w.t(), out=rows)


def _gemm_weight(W_enc: Tensor, precision: str) -> Tensor:
    """W_enc as :func:`_pre_acts` takes it: a bf16 copy for native bf16 GEMMs, else rounded."""
    if precision == "bf16" and W_enc.dtype == torch.float32 and native_bf16_mm(W_enc.device):
        return W_enc.to(torch.bfloat16)
    return round_operand(W_enc, precision)


def _aux_topk(z, cand, dead, ka, out_v, out_i):
    """Top ``ka`` of the candidates' pre-activations ``z [c, C]`` into ``out_v/out_i [c, :ka]``
    (latent ids; a masked live candidate can only fill a slot with value <= 0)."""
    if dead is not None:
        z = z.masked_fill(~dead[None, :], float("-inf"))
    v, i = z.topk(ka, dim=1, sorted=False)
    out_v[:, :ka] = v
    out_i[:, :ka] = cand[i]


def _aux_select(xc, W_enc, b_enc, dead_mask, k_aux, limit, precision, aux_values, aux_indices):
    """AuxK for the Triton path: the top ``k_aux`` dead latents of each row of ``xc = x - b_dec``
    by one GEMM over the candidates only (:func:`_aux_candidates`), in row chunks of bounded
    memory. Its cost follows the number of dead latents, not k_aux or m, and it holds no
    per-row buffer in a kernel, so any k_aux fits every GPU's shared memory."""
    cand, dead = _aux_candidates(dead_mask, limit)
    ka = min(k_aux, cand.shape[0])
    if ka == 0:
        return
    w = _gemm_weight(W_enc.index_select(0, cand), precision)  # [C, d]
    b = b_enc.index_select(0, cand) if b_enc is not None else None
    step = _chunk_rows(xc.shape[0], cand.shape[0], xc.is_cuda)
    buf = _gemm_buffer(xc, w, step)
    with _matmul_precision(xc.device, precision):
        for s in range(0, xc.shape[0], step):
            z = _pre_acts(xc[s : s + step], w, b, precision, buf)  # [c, C]
            _aux_topk(z, cand, dead, ka, aux_values[s : s + step], aux_indices[s : s + step])
    aux_values.relu_()


def _encode_fwd_triton(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, precision, limit):
    n, d = x.shape
    m = W_enc.shape[0]
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    aux_values = torch.zeros(n, k_aux, dtype=x.dtype, device=x.device)
    aux_indices = torch.zeros(n, k_aux, dtype=torch.int64, device=x.device)
    if n == 0:
        return values, indices, aux_values, aux_indices
    w = W_enc.to(kernel_weight_dtype(W_enc.dtype, precision))
    meta = encode_meta(k, "bf16" if w.dtype == torch.bfloat16 else precision)
    b_enc_ = b_enc if b_enc is not None else x
    b_dec_ = b_dec if b_dec is not None else x
    _encode_topk_kernel[(cdiv(n, meta["BLOCK_N"]),)](
        x,
        w,
        b_enc_,
        b_dec_,
        values,
        indices,
        n,
        m,
        d,
        *x.stride(),
        *w.stride(),
        b_enc_.stride(0),
        b_dec_.stride(0),
        K=k,
        HAS_B_ENC=b_enc is not None,
        HAS_B_DEC=b_dec is not None,
        PRECISION="tf32" if precision == "tf32" else "ieee",
        **meta,
    )
    if k_aux > 0:
        xc = x - b_dec if b_dec is not None else x  # [N, d]
        _aux_select(xc, W_enc, b_enc, dead_mask, k_aux, limit, precision, aux_values, aux_indices)
    return values, indices, aux_values, aux_indices


def _encode_fwd_torch(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, precision, limit):
    xc = x - b_dec if b_dec is not None else x  # [N, d]
    n, m = xc.shape[0], W_enc.shape[0]
    values = xc.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64, device=xc.device)
    aux_values = xc.new_zeros(n, k_aux)
    aux_indices = torch.zeros(n, k_aux, dtype=torch.int64, device=xc.device)
    cand, dead = _aux_candidates(dead_mask, limit) if k_aux > 0 else (None, None)
    ka = min(k_aux, cand.numel()) if cand is not None else 0
    w = _gemm_weight(W_enc, precision)
    step = _chunk_rows(n, m, xc.is_cuda)
    buf = _gemm_buffer(xc, w, step)
    with _matmul_precision(xc.device, precision):
        for s in range(0, n, step):
            e = min(n, s + step)
            z = _pre_acts(xc[s:e], w, b_enc, precision, buf)  # [c, m]
            torch.topk(z, k, dim=1, sorted=False, out=(values[s:e], indices[s:e]))
            if ka > 0:  # the same pre-activations, the candidates' columns
                _aux_topk(
                    z.index_select(1, cand), cand, dead, ka, aux_values[s:e], aux_indices[s:e]
                )
    return values.relu_(), indices, aux_values.relu_(), aux_indices


def _encode_bwd(grad_values, grad_aux, saved, needs, backend):
    """Gradients for (x, W_enc, b_enc, b_dec) from the selected entries only (None: not
    needed); ``saved``: (x, W_enc, b_dec, values, indices, aux_values, aux_indices)."""
    x, W_enc, b_dec, values, indices, aux_values, aux_indices = saved
    need_x, need_w, need_be, need_bd = needs
    parts = [
        (g * (v > 0), i)
        for g, v, i in ((grad_values, values, indices), (grad_aux, aux_values, aux_indices))
        if g is not None and i.shape[1] > 0
    ]
    n, d = x.shape
    m = W_enc.shape[0]
    if not parts:  # no gradient reached the values: every input gradient is zero
        zeros = (x.new_zeros(n, d), W_enc.new_zeros(m, d), x.new_zeros(m), x.new_zeros(d))
        return tuple(z if need else None for z, need in zip(zeros, needs, strict=True))
    g = torch.cat([p[0] for p in parts], 1) if len(parts) > 1 else parts[0][0]  # [N, k + k_aux]
    idx = torch.cat([p[1] for p in parts], 1) if len(parts) > 1 else parts[0][1]
    grad_x = gather_combine(g, idx, W_enc, None, backend) if need_x else None
    grad_w = grad_be = None
    if need_w or need_be or (need_bd and grad_x is None):
        segs = latent_segments(idx, m)  # scoped to this call: freed with it
        grad_w, grad_be = sparse_transpose(
            segs, g, x, m, with_bias=True, backend=backend, shift=b_dec
        )
    grad_bd = None
    if need_bd:
        # sum_n grad_x[n] = sum_i grad_b_enc[i] W_enc[i]: no [N, d] product needed
        grad_bd = -grad_x.sum(0) if grad_x is not None else -(grad_be @ W_enc)
    return grad_x, grad_w if need_w else None, grad_be if need_be else None, grad_bd


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as opaque nodes with fake shapes) and their autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("gsae_kernels::topk_encode", mutates_args=())
def _topk_encode_op(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    b_dec: Tensor | None,
    k: int,
    dead_mask: Tensor | None,
    k_aux: int,
    backend: str,
    precision: str,
    aux_limit: int,
    fused: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(values [N, k], indices [N, k], aux_values [N, k_aux], aux_indices [N, k_aux])."""
    with launch_guard(x):
        fwd = _encode_fwd_triton if backend == "triton" and fused else _encode_fwd_torch
        return fwd(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, precision, aux_limit)


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, precision, aux_limit, fused):
    n = x.shape[0]
    return (
        x.new_empty(n, k),
        x.new_empty(n, k, dtype=torch.int64),
        x.new_empty(n, k_aux),
        x.new_empty(n, k_aux, dtype=torch.int64),
    )


@torch.library.custom_op("gsae_kernels::topk_encode_backward", mutates_args=())
def _topk_encode_backward_op(
    grad_values: Tensor | None,
    grad_aux: Tensor | None,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor | None,
    values: Tensor,
    indices: Tensor,
    aux_values: Tensor,
    aux_indices: Tensor,
    need_x: bool,
    need_w: bool,
    need_b_enc: bool,
    need_b_dec: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, W_enc, b_enc, b_dec); a 0-element tensor for each one not needed."""
    with launch_guard(x):
        saved = (x, W_enc, b_dec, values, indices, aux_values, aux_indices)
        needs = (need_x, need_w, need_b_enc, need_b_dec)
        grads = _encode_bwd(grad_values, grad_aux, saved, needs, backend)
    return tuple(g if g is not None else empty_like_none(x) for g in grads)


@_topk_encode_backward_op.register_fake
def _(grad_values, grad_aux, x, W_enc, *rest):
    # rest: b_dec, the 4 selection tensors, need_x, need_w, need_b_enc, need_b_dec, backend
    need_x, need_w, need_b_enc, need_b_dec = rest[-5:-1]
    (n, d), m = x.shape, W_enc.shape[0]
    shapes = ((need_x, (n, d)), (need_w, (m, d)), (need_b_enc, (m,)), (need_b_dec, (d,)))
    return tuple(x.new_empty(shape) if need else empty_like_none(x) for need, shape in shapes)


def _encode_setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, _k, _dead, _k_aux, backend, _precision, _limit, _fused = inputs
    values, indices, aux_values, aux_indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices)
    ctx.backend = backend
    ctx.has_b_enc = b_enc is not None
    ctx.mark_non_differentiable(indices, aux_indices)
    ctx.set_materialize_grads(False)


def _encode_backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_indices):
    saved = ctx.saved_tensors  # the backward op's inputs after the two gradients, in order
    need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
    needs = (need_x, need_w, need_be and ctx.has_b_enc, need_bd and saved[2] is not None)
    grads = torch.ops.gsae_kernels.topk_encode_backward(
        grad_values, grad_aux, *saved, *needs, ctx.backend
    )
    grads = tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    return *grads, *(None,) * 7  # k, dead_mask, k_aux, backend, precision, aux_limit, fused


_topk_encode_op.register_autograd(_encode_backward, setup_context=_encode_setup_context)


# --------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------


def _integer(v) -> int | None:
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _check_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux) -> tuple[int, int]:
    """Check every argument; return k and k_aux as Python ints."""
    k_arg, k_aux_arg = k, k_aux
    check_matrix("x", x, None, None)
    d = x.shape[1]
    check_matrix("W_enc", W_enc, None, d)
    m = W_enc.shape[0]
    check_vector("b_enc", b_enc, m)
    check_vector("b_dec", b_dec, d)
    check_floating("x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    k, k_aux = _integer(k), _integer(k_aux)  # numpy ints and the like are fine
    if k is None or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, m={m}], got {k_arg!r}")
    if k_aux is None or not 0 <= k_aux <= m:
        raise ValueError(f"k_aux must be an integer in [0, m={m}], got {k_aux_arg!r}")
    if k_aux > 0:
        if dead_mask is None:
            raise ValueError("k_aux > 0 needs a dead_mask ([m] bool) to choose AuxK latents from")
        check_tensor("dead_mask", dead_mask)
        if dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (m,):
            raise ValueError(
                f"dead_mask must be a bool tensor of shape ({m},), "
                f"got {dead_mask.dtype} {tuple(dead_mask.shape)}"
            )
        if dead_mask.device != x.device:
            raise ValueError(f"dead_mask is on {dead_mask.device} but x is on {x.device}")
    return k, k_aux


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    b_dec: torch.Tensor | None,
    k: int,
    dead_mask: torch.Tensor | None = None,
    k_aux: int = 0,
    *,
    backend: str | None = None,
    precision: str | None = None,
    aux_limit: int | None = None,
    encoder: str | None = None,
) -> EncodeOutput:
    """TopK SAE encoder with a sparse backward.

    Args:
        x: ``[N, d]`` activations.
        W_enc: ``[m, d]`` encoder, one row per latent. Any strides: a tied encoder such as
            ``decoder.weight.T`` of an ``nn.Linear(m, d)`` is read in place, not copied.
        b_enc: ``[m]`` encoder bias, or None for none.
        b_dec: ``[d]`` pre-bias, subtracted from x before encoding, or None for none.
        k: latents kept per row, ``1 <= k <= m``.
        dead_mask: ``[m]`` bool, the latents AuxK may use; needed when ``k_aux > 0``.
        k_aux: dead latents kept per row for AuxK (0: no AuxK selection).
        backend: ``"triton"``, ``"torch"`` or ``"reference"``; default from the device.
        precision: the encoder matmul's operands, ``"fp32"``, ``"tf32"`` or ``"bf16"``
            (rounded to that format, products summed in fp32; weights and gradients stay in
            their dtype), the same on every backend but the reference; None: torch's own fp32
            matmul setting. See :func:`resolve_precision`.
        aux_limit: on a GPU, how many latents AuxK considers (the dead ones come first; more
            dead latents than this and the later ones are left out): a bound on the number of
            dead latents, read when it costs no sync. None: all m (exact, at the cost of a GEMM
            over every latent). On a CPU the dead latents are found exactly whatever it is.
        encoder: the Triton backend's forward, ``"gemm"`` or ``"fused"`` (see
            :func:`resolve_encoder`); the torch backend always runs the GEMM.

    Returns:
        :class:`EncodeOutput`, in the compute dtype: W_enc's dtype, or the autocast dtype inside
        ``torch.autocast`` (x and the biases are cast to it; their gradients come back in their
        own dtypes). Gradients reach x, W_enc, b_enc and b_dec through the selected entries
        only. Tensors may have any strides; nothing is copied to make them contiguous.
    """
    k, k_aux = _check_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    dtype = compute_dtype(W_enc)
    x, W_enc, b_enc, b_dec = (cast(t, dtype) for t in (x, W_enc, b_enc, b_dec))
    backend = resolve_backend(x.device, backend, dtype)
    precision = resolve_precision(precision, x)
    fused = resolve_encoder(encoder) == "fused"
    m = W_enc.shape[0]
    limit = m if aux_limit is None else _integer(aux_limit)
    if limit is None or limit < 0:
        raise ValueError(f"aux_limit must be None or an integer >= 0, got {aux_limit!r}")
    dead_mask = dead_mask if k_aux > 0 else None
    if backend == "reference":
        b_enc = b_enc if b_enc is not None else x.new_zeros(m)
        b_dec = b_dec if b_dec is not None else x.new_zeros(x.shape[1])
        return EncodeOutput(*reference.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux))
    out = torch.ops.gsae_kernels.topk_encode(
        x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, precision, min(limit, m), fused
    )
    values, indices, aux_values, aux_indices = out
    if k_aux == 0:
        return EncodeOutput(values, indices, None, None)
    return EncodeOutput(values, indices, aux_values, aux_indices)
