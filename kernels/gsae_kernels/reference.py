"""Dense reference implementations: plain torch autograd, written for clarity, not speed.

These are the ground truth every other backend is tested against. Do not edit them to make a
kernel pass. They build the dense ``[N, m]`` pre-activations and latent matrix on purpose.
"""

from __future__ import annotations

import torch


def topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
    """(values [N, k], indices [N, k], aux_values [N, k_aux] | None, aux_indices | None)."""
    pre = (x - b_dec) @ W_enc.T + b_enc  # [N, m]
    top = pre.topk(k, dim=1)
    values = torch.relu(top.values)
    if k_aux == 0:
        return values, top.indices, None, None
    dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
    aux = dead_pre.topk(k_aux, dim=1)
    # fewer dead latents than k_aux: the spare slots hold -inf, i.e. value 0 after the ReLU
    return values, top.indices, torch.relu(aux.values), aux.indices


def sparse_decode(values, indices, W_dec, b_dec=None):
    """``[N, d]`` reconstruction through a dense latent matrix."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    dense = dense.scatter(1, indices.long(), values)  # [N, m]
    out = dense @ W_dec
    return out if b_dec is None else out + b_dec


def fvu_auxk_loss(x, x_hat, aux_recon=None, auxk_alpha=1 / 32):
    """(loss, fvu, auxk) as fp32 scalars."""
    x, x_hat = x.float(), x_hat.float()
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = (x - x_hat).pow(2).sum() / total_variance
    if aux_recon is None:
        auxk = torch.zeros((), device=x.device)
    else:
        e = (x - x_hat).detach()
        auxk = (aux_recon.float() - e).pow(2).sum() / total_variance
    return fvu + auxk_alpha * auxk, fvu, auxk
