"""Sparse decoder: ``x_hat = b_dec + sum_j values[:, j] * W_dec[indices[:, j]]``.

``W_dec`` is ``[m, d]``: one row per latent, so every gather of a contiguous ``W_dec`` reads a
contiguous row (other strides are read in place, e.g. ``decoder.weight.T`` of an
``nn.Linear(m, d)``, at the cost of uncoalesced gathers on a GPU).

Forward: ``gather_combine`` (Triton: ``BLOCK_N`` rows x ``BLOCK_D`` columns a program, one
gathered ``[BLOCK_N, BLOCK_D]`` tile per slot). Backward, from the selected entries only:

- ``grad_values[n, j] = <grad_out[n], W_dec[indices[n, j]]>`` by ``row_dot``;
- ``grad_W_dec[i] = sum_{n,j: idx=i} values[n, j] grad_out[n]`` by the latent-sorted
  ``sparse_transpose`` (no atomics: two runs give bit-identical gradients);
- ``grad_b_dec = grad_out.sum(0)``.

Forward and backward are the custom ops ``gsae_kernels::sparse_decode`` and
``gsae_kernels::sparse_decode_backward``. See ``sparse_ops.py`` for the tiling of each kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import (
    cast,
    check_floating,
    check_indices,
    check_matrix,
    check_vector,
    compute_dtype,
    empty_like_none,
    launch_guard,
    resolve_backend,
)
from .sparse_ops import gather_combine, latent_segments, row_dot, sparse_transpose


def _decode_bwd(grad_out, values, indices, W_dec, needs, backend):
    need_v, need_w, need_b = needs
    m = W_dec.shape[0]
    grad_b = grad_out.sum(0) if need_b else None
    segs = None
    if need_w or (need_v and backend != "triton"):  # the torch row_dot reads the sorted entries
        segs = latent_segments(indices, m)  # scoped to this call: freed with it
    grad_v = row_dot(grad_out, indices, W_dec, segs, backend) if need_v else None
    grad_w = None
    if need_w:
        grad_w, _ = sparse_transpose(segs, values, grad_out, m, with_bias=False, backend=backend)
    return grad_v, grad_w, grad_b


@torch.library.custom_op("gsae_kernels::sparse_decode", mutates_args=())
def _sparse_decode_op(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, backend: str
) -> Tensor:
    with launch_guard(values):
        return gather_combine(values, indices, W_dec, b_dec, backend)


@_sparse_decode_op.register_fake
def _(values, indices, W_dec, b_dec, backend):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("gsae_kernels::sparse_decode_backward", mutates_args=())
def _sparse_decode_backward_op(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    need_values: bool,
    need_W_dec: bool,
    need_b_dec: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of (values, W_dec, b_dec); a 0-element tensor for each one not needed."""
    with launch_guard(grad_out):
        needs = (need_values, need_W_dec, need_b_dec)
        grads = _decode_bwd(grad_out, values, indices, W_dec, needs, backend)
    return tuple(g if g is not None else empty_like_none(values) for g in grads)


@_sparse_decode_backward_op.register_fake
def _(grad_out, values, indices, W_dec, need_values, need_W_dec, need_b_dec, backend):
    return (
        grad_out.new_empty(values.shape) if need_values else empty_like_none(values),
        W_dec.new_empty(W_dec.shape) if need_W_dec else empty_like_none(values),
        grad_out.new_empty(W_dec.shape[1]) if need_b_dec else empty_like_none(values),
    )


def _decode_setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec, backend = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.backend = backend
    ctx.has_bias = b_dec is not None


def _decode_backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    need_v, _, need_w, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    grads = torch.ops.gsae_kernels.sparse_decode_backward(
        grad_out, values, indices, W_dec, need_v, need_w, need_b, ctx.backend
    )
    needs = (need_v, need_w, need_b)
    grad_v, grad_w, grad_b = (g if need else None for g, need in zip(grads, needs, strict=True))
    return grad_v, None, grad_w, grad_b, None


_sparse_decode_op.register_autograd(_decode_backward, setup_context=_decode_setup_context)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode sparse latents.

    Args:
        values: ``[N, k]`` latent values.
        indices: ``[N, k]`` latent ids in ``[0, m)`` (int64 or int32; checked on a CPU, where
            it is cheap; out-of-range ids on a GPU are undefined behaviour).
        W_dec: ``[m, d]`` decoder, one row per latent.
        b_dec: ``[d]`` decoder bias, or None for none (as for the AuxK reconstruction).
        backend: ``"triton"``, ``"torch"`` or ``"reference"``; default from the device.

    Returns:
        ``[N, d]`` reconstruction, differentiable w.r.t. values, W_dec and b_dec, in the compute
        dtype: W_dec's dtype, or the autocast dtype inside ``torch.autocast`` (values and b_dec
        are cast to it; their gradients come back in their own dtypes). Tensors may have any
        strides; nothing is copied to make them contiguous.
    """
    check_matrix("values", values, None, None)
    n, k = values.shape
    check_matrix("W_dec", W_dec, None, None)
    check_indices("indices", indices, n, W_dec.shape[0])
    if indices.shape[1] != k:
        raise ValueError(f"indices has shape {tuple(indices.shape)} but values has {(n, k)}")
    check_vector("b_dec", b_dec, W_dec.shape[1])
    check_floating("W_dec", W_dec, values=values, b_dec=b_dec)
    if indices.device != values.device:
        raise ValueError(f"indices is on {indices.device} but values is on {values.device}")
    dtype = compute_dtype(W_dec)
    values, W_dec, b_dec = (cast(t, dtype) for t in (values, W_dec, b_dec))
    backend = resolve_backend(values.device, backend, dtype)
    if backend == "reference":
        return reference.sparse_decode(values, indices, W_dec, b_dec)
    return torch.ops.gsae_kernels.sparse_decode(values, indices, W_dec, b_dec, backend)
