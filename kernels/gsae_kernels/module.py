"""``TopKSAE``: the smallest nn.Module around the three kernels, for embedding in other code."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .auxk import auxk_recon
from .loss import LossOutput, fvu_auxk_loss
from .sparse_decode import sparse_decode
from .topk_encode import EncodeOutput, topk_encode


class ForwardOutput(NamedTuple):
    """``x_hat [N, d]``, the sparse ``latents`` and the ``loss`` terms of one batch."""

    x_hat: torch.Tensor
    latents: EncodeOutput
    loss: LossOutput


class TopKSAE(nn.Module):
    """TopK sparse autoencoder: ``f = topk(relu(W_enc (x - b_dec) + b_enc))``, ``x_hat = b_dec +
    W_dec^T f``, with one unit-norm decoder row per latent.

    Args:
        d: activation width.
        m: number of latents.
        k: latents active per row.
        auxk_alpha: AuxK weight in the loss.
        backend: the kernels' backend (None: by the device, see ``resolve_backend``).
        auxk: AuxK's implementation in :meth:`forward`, ``"sparse"`` or ``"dense"`` (None:
            dense on a GPU, sparse on a CPU).
    """

    def __init__(
        self,
        d: int,
        m: int,
        k: int,
        auxk_alpha: float = 1 / 32,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
        backend: str | None = None,
        auxk: str | None = None,
    ):
        super().__init__()
        if not 1 <= k <= m:
            raise ValueError(f"k must be in [1, m={m}], got {k}")
        self.d, self.m, self.k, self.auxk_alpha = d, m, k, auxk_alpha
        self.backend = backend  # None: chosen by the device (or GSAE_KERNELS)
        self.auxk = auxk  # forward's default AuxK: "sparse", "dense" or None (by the device)
        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(m, d, **factory))
        self.b_enc = nn.Parameter(torch.zeros(m, **factory))
        self.W_dec = nn.Parameter(torch.empty(m, d, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d, **factory))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random unit vectors; encoder: the decoder's transpose; biases: 0."""
        device = generator.device if generator is not None else self.W_dec.device
        w = torch.randn(self.m, self.d, generator=generator, device=device).to(self.W_dec)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode(self, x: torch.Tensor, dead_mask=None, k_aux: int = 0) -> EncodeOutput:
        w, b = (self.W_enc, self.b_enc, self.b_dec), self.backend
        return topk_encode(x, *w, self.k, dead_mask, k_aux, backend=b)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return sparse_decode(values, indices, self.W_dec, self.b_dec, backend=self.backend)

    def forward(
        self,
        x: torch.Tensor,
        dead_mask=None,
        k_aux: int = 0,
        *,
        precision: str | None = None,
        aux_limit: int | None = None,
        auxk: str | None = None,
    ) -> ForwardOutput:
        """Encode, decode and score ``x [N, d]``; AuxK uses ``k_aux`` latents of ``dead_mask``
        (at most ``aux_limit`` considered); ``precision``: the encoder matmul's (see
        :func:`~gsae_kernels.topk_encode`). ``auxk``: ``"sparse"`` (selected by the encoder,
        decoded by the sparse kernels: ``latents.aux_*`` hold it) or ``"dense"``
        (:func:`~gsae_kernels.auxk.auxk_recon`: GEMMs over the candidates, ``latents.aux_*``
        None); None: dense on a GPU, sparse on a CPU."""
        # the kernels are called directly (not self.encode/decode) so subclasses that wrap
        # encode/decode, e.g. with an input scale, can reuse this forward on prepared inputs
        b = self.backend
        w = (self.W_enc, self.b_enc, self.b_dec)
        auxk = auxk or self.auxk or ("dense" if x.is_cuda else "sparse")
        if auxk not in ("sparse", "dense"):
            raise ValueError(f"auxk must be 'sparse', 'dense' or None, got {auxk!r}")
        dense = auxk == "dense" and k_aux > 0
        latents = topk_encode(
            x,
            *w,
            self.k,
            dead_mask,
            0 if dense else k_aux,
            backend=b,
            precision=precision,
            aux_limit=aux_limit,
        )
        x_hat = sparse_decode(latents.values, latents.indices, self.W_dec, self.b_dec, backend=b)
        aux_recon = None
        if dense:
            aux_recon = auxk_recon(
                x, *w, self.W_dec, dead_mask, k_aux, precision=precision, aux_limit=aux_limit
            )
        elif latents.aux_values is not None:
            aux_recon = sparse_decode(
                latents.aux_values, latents.aux_indices, self.W_dec, None, backend=b
            )
        loss = fvu_auxk_loss(x, x_hat, aux_recon, self.auxk_alpha, backend=b)
        return ForwardOutput(x_hat, latents, loss)
