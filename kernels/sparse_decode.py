"""Sparse decoder: ``x_hat = b_dec + sum_j values[:, j] * W_dec[indices[:, j]]``.

``W_dec`` is ``[m, d]``: one (unit-norm) row per latent, so every gather reads a contiguous row.

Forward: ``gather_combine`` (Triton: ``BLOCK_N`` rows x ``BLOCK_D`` columns a program, one
gathered ``[BLOCK_N, BLOCK_D]`` tile per slot). Backward, from the selected entries only:

- ``grad_values[n, j] = <grad_out[n], W_dec[indices[n, j]]>`` by ``row_dot``;
- ``grad_W_dec[i] = sum_{n,j: idx=i} values[n, j] grad_out[n]`` by the latent-sorted
  ``sparse_transpose`` (no atomics: two runs give bit-identical gradients);
- ``grad_b_dec = grad_out.sum(0)``.

See ``sparse_ops.py`` for the tiling of each kernel.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import check_indices, check_matrix, check_same, check_vector, resolve_backend
from .sparse_ops import gather_combine, latent_segments, row_dot, sparse_transpose


def _decode_bwd(grad_out, values, indices, W_dec, needs, backend):
    need_v, need_w, need_b = needs
    grad_out = grad_out.contiguous()
    m = W_dec.shape[0]
    grad_b = grad_out.sum(0) if need_b else None
    segs = None
    if need_w or (need_v and backend != "triton"):  # the torch row_dot reads the sorted entries
        segs = latent_segments(indices, m)
    grad_v = row_dot(grad_out, indices, W_dec, segs, backend) if need_v else None
    grad_w = None
    if need_w:
        grad_w, _ = sparse_transpose(segs, values, grad_out, m, with_bias=False, backend=backend)
    return grad_v, grad_w, grad_b


class SparseDecodeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec, backend):
        ctx.save_for_backward(values, indices, W_dec)
        ctx.backend = backend
        ctx.has_bias = b_dec is not None
        return gather_combine(values, indices, W_dec, b_dec, backend)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                 ctx.has_bias and ctx.needs_input_grad[3])  # fmt: skip
        grad_v, grad_w, grad_b = _decode_bwd(grad_out, values, indices, W_dec, needs, ctx.backend)
        return grad_v, None, grad_w, grad_b, None


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode sparse latents.

    Args:
        values: ``[N, k]`` latent values.
        indices: ``[N, k]`` latent ids in ``[0, m)`` (int64 or int32).
        W_dec: ``[m, d]`` decoder, one row per latent.
        b_dec: ``[d]`` decoder bias, or None for none (as for the AuxK reconstruction).
        backend: ``"triton"``, ``"torch"`` or ``"reference"``; default from the device.

    Returns:
        ``[N, d]`` reconstruction, differentiable w.r.t. values, W_dec and b_dec.
    """
    check_matrix("values", values, None, None)
    n, k = values.shape
    check_indices("indices", indices, n)
    if indices.shape[1] != k:
        raise ValueError(f"indices has shape {tuple(indices.shape)} but values has {(n, k)}")
    check_matrix("W_dec", W_dec, None, None)
    check_vector("b_dec", b_dec, W_dec.shape[1])
    check_same("W_dec", W_dec, values=values, b_dec=b_dec)
    if indices.device != values.device:
        raise ValueError(f"indices is on {indices.device} but values is on {values.device}")
    backend = resolve_backend(values.device, backend)
    if backend == "reference":
        return reference.sparse_decode(values, indices, W_dec, b_dec)
    return SparseDecodeFunction.apply(values, indices, W_dec, b_dec, backend)
