"""How the latents of two SAEs match (paper Appendix E) and how a Group-SAE's latents spread over
the layers of its group (Appendix F).

- :func:`mmcs`: Mean Maximum Cosine Similarity of two decoders (Eq. 18), in row blocks: no
  ``m x m`` matrix beyond one block is held (on a GPU each block is one matmul);
  :func:`nearest`: the same blocked search for the n closest latents (the latent browser's
  neighbours).
- :class:`CoOccurrence`: the counts behind MMCO (Eqs. 12-15), accumulated from the top-k indices
  of two SAEs on the same tokens, streamed; :meth:`CoOccurrence.jaccard` (Eq. 16),
  :meth:`CoOccurrence.best_match` and :meth:`CoOccurrence.mmco` (Eq. 17) read them in blocks.
- :func:`feature_distribution`: per latent, the share of its firings at each layer of the group,
  and the latents ordered by their mean layer (Figures 15-17).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EPS = 1e-8  # the epsilon of Eq. 16: 0/0 (two latents that never fired) counts as 0


class BestMatch(NamedTuple):
    """For each latent of the first SAE: the best score against the second and which latent."""

    mean: float  # the mean of ``score``: MMCS (Eq. 18) or MMCO (Eq. 17)
    score: torch.Tensor  # [m_a]
    index: torch.Tensor  # [m_a] the latent of the second SAE that gives it


def _block_rows(m_b: int, budget: int = 1 << 22) -> int:
    """Rows per block so that one ``[rows, m_b]`` temporary has at most ``budget`` entries."""
    return max(1, budget // max(m_b, 1))


@torch.no_grad()
def mmcs(w_a: torch.Tensor, w_b: torch.Tensor, block: int | None = None) -> BestMatch:
    """Eq. 18: ``(1/m_a) sum_i max_j cos(w_a[i], w_b[j])`` for decoders ``w_a [m_a, d]`` and
    ``w_b [m_b, d]`` (one row per latent; rows are normalised here, zero rows give 0).

    Direction matters (the paper computes MMCS(baseline, group)): each latent of ``w_a`` looks
    for its closest latent in ``w_b``. Computed ``block`` rows of ``w_a`` at a time."""
    score, index = nearest(w_a, w_b, 1, block)
    score, index = score[:, 0], index[:, 0]
    return BestMatch(float(score.double().mean()), score, index)


@torch.no_grad()
def nearest(
    w_a: torch.Tensor, w_b: torch.Tensor | None = None, n: int = 1, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``w_a [m_a, d]``, the ``n`` rows of ``w_b [m_b, d]`` with the largest
    cosine similarity, best first: ``(cosines [m_a, n], indices [m_a, n])``. Without ``w_b``,
    the nearest *other* rows of ``w_a`` (a latent's neighbours within its own SAE). Computed
    ``block`` rows at a time: no ``m_a x m_b`` matrix beyond one block is held."""
    same = w_b is None
    w_b = w_a if same else w_b
    if w_a.dim() != 2 or w_b.dim() != 2 or w_a.shape[1] != w_b.shape[1]:
        raise ValueError(
            f"decoders must be [m, d] with the same d, got {tuple(w_a.shape)} and "
            f"{tuple(w_b.shape)}"
        )
    if w_a.shape[0] == 0 or w_b.shape[0] == 0:
        raise ValueError("a decoder with no latents has no nearest latents")
    n = min(n, w_b.shape[0] - (1 if same else 0))
    if n < 1:
        raise ValueError("a single latent has no other latent to be near")
    w_b = w_b.to(device=w_a.device, dtype=torch.float32)
    b = w_b / w_b.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [m_b, d]
    block = block or _block_rows(b.shape[0])
    scores, index = [], []
    for start in range(0, w_a.shape[0], block):
        a = w_a[start : start + block].float()
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [r, d]
        cos = a @ b.T  # [r, m_b]
        if same:  # a latent is not its own neighbour
            rows = torch.arange(cos.shape[0], device=cos.device)
            cos[rows, rows + start] = float("-inf")
        if n == 1:  # max: ties (e.g. a zero row) go to the lowest index, as MMCS always did
            best = cos.max(dim=1, keepdim=True)  # [r, 1]
        else:
            best = cos.topk(n, dim=1)  # [r, n]
        scores.append(best.values)
        index.append(best.indices)
    return torch.cat(scores), torch.cat(index)


