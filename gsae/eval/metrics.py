"""Per-layer quality of an SAE on held-out activations, in the model's own units.

Reconstruction (streamed over any number of batches, float64 sums on the device):

- FVU, paper Eq. 6, over the whole evaluation set: ``sum_t ||x_t - x̂_t||^2 / sum_t ||x_t -
  mean(x)||^2`` (one ratio of sums, not a mean of batch FVUs); explained variance ``1 - FVU``;
- cosine similarity of ``x`` and ``x̂`` (mean over tokens), L0 (latents with value > 0 per token),
  and the fraction of latents that never fired.

Downstream, by splicing ``x̂`` into the forward at the layer (:func:`gsae.activations.splice`):

- ΔCE, paper Eq. 7: ``(CE(x <- x̂) - CE) / CE``, the relative change of the mean next-token
  cross-entropy over every scored position (reported in %);
- CE loss recovered ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, with the layer's residual
  stream zero-ablated as the reference (1: as good as the model, 0: as bad as no layer output);
- KL divergence of the spliced next-token distribution from the clean one, and its score
  ``1 - KL_sae / KL_zero``.

:func:`pooled` gives the paper's aggregation over a partition: each group's mean and std over its
layers, combined with weights by number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Reconstruction(NamedTuple):
    """Reconstruction metrics of one SAE at one layer over ``tokens`` tokens."""

    tokens: int
    fvu: float  # Eq. 6 over the whole set
    explained_variance: float  # 1 - FVU
    cosine: float  # mean over tokens of cos(x, x̂)
    l0: float  # mean number of latents with value > 0 per token
    never_fired: float  # fraction of latents with no token where they fired


class ReconstructionStats:
    """Streamed sums for :class:`Reconstruction`: ``update`` per batch, ``result`` at the end.

    The variance of x is kept as a per-dimension running mean and sum of squared deviations
    (Chan et al.'s parallel update), so a large mean does not cancel digits. ``fired[i]`` counts
    the tokens where latent i fired (the feature distribution of Appendix F is built from it).
    """

    def __init__(self, d: int, m: int, device=None):
        f64 = {"dtype": torch.float64, "device": device}
        self.count = 0
        self.mean = torch.zeros(d, **f64)  # [d]
        self.m2 = torch.zeros(d, **f64)  # [d] sum of squared deviations from the mean
        self.sse = torch.zeros((), **f64)  # sum_t ||x_t - x̂_t||^2
        self.cosine = torch.zeros((), **f64)
        self.active = torch.zeros((), dtype=torch.int64, device=device)
        self.fired = torch.zeros(m, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, x_hat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> None:
        """``x``, ``x_hat``: ``[N, d]`` in model units; ``indices``/``values``: the ``[N, k]``
        top-k latents that gave ``x_hat`` (a latent fires where its value is > 0)."""
        n = x.shape[0]
        if n == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        batch_mean = x.mean(0)  # [d]
        batch_m2 = (x - batch_mean).pow(2).sum(0)  # [d]
        delta = batch_mean - self.mean
        total = self.count + n
        self.m2 += batch_m2 + delta.pow(2) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total
        self.sse += (x - x_hat).pow(2).sum()
        self.cosine += F.cosine_similarity(x, x_hat, dim=1, eps=1e-12).sum()
        on = values > 0  # [N, k]
        self.active += on.sum()
        self.fired.index_add_(0, indices.reshape(-1).long(), on.reshape(-1).long())

    def result(self) -> Reconstruction:
        if self.count == 0:
            nan = float("nan")
            return Reconstruction(0, nan, nan, nan, nan, nan)
        variance = float(self.m2.sum())
        fvu = float(self.sse) / variance if variance > 0 else float("nan")
        return Reconstruction(
            tokens=self.count,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            cosine=float(self.cosine) / self.count,
            l0=int(self.active) / self.count,
            never_fired=float((self.fired == 0).double().mean()),
        )


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Eq. 6 on one set of activations ``[N, d]``: ``||x - x̂||^2 / sum ||x - mean(x)||^2``."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# --------------------------------------------------------------------------------------------
# Downstream
# --------------------------------------------------------------------------------------------


def scored_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` bool: positions whose next token is real (both it and the next unmasked)."""
    mask = attention_mask.bool()
    return mask[:, :-1] & mask[:, 1:]


def reference_logprobs(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Clean next-token log-probabilities ``[P, V]`` (float32) at the scored positions."""
    return torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)


def next_token_losses(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per scored position: cross-entropy of the next token ``[P]`` and, given the clean
    ``reference`` log-probabilities ``[P, V]``, ``KL(clean || this)`` ``[P]`` (float32)."""
    logp = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)  # [P, V]
    labels = input_ids[:, 1:][valid].to(logp.device)  # [P]
    ce = -logp.gather(1, labels[:, None]).squeeze(1)
    kl = None
    if reference is not None:
        kl = (reference.exp() * (reference - logp)).sum(-1)
    return ce, kl


class LossSums:
    """Streamed sums of next-token CE (and KL from the clean distribution) over positions."""

    def __init__(self, device=None):
        self.ce = torch.zeros((), dtype=torch.float64, device=device)
        self.kl = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def update(self, ce: torch.Tensor, kl: torch.Tensor | None = None) -> None:
        self.ce += ce.double().sum()
        if kl is not None:
            self.kl += kl.double().sum()
        self.count += ce.shape[0]

    def mean_ce(self) -> float:
        return float(self.ce) / self.count if self.count else float("nan")

    def mean_kl(self) -> float:
        return float(self.kl) / self.count if self.count else float("nan")


def delta_ce(ce_sae: float, ce_clean: float) -> float:
    """Eq. 7: ``(CE(M(P | x <- x̂)) - CE(M(P))) / CE(M(P))`` (a fraction; x100 for ΔCE%)."""
    return (ce_sae - ce_clean) / ce_clean


def ce_recovered(ce_sae: float, ce_clean: float, ce_zero: float) -> float:
    """``(CE_zero - CE_sae) / (CE_zero - CE_clean)``: 1 when the splice costs nothing, 0 when
    it is as bad as zero-ablating the layer."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_sae) / gap if gap != 0 else float("nan")


def kl_score(kl_sae: float, kl_zero: float) -> float:
    """``1 - KL_sae / KL_zero``: 1 when the spliced distribution is the clean one, 0 when it
    is as far from it as with the layer zero-ablated."""
    return 1.0 - kl_sae / kl_zero if kl_zero != 0 else float("nan")


class Downstream(NamedTuple):
    """Downstream metrics of one SAE at one layer over ``positions`` next-token predictions."""

    positions: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    delta_ce_pct: float  # 100 x Eq. 7
    ce_recovered: float
    kl: float
    kl_zero: float
    kl_score: float


def downstream(spliced: LossSums, clean: LossSums, zero: LossSums) -> Downstream:
    """The metrics of one splice from its sums and the model's clean and zero-ablated sums."""
    ce_s, ce_c, ce_z = spliced.mean_ce(), clean.mean_ce(), zero.mean_ce()
    kl_s, kl_z = spliced.mean_kl(), zero.mean_kl()
    return Downstream(
        spliced.count,
        ce_c,
        ce_s,
        ce_z,
        100 * delta_ce(ce_s, ce_c),
        ce_recovered(ce_s, ce_c, ce_z),
        kl_s,
        kl_z,
        kl_score(kl_s, kl_z),
    )


# --------------------------------------------------------------------------------------------
# Aggregation over a partition
# --------------------------------------------------------------------------------------------


class Pooled(NamedTuple):
    """Mean and std over layers; ``groups`` holds (number of layers, mean, std) per group."""

    mean: float
    std: float
    groups: list[tuple[int, float, float]]


def pooled(groups: Sequence[Sequence[float]]) -> Pooled:
    """The paper's aggregation (Section 4.1): each group's mean and std over its layers, then
    the mean and std over the partition with each group weighted by its number of layers.

    Weighting the group means by size gives the mean over all layers, and combining within- and
    between-group variance the same way gives the std over all layers (population std).
    NaNs (e.g. metrics skipped for a model without an LM head) are left out.
    """
    stats = []
    for values in groups:
        v = [x for x in values if x is not None and not math.isnan(x)]
        if v:
            mean = sum(v) / len(v)
            stats.append((len(v), mean, math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))))
    total = sum(n for n, _, _ in stats)
    if total == 0:
        return Pooled(float("nan"), float("nan"), [])
    mean = sum(n * mu for n, mu, _ in stats) / total
    var = sum(n * (sd**2 + (mu - mean) ** 2) for n, mu, sd in stats) / total
    return Pooled(mean, math.sqrt(max(var, 0.0)), stats)
