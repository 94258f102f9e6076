"""gsae_kernels: fused TopK sparse-autoencoder kernels with sparse backwards.

Three ops, each with a Triton implementation (GPU tensors), a torch-native one (CPU tensors)
and a dense reference (``reference.py``)::

    enc   = topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0)
    x_hat = sparse_decode(enc.values, enc.indices, W_dec, b_dec)
    loss  = fvu_auxk_loss(x, x_hat, aux_recon=None, auxk_alpha=1/32)

``GSAE_KERNELS=reference|torch|triton`` forces a backend. Every tensor argument may have any
strides; ``b_enc``/``b_dec`` may be None; encode and decode compute in their weight's dtype (the
autocast dtype inside ``torch.autocast``), the loss in fp32. The ops are PyTorch custom ops
(``torch.ops.gsae_kernels.*``, with fake implementations and registered autograd), so
``torch.compile(..., fullgraph=True)`` keeps each as one node. This package imports only torch
and triton (triton is optional: without it the torch path runs), so it can be copied into other
projects as it is.
"""

from ._backend import BACKENDS, HAS_TRITON, resolve_backend
from .loss import LossOutput, fvu_auxk_loss
from .module import ForwardOutput, TopKSAE
from .sparse_decode import sparse_decode
from .topk_encode import EncodeOutput, topk_encode

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "EncodeOutput",
    "ForwardOutput",
    "LossOutput",
    "TopKSAE",
    "fvu_auxk_loss",
    "resolve_backend",
    "sparse_decode",
    "topk_encode",
]