class CoOccurrence:
    """Co-occurrence counts of the latents of SAE A and SAE B on the same tokens (Eqs. 12-15).

    ``update(idx_a, on_a, idx_b, on_b)`` takes, per token, each SAE's top-k indices ``[N, k]``
    and whether each fired (value > 0). It adds ``AND[i, j] = |B_i ∩ G_j|`` (Eq. 14: tokens where
    latent i of A and latent j of B both fired) and the firing counts ``|B_i|``, ``|G_j|``; OR
    follows by inclusion-exclusion (Eq. 15). No per-token Python loop, and the memory is one
    ``[m_a, m_b]`` int32 matrix (exact up to 2^31 tokens) whatever the number of tokens.

    ``method``: ``scatter`` adds 1 at each of the ``k_a * k_b`` index pairs of every token
    (``n k^2`` work: the fast path on a CPU); ``dense`` multiplies 0/1 matrices ``A^T B`` a chunk of
    tokens at a time (``2 n m^2`` work, but in matmuls; exact, as every product is 0 or 1 and a
    chunk's sums stay below 2^24 in fp32); ``auto`` picks dense on a GPU, scatter elsewhere.
    """

    def __init__(self, m_a: int, m_b: int, device=None, method: str = "auto"):
        if method not in ("auto", "scatter", "dense"):
            raise ValueError(f"method must be auto, scatter or dense, got {method!r}")
        device = torch.device(device or "cpu")
        if method == "auto":
            method = "dense" if device.type == "cuda" else "scatter"
        self.m_a, self.m_b, self.method, self.device = m_a, m_b, method, device
        # one spare cell at the end: pairs with a latent that did not fire are counted there
        self._flat = torch.zeros(m_a * m_b + 1, dtype=torch.int32, device=device)
        self.and_counts = self._flat[:-1].view(m_a, m_b)  # [m_a, m_b], Eq. 14
        self.count_a = torch.zeros(m_a, dtype=torch.int64, device=device)  # |B_i|
        self.count_b = torch.zeros(m_b, dtype=torch.int64, device=device)  # |G_j|
        self.tokens = 0

    @staticmethod
    def nbytes(m_a: int, m_b: int) -> int:
        """Memory of one accumulator (for planning how many fit)."""
        return 4 * (m_a * m_b + 1) + 8 * (m_a + m_b)

    @torch.no_grad()
    def update(
        self, idx_a: torch.Tensor, on_a: torch.Tensor, idx_b: torch.Tensor, on_b: torch.Tensor
    ) -> None:
        if (
            idx_a.shape[0] != idx_b.shape[0]
            or idx_a.shape != on_a.shape
            or (idx_b.shape != on_b.shape)
        ):
            raise ValueError(
                f"expected [N, k] indices and masks for the same N tokens, got "
                f"{tuple(idx_a.shape)}, {tuple(on_a.shape)}, {tuple(idx_b.shape)}, "
                f"{tuple(on_b.shape)}"
            )
        idx_a, idx_b = idx_a.to(self.device).long(), idx_b.to(self.device).long()
        on_a, on_b = on_a.to(self.device).bool(), on_b.to(self.device).bool()
        self.count_a.index_add_(0, idx_a.reshape(-1), on_a.reshape(-1).long())
        self.count_b.index_add_(0, idx_b.reshape(-1), on_b.reshape(-1).long())
        self.tokens += idx_a.shape[0]
        if self.method == "scatter":
            self._scatter(idx_a, on_a, idx_b, on_b)
        else:
            self._dense(idx_a, on_a, idx_b, on_b)

    def _scatter(self, idx_a, on_a, idx_b, on_b) -> None:
        n, k_a = idx_a.shape
        k_b = idx_b.shape[1]
        chunk = max(1, (1 << 22) // max(k_a * k_b, 1))  # at most 4M pairs (32 MiB of ids) a time
        spare = self.m_a * self.m_b
        for s in range(0, n, chunk):
            a, b = idx_a[s : s + chunk], idx_b[s : s + chunk]
            ids = a[:, :, None] * self.m_b + b[:, None, :]  # [c, k_a, k_b]
            both = on_a[s : s + chunk, :, None] & on_b[s : s + chunk, None, :]
            ids = torch.where(both, ids, spare).reshape(-1)
            ones = torch.ones((), dtype=self._flat.dtype, device=self.device).expand(ids.numel())
            self._flat.index_add_(0, ids, ones)

    def _dense(self, idx_a, on_a, idx_b, on_b) -> None:
        # fp32 0/1 inputs: each product is exact (under TF32 too) and a chunk's sums stay below
        # 2^24, so the fp32 result is exact before it is added to the int32 counts
        n = idx_a.shape[0]
        chunk = max(1, min(1 << 16, (1 << 26) // (self.m_a + self.m_b)))  # <= 256 MiB of 0/1
        for s in range(0, n, chunk):
            a = _one_hot(idx_a[s : s + chunk], on_a[s : s + chunk], self.m_a)  # [c, m_a]
            b = _one_hot(idx_b[s : s + chunk], on_b[s : s + chunk], self.m_b)  # [c, m_b]
            self.and_counts += (a.T @ b).to(torch.int32)

    # ---- reading

    def jaccard(self, rows: slice | None = None, eps: float = EPS) -> torch.Tensor:
        """Eq. 16 for the latents ``rows`` of A against every latent of B: ``AND / (OR + eps)``
        with ``OR = |B_i| + |G_j| - AND`` (Eq. 15), float32 ``[r, m_b]``."""
        rows = rows or slice(0, self.m_a)
        both = self.and_counts[rows].double()
        either = self.count_a[rows, None].double() + self.count_b[None, :].double() - both
        return (both / (either + eps)).float()

    def best_match(self, eps: float = EPS, block: int | None = None) -> BestMatch:
        """For each latent of A, its highest Jaccard with a latent of B (and which); ``mean`` is
        MMCO, Eq. 17: ``(1/m_a) sum_i max_j Jaccard_ij``, over every latent of A (one that
        never fired scores 0)."""
        block = block or _block_rows(self.m_b)
        scores, index = [], []
        for start in range(0, self.m_a, block):
            best = self.jaccard(slice(start, start + block), eps).max(dim=1)
            scores.append(best.values)
            index.append(best.indices)
        score = torch.cat(scores)
        return BestMatch(float(score.double().mean()), score, torch.cat(index))

    def mmco(self, eps: float = EPS) -> Mmco:
        """Eq. 17, and the same mean over only the latents of A that fired at least once."""
        best = self.best_match(eps)
        fired = self.count_a > 0
        over_fired = float(best.score[fired].double().mean()) if bool(fired.any()) else 0.0
        return Mmco(best.mean, over_fired, float(fired.double().mean()))


class Mmco(NamedTuple):
    """MMCO (Eq. 17, over all m latents of A), over only the latents of A that fired, and the
    fraction of A's latents that fired (MMCO = mmco_fired x fired when nothing else differs)."""

    mmco: float
    mmco_fired: float
    fired: float


def _one_hot(idx: torch.Tensor, on: torch.Tensor, m: int) -> torch.Tensor:
    """``[N, m]`` float32 0/1: 1 where a latent is among the token's top-k and fired."""
    out = torch.zeros(idx.shape[0], m, dtype=torch.float32, device=idx.device)
    return out.scatter_(1, idx, on.float())


# --------------------------------------------------------------------------------------------
# Feature distribution over the layers of a group (Appendix F)
# --------------------------------------------------------------------------------------------


class FeatureDistribution(NamedTuple):
    """How a Group-SAE's latents fire over the layers of its group (Figures 15-17).

    ``counts[l, i]``: tokens of layer ``layers[l]`` where latent i fired; ``share[l, i]`` the
    fraction of latent i's firings that were at that layer (0 for a latent that never fired);
    ``mean_layer[i]`` the firing-weighted mean model layer (NaN if it never fired); ``order``
    the latents that fired, sorted by mean layer (the figures' x axis)."""

    layers: list[int]
    counts: torch.Tensor  # [L_g, m] int64
    share: torch.Tensor  # [L_g, m]
    mean_layer: torch.Tensor  # [m]
    order: torch.Tensor  # [m_fired]


def feature_distribution(counts: torch.Tensor, layers: list[int]) -> FeatureDistribution:
    """From per-layer firing counts ``[L_g, m]`` (tokens of each layer where each latent fired,
    e.g. :attr:`~gsae.eval.metrics.ReconstructionStats.fired` stacked over the group)."""
    counts = counts.detach().cpu().long()
    if counts.dim() != 2 or counts.shape[0] != len(layers):
        raise ValueError(f"counts must be [{len(layers)} layers, m], got {tuple(counts.shape)}")
    total = counts.sum(0)  # [m]
    share = counts.double() / total.clamp_min(1).double()
    ids = torch.tensor(layers, dtype=torch.float64)
    mean_layer = (share * ids[:, None]).sum(0)
    mean_layer[total == 0] = float("nan")
    fired = torch.nonzero(total > 0).squeeze(1)
    order = fired[torch.argsort(mean_layer[fired], stable=True)]
    return FeatureDistribution(list(layers), counts, share, mean_layer, order)
