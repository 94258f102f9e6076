"""The data-dependent and closed-form parts of an SAE's initialisation, and the activation scales.

- :func:`activation_scales`: per-layer scales s with ``E||s x||^2 = 1`` (the paper's
  normalisation, Appendix A) or ``E||s x|| = 1``, streamed over the first tokens;
- :func:`geometry_encoder_scale`: the encoder scale c of ``W_enc = c W_dec^T`` that fits
  isotropic data in expectation, from d, m and k alone;
- :func:`init_from_batch`: ``b_dec`` (mean or geometric median) and the fitted encoder scale from
  a first batch, on one process or from sums over the processes that each hold a part of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from gsae_kernels import TopKSAE

if TYPE_CHECKING:
    from .sae import Sae

SCALE_MODES = ("mean_sq", "mean_norm", "none")
NORM_CHUNK_ELEMENTS = 1 << 24  # scale estimate: at most this many values upcast at once


def activation_scales(
    batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq", merge=None
) -> list[float]:
    """Per-source scales s with ``E||s x||^2 = 1`` (``mean_sq``) or ``E||s x|| = 1``
    (``mean_norm``), from the first ``tokens`` tokens of ``batches`` (each ``[L, N, d]``: L
    sources side by side). Streamed: each token's norm is taken in float32 (a bounded slice of
    tokens upcast at a time) and only the sums over tokens are float64, so no float64 copy of the
    activations is ever made (8 GiB at Pythia-1B sizes).

    ``merge((sums [L] float64, tokens))`` combines the sums of several processes, each over its
    own part of the data (distributed training), and returns the totals."""
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
    total, seen = activation_norm_sums(batches, tokens, mode)
    if merge is not None:
        total, seen = merge((total, seen))
    if total is None or seen == 0:
        raise ValueError(f"cannot estimate an activation scale from {seen} tokens")
    if mode == "none":
        return [1.0] * len(total)
    mean = total / seen
    if not bool(torch.isfinite(mean).all()) or bool((mean <= 0).any()):
        raise ValueError(f"cannot estimate an activation scale from {seen} tokens (means {mean})")
    return (mean.rsqrt() if mode == "mean_sq" else mean.reciprocal()).tolist()


def activation_norm_sums(
    batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq"
) -> tuple[torch.Tensor | None, int]:
    """Per-source float64 sums of ``||x||^2`` (``mean_sq``) or ``||x||`` over the first
    ``tokens`` tokens of ``batches [L, N, d]``, and the number of tokens summed (None: none)."""
    total, seen = None, 0
    for batch in batches:
        h = batch[:, : tokens - seen]  # [L, n, d]
        chunk = max(1, NORM_CHUNK_ELEMENTS // max(1, h.shape[0] * h.shape[2]))
        for i in range(0, h.shape[1], chunk):
            norms = torch.linalg.vector_norm(h[:, i : i + chunk], dim=2, dtype=torch.float32)
            values = norms.square() if mode == "mean_sq" else norms  # [L, chunk]
            part = values.sum(1, dtype=torch.float64).cpu()  # [L]
            total = part if total is None else total + part
        if total is None and h.shape[1] == 0:  # an empty part (distributed): sums of nothing
            total = torch.zeros(h.shape[0], dtype=torch.float64)
        seen += h.shape[1]
        if seen >= tokens:
            break
    return total, seen


def activation_scale(batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq") -> float:
    """:func:`activation_scales` for a single source: ``batches`` are ``[N, d]``."""
    if mode == "none":
        return 1.0
    return activation_scales((b.unsqueeze(0) for b in batches), tokens, mode)[0]


def geometry_encoder_scale(d: int, m: int, k: int) -> float:
    """The encoder scale c that best fits, in expectation, isotropic data at init.

    With unit decoder rows w_i drawn at random and ``W_enc = c W_dec^T``, an input x has
    pre-activations f_i = <w_i, x> ~ N(0, |x|^2 / d). The top k of m lie beyond the normal
    quantile t = Phi^-1(1 - k/m), so with z = f sqrt(d) / |x| and p = k/m:

        S = sum f_i^2 = |x|^2 (k/d) E[z^2 | z > t],    E[z^2 | z > t] = 1 + t phi(t) / p
        Q = sum f_i^4 = |x|^4 (k/d^2) E[z^4 | z > t],  E[z^4 | z > t] = 3 + (t^3 + 3t) phi(t) / p

    Their reconstruction r = sum f_i w_i has <x, r> = S, and since each chosen row leans towards
    x (w_i = f_i x / |x|^2 + a part orthogonal to x, random), |r|^2 = S + (S^2 - Q) / |x|^2.
    The c minimising |x - c r|^2 is <x, r> / |r|^2 = ``1 / (1 + S/|x|^2 - Q/(S |x|^2))``:
    0.39 at d=128, m=2048, k=32 (a Monte-Carlo fit gives 0.40), 0.65 at the paper's d=2048,
    m=32768, k=128. The paper's c = 1 overshoots by the inverse of that.
    """
    from statistics import NormalDist

    p = k / m
    if p >= 1:  # every latent is chosen: the full Gaussian moments
        e2, e4 = 1.0, 3.0
    else:
        t = NormalDist().inv_cdf(1 - p)
        phi = NormalDist().pdf(t)
        e2, e4 = 1 + t * phi / p, 3 + (t**3 + 3 * t) * phi / p
    s = k / d * e2  # S / |x|^2
    q = k / d**2 * e4  # Q / |x|^4
    return 1 / (1 + s - q / s)


def geometric_median(
    x: torch.Tensor, iters: int = 50, tol: float = 1e-6, reduce=None
) -> torch.Tensor:
    """Geometric median of the rows of ``x [N, d]`` (Weiszfeld's iterations from the mean).

    ``reduce(t)``: the sum of a float64 tensor over the processes that each hold some of the rows
    (distributed training); every process then gets the median of all of them, iterating alike."""
    total = reduce if reduce is not None else _alone
    x = x.double()
    sums = total(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
    y = sums[:-1] / sums[-1]
    for _ in range(iters):
        w = (x - y).norm(dim=1).clamp_min(1e-12).reciprocal()  # [N]
        sums = total(torch.cat([(w[:, None] * x).sum(0), w.sum().view(1)]))
        new = sums[:-1] / sums[-1]
        done = float((new - y).norm()) <= tol * max(float(y.norm()), 1e-12)
        y = new
        if done:
            break
    return y


def _alone(t: torch.Tensor) -> torch.Tensor:
    """The ``reduce`` of a single process: its own sums are the totals."""
    return t


@torch.no_grad()
def init_from_batch(
    sae: Sae, xs: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float | None:
    """The data-dependent part of ``sae``'s initialisation from a first batch ``xs [n, d]``
    already in the SAE's units (float32): ``b_dec`` (``init_b_dec``), then the encoder scale
    (``init_encoder="fit"``). Returns the factor applied to ``W_enc`` (1.0 if none), or None,
    changing nothing, when the batch is empty or not finite. One host sync per statistic: it
    runs once per training.

    The batch's statistics are sums over its rows: with ``reduce(t)`` (data-parallel training:
    the sum of a float64 tensor over the processes that train this SAE, each holding its part
    of the batch in ``xs``, possibly none) they are those of the whole batch, so every replica
    gets the one init a single process would compute from the whole batch. Every process makes
    the same ``reduce`` calls whatever its part holds."""
    total = reduce if reduce is not None else _alone
    x64 = xs.double()
    sums = total(torch.cat([x64.sum(0), x64.new_tensor([xs.shape[0]])]))  # [d + 1]
    count = float(sums[-1])
    if count == 0 or not bool(torch.isfinite(sums).all()):
        return None  # NaN/inf rows anywhere poison the sums: nobody initialises
    if sae.cfg.init_b_dec == "mean":
        sae.b_dec.copy_(sums[:-1] / count)
    elif sae.cfg.init_b_dec == "median":
        sae.b_dec.copy_(geometric_median(xs, reduce=reduce))
    if sae.cfg.init_encoder != "fit":
        return 1.0
    # top-k selection does not depend on c (a positive factor on every pre-activation): with r
    # the reconstruction at c = 1, the best c is <x - b_dec, r> / |r|^2 over the batch
    part = x64.new_zeros(2)
    if xs.shape[0]:
        enc = TopKSAE.encode(sae, xs)
        r = (TopKSAE.decode(sae, enc.values, enc.indices) - sae.b_dec).double()  # [n, d], c = 1
        e = (xs - sae.b_dec).double()
        part = torch.stack([(e * r).sum(), r.pow(2).sum()])
    num, den = total(part).tolist()
    if not (den > 0 and math.isfinite(num) and num > 0):
        return 1.0  # a degenerate batch (e.g. every row equals b_dec): keep c = 1
    sae.W_enc.mul_(num / den)
    return num / den
