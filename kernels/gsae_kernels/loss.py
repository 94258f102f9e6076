"""FVU + AuxK loss of a TopK SAE (paper Appendix B, with squared norms):

    FVU  = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2        (mean over the batch dimension)
    AuxK = sum ||e_hat - e||^2  / sum ||x - mean(x)||^2       e = (x - x_hat).detach()
    loss = FVU + auxk_alpha * AuxK

``e_hat`` (``aux_recon``) is the decode of the AuxK latents without b_dec.

One fused pass (``_fvu_auxk_kernel``: one program per ``BLOCK_N`` rows, walking d in
``BLOCK_D`` chunks) reads x, x_hat and e_hat once, writes the per-element gradient directions
``x_hat - x`` and ``e_hat - e`` and per-program partial sums of the three squared norms, which
the host adds in a fixed order (deterministic). The column mean it centres by is one torch
reduction before it. The backward only scales the stored directions by ``2 * grad / den``:
nothing is re-read. The torch path computes the same quantities with torch ops.

Inputs may have any strides and mixed floating dtypes (each is read in its own dtype and summed
in fp32, or fp64 when an input is fp64; autocast does not change that). The forward is the
custom op ``gsae_kernels::fvu_auxk_loss``; its backward is plain torch, traceable by
torch.compile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from ._backend import (
    cdiv,
    check_floating,
    check_matrix,
    empty_like_none,
    launch_guard,
    next_power_of_2,
    resolve_backend,
    tl,
    triton,
)


class LossOutput(NamedTuple):
    """Scalar losses: ``loss = fvu + auxk_alpha * auxk`` (``auxk`` is 0 without ``aux_recon``)."""

    loss: torch.Tensor
    fvu: torch.Tensor
    auxk: torch.Tensor


@triton.jit
def _fvu_auxk_kernel(
    X,
    XH,
    XA,
    MEAN,
    GF,
    GA,
    PART,
    N,
    D,
    stride_xn,
    stride_xd,
    stride_hn,
    stride_hd,
    stride_an,
    stride_ad,
    HAS_AUX: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    den = tl.zeros([BLOCK_N], dtype=tl.float32)  # per-row partial sums
    num = tl.zeros([BLOCK_N], dtype=tl.float32)
    aux = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0)
        xh = tl.load(
            XH + rows[:, None] * stride_hn + cols[None, :] * stride_hd, mask=mask, other=0.0
        )
        mean = tl.load(MEAN + cols, mask=cols < D, other=0.0)
        x = x.to(tl.float32)
        res = xh.to(tl.float32) - x  # d FVU / d x_hat, up to 2 / den
        centred = tl.where(mask, x - mean[None, :], 0.0)
        den += tl.sum(centred * centred, axis=1)
        num += tl.sum(res * res, axis=1)
        offs = rows[:, None] * D + cols[None, :]
        if WRITE_GRAD:
            tl.store(GF + offs, res, mask=mask)
        if HAS_AUX:
            xa = tl.load(
                XA + rows[:, None] * stride_an + cols[None, :] * stride_ad, mask=mask, other=0.0
            )
            ra = xa.to(tl.float32) + res  # e_hat - e, with e = x - x_hat
            aux += tl.sum(ra * ra, axis=1)
            if WRITE_GRAD:
                tl.store(GA + offs, ra, mask=mask)
    tl.store(PART + pid * 3 + 0, tl.sum(den, axis=0))
    tl.store(PART + pid * 3 + 1, tl.sum(num, axis=0))
    tl.store(PART + pid * 3 + 2, tl.sum(aux, axis=0))


def loss_meta(d: int) -> dict:
    # per-row partial sums keep sm_80 at 80 registers with [8, 128] tiles
    return {"BLOCK_N": 8, "BLOCK_D": min(128, max(16, next_power_of_2(d))), "num_warps": 4}


def _loss_fwd_triton(x, x_hat, aux_recon, write_grad):
    n, d = x.shape
    mean = x.float().mean(0)
    meta = loss_meta(d)
    grid = cdiv(n, meta["BLOCK_N"])
    part = torch.empty(grid, 3, dtype=torch.float32, device=x.device)
    has_aux = aux_recon is not None
    gf = torch.empty(n, d, dtype=torch.float32, device=x.device) if write_grad else None
    ga = torch.empty(n, d, dtype=torch.float32, device=x.device) if write_grad and has_aux else None
    xa = aux_recon if has_aux else x
    _fvu_auxk_kernel[(grid,)](
        x,
        x_hat,
        xa,
        mean,
        gf if gf is not None else part,
        ga if ga is not None else part,
        part,
        n,
        d,
        *x.stride(),
        *x_hat.stride(),
        *xa.stride(),
        HAS_AUX=has_aux,
        WRITE_GRAD=write_grad,
        **meta,
    )
    den, num, aux = part.sum(0).unbind()
    return den, num, aux, mean, gf, ga


def _acc_dtype(*ts):
    """fp32 sums for half and fp32 inputs; fp64 if any input is fp64 (gradcheck)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in ts)
    return torch.float64 if wide else torch.float32


