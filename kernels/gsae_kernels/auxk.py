"""AuxK by dense GEMMs over the candidate latents: the GPU's AuxK.

``auxk_recon`` returns ``e_hat = sum_j a[:, j] W_dec[i[:, j]]`` for the top ``k_aux`` dead
latents ``i`` of each row (by pre-activation, values ``a`` ReLU'd), the same selection as
``topk_encode(..., k_aux)`` followed by ``sparse_decode`` without b_dec, but computed as

    z = (x - b_dec) @ W_enc[C].T + b_enc[C]      [N, C]   C: the candidates (dead first)
    A = scatter(topk(z masked to the dead, k_aux))    [N, C]   zeros elsewhere
    e_hat = A @ W_dec[C]                          [N, d]

with plain torch autograd (three more GEMMs in the backward). Why: at Pythia-1B width the AuxK
selection is k_aux = 1024 latents a row, 8x the main selection's 128, and the sparse kernels
gather one d-row per selected entry in each of five passes (decode, its two backward halves,
the encoder backward's two): ~300 GB of fp32 rows a step at N = 32768, tens of ms at any HBM
bandwidth. The same work as dense GEMMs over C <= m candidates is ~6 N C d FLOP on tensor cores
(about 4.4 TFLOP per GEMM at C = m = 32768), and shrinks with the number of dead latents. On a
CPU the sparse path stays the cheaper one (no tensor cores), so :class:`~gsae_kernels.TopKSAE`
chooses this one on GPUs only. Memory: a few ``[N, C]`` buffers (fp32 or bf16).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .topk_encode import _aux_candidates, _matmul_precision, resolve_precision, round_operand


def _rounded(t: Tensor, precision: str) -> Tensor:
    """``t`` rounded to the precision's operand format, with the gradient of the identity (the
    straight-through estimator, as a tensor core's input rounding has no gradient of its own)."""
    if precision == "fp32":
        return t
    return t + (round_operand(t.detach(), precision) - t.detach())


def _mm(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """``a @ b`` in the precision, differentiable: bf16 autocast on a GPU (tensor cores, fp32
    sums), rounded fp32 operands elsewhere (the same products; fp32 sums)."""
    if precision == "bf16" and a.is_cuda:
        with torch.autocast(a.device.type, dtype=torch.bfloat16):
            return (a @ b).float()
    with _matmul_precision(a.device, precision):
        return _rounded(a, precision) @ _rounded(b, precision)


def auxk_recon(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    b_dec: Tensor | None,
    W_dec: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    *,
    precision: str | None = None,
    aux_limit: int | None = None,
) -> Tensor | None:
    """The AuxK reconstruction ``[N, d]`` (no b_dec), differentiable w.r.t. x and every weight;
    None when no latent can be chosen (``k_aux`` 0 or no candidate).

    Args: as :func:`~gsae_kernels.topk_encode` (``x [N, d]``, ``W_enc [m, d]``, biases, the
    ``dead_mask [m]``, ``k_aux``, ``precision``, ``aux_limit``), plus ``W_dec [m, d]``.
    """
    precision = resolve_precision(precision, x)
    m = W_enc.shape[0]
    limit = m if aux_limit is None else min(int(aux_limit), m)
    cand, dead = _aux_candidates(dead_mask, limit)  # [C], [C] bool or None
    ka = min(int(k_aux), cand.shape[0])
    if ka <= 0:
        return None
    xc = x - b_dec if b_dec is not None else x  # [N, d]
    z = _mm(xc, W_enc.index_select(0, cand).t(), precision)  # [N, C]
    if b_enc is not None:
        z = z + b_enc.index_select(0, cand)
    if dead is not None:  # a live latent among the candidates is never chosen
        z = z.masked_fill(~dead, float("-inf"))
    values, slots = z.topk(ka, dim=1, sorted=False)  # [N, ka]
    a = torch.zeros_like(z).scatter(1, slots, values.relu())  # [N, C]: -inf chosen -> 0
    return _mm(a, W_dec.index_select(0, cand), precision)  # [N, d]
