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
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference
from ._backend import check_matrix, check_same, resolve_backend, tl, triton


class LossOutput(NamedTuple):
    """Scalar losses: ``loss = fvu + auxk_alpha * auxk`` (``auxk`` is 0 without ``aux_recon``)."""

    loss: torch.Tensor
    fvu: torch.Tensor
    auxk: torch.Tensor


@triton.jit
def _fvu_auxk_kernel(
    X, XH, XA, MEAN, GF, GA, PART,
    N, D, stride_x, stride_xh, stride_xa,
    HAS_AUX: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    den = tl.zeros([BLOCK_N], dtype=tl.float32)  # per-row partial sums
    num = tl.zeros([BLOCK_N], dtype=tl.float32)
    aux = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        xh = tl.load(XH + rows[:, None] * stride_xh + cols[None, :], mask=mask, other=0.0)
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
            xa = tl.load(XA + rows[:, None] * stride_xa + cols[None, :], mask=mask, other=0.0)
            ra = xa.to(tl.float32) + res  # e_hat - e, with e = x - x_hat
            aux += tl.sum(ra * ra, axis=1)
            if WRITE_GRAD:
                tl.store(GA + offs, ra, mask=mask)
    tl.store(PART + pid * 3 + 0, tl.sum(den, axis=0))
    tl.store(PART + pid * 3 + 1, tl.sum(num, axis=0))
    tl.store(PART + pid * 3 + 2, tl.sum(aux, axis=0))


def loss_meta(d: int) -> dict:
    # per-row partial sums keep sm_80 at 80 registers with [8, 128] tiles
    return {"BLOCK_N": 8, "BLOCK_D": min(128, max(16, triton.next_power_of_2(d))), "num_warps": 4}


def _loss_fwd_triton(x, x_hat, aux_recon, write_grad):
    n, d = x.shape
    mean = x.float().mean(0)
    meta = loss_meta(d)
    grid = triton.cdiv(n, meta["BLOCK_N"])
    part = torch.empty(grid, 3, dtype=torch.float32, device=x.device)
    gf = torch.empty(n, d, dtype=torch.float32, device=x.device) if write_grad else part
    has_aux = aux_recon is not None
    ga = torch.empty(n, d, dtype=torch.float32, device=x.device) if write_grad and has_aux else gf
    xa = aux_recon if has_aux else x
    _fvu_auxk_kernel[(grid,)](
        x, x_hat, xa, mean, gf, ga, part,
        n, d, x.stride(0), x_hat.stride(0), xa.stride(0),
        HAS_AUX=has_aux, WRITE_GRAD=write_grad, **meta,
    )  # fmt: skip
    den, num, aux = part.sum(0).unbind()
    return den, num, aux, mean, gf if write_grad else None, ga if write_grad and has_aux else None


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _loss_fwd_torch(x, x_hat, aux_recon, write_grad):
    acc = _acc_dtype(x)  # half inputs are summed in fp32; fp64 stays fp64 (gradcheck)
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=0, correction=0)  # one pass, no [N, d] temporary
    den = var.sum() * x.shape[0]
    res = x_hat.to(acc) - xf  # [N, d]: kept as the gradient direction
    num = torch.dot(res.view(-1), res.view(-1))
    ra = aux_recon.to(acc) + res if aux_recon is not None else None
    aux = torch.dot(ra.view(-1), ra.view(-1)) if ra is not None else torch.zeros((), dtype=acc)
    return den, num, aux, mean, res if write_grad else None, ra if write_grad else None


class FvuAuxkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat, aux_recon, auxk_alpha, backend):
        write_grad = any(ctx.needs_input_grad[:3])  # no buffers under no_grad / for eval
        fwd = _loss_fwd_triton if backend == "triton" else _loss_fwd_torch
        den, num, aux, mean, res, ra = fwd(x, x_hat, aux_recon, write_grad)
        fvu, auxk = num / den, aux / den
        ctx.save_for_backward(x, mean, den, fvu, auxk, res, ra)
        ctx.auxk_alpha = auxk_alpha
        ctx.dtypes = (x.dtype, x_hat.dtype, aux_recon.dtype if aux_recon is not None else None)
        ctx.set_materialize_grads(False)
        return fvu + auxk_alpha * auxk, fvu, auxk

    @staticmethod
    def backward(ctx, g_loss, g_fvu, g_aux):
        x, mean, den, fvu, auxk, res, ra = ctx.saved_tensors
        zero = torch.zeros((), dtype=den.dtype, device=den.device)
        g_loss = g_loss if g_loss is not None else zero
        c_f = g_loss + (g_fvu if g_fvu is not None else zero)  # total weight on FVU
        c_a = ctx.auxk_alpha * g_loss + (g_aux if g_aux is not None else zero)  # ... on AuxK
        need_x, need_xh, need_xa = ctx.needs_input_grad[:3]
        grad_xh = (res * (2 * c_f / den)).to(ctx.dtypes[1]) if need_xh else None
        grad_xa = (ra * (2 * c_a / den)).to(ctx.dtypes[2]) if need_xa and ra is not None else None
        grad_x = None
        if need_x:
            # x is in the FVU numerator and in both denominators; e = (x - x_hat) is detached
            scale = (c_f * fvu + c_a * auxk) * 2 / den
            grad_x = (-res * (2 * c_f / den) - (x.to(mean.dtype) - mean) * scale).to(ctx.dtypes[0])
        return grad_x, grad_xh, grad_xa, None, None


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
        x: ``[N, d]`` target activations.
        x_hat: ``[N, d]`` reconstruction.
        aux_recon: ``[N, d]`` decode of the AuxK latents without b_dec, or None (AuxK = 0).
        auxk_alpha: weight of AuxK in ``loss``.
        backend: ``"triton"``, ``"torch"`` or ``"reference"``; default from the device.

    Returns:
        :class:`LossOutput` of fp32 scalars.
    """
    check_matrix("x", x, None, None)
    check_matrix("x_hat", x_hat, *x.shape)
    if aux_recon is not None:
        check_matrix("aux_recon", aux_recon, *x.shape)
    check_same("x", x, x_hat=x_hat, aux_recon=aux_recon)
    backend = resolve_backend(x.device, backend)
    if backend == "reference":
        return LossOutput(*reference.fvu_auxk_loss(x, x_hat, aux_recon, auxk_alpha))
    return LossOutput(*FvuAuxkFunction.apply(x, x_hat, aux_recon, auxk_alpha, backend))