def _loss_fwd_torch(x, x_hat, aux_recon, write_grad):
    acc = _acc_dtype(x, x_hat, aux_recon)
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=0, correction=0)  # one pass, no [N, d] temporary
    den = var.sum() * x.shape[0]
    # [N, d]: kept as the gradient direction; contiguous (a copy only for odd input layouts, as
    # the result of two transposed inputs is transposed) so that it flattens for the dot
    res = (x_hat.to(acc) - xf).contiguous()
    num = torch.dot(res.view(-1), res.view(-1))
    ra = (aux_recon.to(acc) + res).contiguous() if aux_recon is not None else None
    if ra is not None:
        aux = torch.dot(ra.view(-1), ra.view(-1))
    else:
        aux = torch.zeros((), dtype=acc, device=x.device)
    return den, num, aux, mean, res if write_grad else None, ra if write_grad else None


@torch.library.custom_op("gsae_kernels::fvu_auxk_loss", mutates_args=())
def _fvu_auxk_op(
    x: Tensor,
    x_hat: Tensor,
    aux_recon: Tensor | None,
    auxk_alpha: float,
    keep_directions: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, fvu, auxk, den, mean, res, ra): the three losses, then what the backward reads
    (``res``/``ra`` have 0 elements unless ``keep_directions``)."""
    with launch_guard(x):
        fwd = _loss_fwd_triton if backend == "triton" else _loss_fwd_torch
        den, num, aux, mean, res, ra = fwd(x, x_hat, aux_recon, keep_directions)
        fvu = num / den
        # no AuxK term is exactly 0, even for a batch of no variance (den = 0: FVU = inf)
        auxk = aux / den if aux_recon is not None else torch.zeros_like(fvu)
        loss = fvu + auxk_alpha * auxk
    res = res if res is not None else empty_like_none(den)
    ra = ra if ra is not None else empty_like_none(den)
    return loss, fvu, auxk, den, mean, res, ra


@_fvu_auxk_op.register_fake
def _(x, x_hat, aux_recon, auxk_alpha, keep_directions, backend):
    acc = _acc_dtype(x, x_hat, aux_recon)
    n, d = x.shape
    scalars = [x.new_empty((), dtype=acc) for _ in range(4)]
    res = x.new_empty(n, d, dtype=acc) if keep_directions else x.new_empty(0, dtype=acc)
    keep_ra = keep_directions and aux_recon is not None
    ra = x.new_empty(n, d, dtype=acc) if keep_ra else x.new_empty(0, dtype=acc)
    return (*scalars, x.new_empty(d, dtype=acc), res, ra)


def _loss_setup_context(ctx, inputs, output):
    x, x_hat, aux_recon, auxk_alpha, keep, _backend = inputs
    _loss, fvu, auxk, den, mean, res, ra = output
    # without the stored directions (the op called with keep_directions=False) the backward
    # recomputes them from the inputs
    recompute = (x_hat, aux_recon) if not keep else (None, None)
    ctx.save_for_backward(x, den, mean, fvu, auxk, res, ra, *recompute)
    ctx.keep = keep
    ctx.auxk_alpha = auxk_alpha
    ctx.dtypes = (x.dtype, x_hat.dtype, aux_recon.dtype if aux_recon is not None else None)
    ctx.mark_non_differentiable(den, mean, res, ra)
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, g_loss, g_fvu, g_aux, *_):
    x, den, mean, fvu, auxk, res, ra, x_hat, aux_recon = ctx.saved_tensors
    if not ctx.keep:
        res = x_hat.to(mean.dtype) - x.to(mean.dtype)
        ra = aux_recon.to(mean.dtype) + res if aux_recon is not None else None
    zero = torch.zeros((), dtype=den.dtype, device=den.device)
    g_loss = g_loss if g_loss is not None else zero
    c_f = g_loss + (g_fvu if g_fvu is not None else zero)  # total weight on FVU
    c_a = ctx.auxk_alpha * g_loss + (g_aux if g_aux is not None else zero)  # ... on AuxK
    need_x, need_xh, need_xa = ctx.needs_input_grad[:3]
    grad_xh = (res * (2 * c_f / den)).to(ctx.dtypes[1]) if need_xh else None
    grad_xa = None
    if need_xa and ctx.dtypes[2] is not None:
        grad_xa = (ra * (2 * c_a / den)).to(ctx.dtypes[2])
    grad_x = None
    if need_x:
        # x is in the FVU numerator and in both denominators; e = (x - x_hat) is detached
        scale = (c_f * fvu + c_a * auxk) * 2 / den
        grad_x = (-res * (2 * c_f / den) - (x.to(mean.dtype) - mean) * scale).to(ctx.dtypes[0])
    return grad_x, grad_xh, grad_xa, None, None, None


_fvu_auxk_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def fvu_auxk_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    aux_recon: torch.Tensor | None = None,
    auxk_alpha: float = 1 / 32,
    *,
    backend: str | None = None,
) -> LossOutput:
    """FVU + AuxK of a batch, computed (and its gradients written) in one fused pass.

    Args:
        x: ``[N, d]`` target activations, ``N >= 1``.
        x_hat: ``[N, d]`` reconstruction.
        aux_recon: ``[N, d]`` decode of the AuxK latents without b_dec, or None (AuxK = 0).
        auxk_alpha: weight of AuxK in ``loss``.
        backend: ``"triton"``, ``"torch"`` or ``"reference"``; default from the device.

    Returns:
        :class:`LossOutput` of fp32 scalars (fp64 when an input is fp64). The inputs may have
        any strides and different floating dtypes; each gets its gradient in its own dtype.
    """
    check_matrix("x", x, None, None)
    check_matrix("x_hat", x_hat, *x.shape)
    if aux_recon is not None:
        check_matrix("aux_recon", aux_recon, *x.shape)
    check_floating("x", x, x_hat=x_hat, aux_recon=aux_recon)
    if x.shape[0] == 0:
        raise ValueError("x has no rows: the FVU of an empty batch is undefined")
    backend = resolve_backend(x.device, backend, _acc_dtype(x, x_hat, aux_recon))
    if backend == "reference":
        return LossOutput(*reference.fvu_auxk_loss(x, x_hat, aux_recon, auxk_alpha))
    tensors = (x, x_hat, aux_recon)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    alpha = float(auxk_alpha)
    out = torch.ops.gsae_kernels.fvu_auxk_loss(x, x_hat, aux_recon, alpha, keep, backend)
    return LossOutput(*out[:3])
