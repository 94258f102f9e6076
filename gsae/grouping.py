"""Which layers share an SAE: angular distances, complete-linkage groups, AMAD and savings.

1. :class:`AngularDistances` streams hidden states ``[L, N, d]`` and keeps float64 sums of
   ``arccos(cos(x_i, x_j)) / pi`` and a token count (paper Eq. 11), so any number of tokens,
   batches or processes can be merged.
2. :func:`complete_linkage` merges, bottom-up, the two groups whose *largest* member distance is
   smallest (paper section 3.1, footnote 1), recording the partition for every G.
3. :func:`amad` is the mean over groups of the largest distance inside each group (Eq. 4), and
   ``G_hat`` the smallest G with AMAD(G) below the threshold (0.2 in the paper).
4. :func:`compute_savings` gives Delta(G) = (A + G T) / (A + L T) - 1 (Eq. 5), with A and T from
   the one FLOP model, :func:`model_costs` (gsae-groups and gsae-train print the same Delta).

:func:`group_layers` runs 2-4 on a distance matrix and returns a :class:`Grouping`, which reads
and writes ``groups.json``; :func:`measure_model` does it all for a loaded model and a text
source.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .angular import angular_distance_sums
from .io import write_json
from .progress import progress_bar
from .sae import SaeSettings

DEFAULT_THRESHOLD = 0.2

# --------------------------------------------------------------------------------------------
# Streaming distances
# --------------------------------------------------------------------------------------------


class AngularDistances:
    """Running mean angular distance between ``num_layers`` layers.

    ``update(hidden [L, N, d])`` per batch (any device: the C++ extension on a CPU, the torch
    path on a GPU), ``matrix()`` at the end. ``center=True`` first subtracts a running mean of
    each layer's activations (the authors' published code does this; the paper's Eq. 11 does
    not, hence off by default). Accumulators from several processes combine with ``merge``.
    """

    def __init__(self, num_layers: int, center: bool = False):
        self.num_layers = num_layers
        self.center = center
        self.sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.count = 0
        self.mean: torch.Tensor | None = None  # [L, d] float64, when centring

    def update(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[0] != self.num_layers:
            raise ValueError(
                f"expected hidden states [{self.num_layers}, N, d], got {tuple(hidden.shape)}"
            )
        if self.center:
            hidden = self._centred(hidden)
        sums, count = angular_distance_sums(hidden)
        self.sums += sums.cpu()
        self.count += int(count)

    def _centred(self, hidden: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[1]
        batch_mean = hidden.double().mean(1).cpu()  # [L, d]
        if self.mean is None:
            self.mean = batch_mean
        else:  # running mean over every token seen, this batch included
            self.mean += (batch_mean - self.mean) * (n / (self.count + n))
        mean = self.mean.to(device=hidden.device, dtype=torch.float32)
        return (hidden.float() - mean[:, None, :]).to(hidden.dtype)

    def merge(self, other: AngularDistances) -> AngularDistances:
        if other.num_layers != self.num_layers or other.center != self.center:
            raise ValueError("can only merge accumulators over the same layers and centring")
        self.sums += other.sums
        self.count += other.count
        return self

    def matrix(self) -> np.ndarray:
        """The ``[L, L]`` mean distance matrix (float64)."""
        if self.count == 0:
            raise ValueError("no tokens seen: call update() with hidden states first")
        matrix = (self.sums / self.count).numpy()
        if not np.isfinite(matrix).all():
            raise FloatingPointError("the distance matrix has non-finite entries (NaN inputs?)")
        return matrix

    def state_dict(self) -> dict:
        return {
            "sums": self.sums.clone(),
            "count": self.count,
            "center": self.center,
            "mean": self.mean,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].clone()
        self.count = int(state["count"])
        self.center = bool(state["center"])
        self.mean = state.get("mean")


def measure_distances(
    batches, num_layers: int, tokens: int, center: bool = False, progress=None
) -> AngularDistances:
    """Accumulate distances over hidden-state batches ``[L, N, d]`` until ``tokens`` are seen
    (the last batch is trimmed to the budget). ``progress(n)`` is told of every batch."""
    acc = AngularDistances(num_layers, center=center)
    for hidden in batches:
        hidden = hidden[:, : tokens - acc.count]
        acc.update(hidden)
        if progress is not None:
            progress(hidden.shape[1])
        if acc.count >= tokens:
            break
    return acc


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------


def check_distance_matrix(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"a distance matrix must be square [L, L], got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the distance matrix has non-finite entries")
    if not np.allclose(m, m.T, atol=1e-9):
        raise ValueError("the distance matrix is not symmetric")
    return m


def read_matrix(path: str | Path) -> np.ndarray:
    """An L x L distance matrix from a ``.npy`` file, a JSON list of lists, or a groups.json."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no matrix file at {p}")
    try:  # whatever the file holds, one message naming it
        if p.suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "distances" in data:  # a groups.json works too
                data = data["distances"]
        return check_distance_matrix(data)
    except (ValueError, TypeError, OSError, EOFError) as err:  # JSON and Unicode errors too
        raise ValueError(
            f"{p} is not an L x L distance matrix (expected a .npy file, a JSON list of lists "
            f"or a groups.json): {err}"
        ) from None


def canonical_labels(labels: Sequence[int]) -> list[int]:
    """Renumber groups 0..G-1 in order of their first member."""
    first: dict[int, int] = {}
    return [first.setdefault(label, len(first)) for label in labels]


def complete_linkage(matrix) -> dict[int, list[int]]:
    """Agglomerative clustering with complete linkage on a precomputed distance matrix.

    Returns ``{G: labels}`` for every G from L down to 1. Ties between equally close pairs of
    groups go to the pair with the lowest (first-member) indices, so the result is deterministic.
    """
    dist = check_distance_matrix(matrix)
    n = dist.shape[0]
    clusters = [[i] for i in range(n)]
    linkage = dist.copy()  # linkage[a, b]: largest distance between members of clusters a, b
    np.fill_diagonal(linkage, np.inf)
    partitions = {n: list(range(n))}
    while len(clusters) > 1:
        a, b = np.unravel_index(np.argmin(linkage), linkage.shape)
        a, b = min(a, b), max(a, b)
        clusters[a] = sorted(clusters[a] + clusters[b])
        merged = np.maximum(linkage[a], linkage[b])  # complete linkage: the farther member
        linkage[a], linkage[:, a] = merged, merged
        linkage[a, a] = np.inf
        linkage = np.delete(np.delete(linkage, b, axis=0), b, axis=1)
        del clusters[b]
        labels = [0] * n
        for label, members in enumerate(clusters):
            for i in members:
                labels[i] = label
        partitions[len(clusters)] = canonical_labels(labels)
    return partitions


def euclidean_rows(matrix) -> np.ndarray:
    """Pairwise Euclidean distances between the rows of a matrix: clustering these reproduces
    the authors' published code, which gave the distance matrix to sklearn as features."""
    m = np.asarray(matrix, dtype=np.float64)
    return np.sqrt(((m[:, None, :] - m[None, :, :]) ** 2).sum(-1))


def amad(matrix, labels: Sequence[int]) -> float:
    """Average over groups of the largest distance between two members (0 for a singleton)."""
    dist = np.asarray(matrix, dtype=np.float64)
    labels = np.asarray(labels)
    worst = []
    for g in np.unique(labels):
        members = np.flatnonzero(labels == g)
        worst.append(dist[np.ix_(members, members)].max() if len(members) > 1 else 0.0)
    return float(np.mean(worst))


def even_groups(num_layers: int, num_groups: int) -> list[int]:
    """Contiguous groups of near-equal size (the paper's evenly spaced baseline)."""
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"need 1 <= groups <= {num_layers} layers, got {num_groups}")
    return [i * num_groups // num_layers for i in range(num_layers)]


# --------------------------------------------------------------------------------------------
# Compute savings
# --------------------------------------------------------------------------------------------


def forward_flops_per_token(layer_params: int, num_layers: int, d_model: int, ctx_len: int) -> int:
    """FLOPs of one forward pass through ``num_layers`` layers, per token (Kaplan et al. 2020):
    ``2 * layer_params * num_layers`` for the matmuls plus ``2 * num_layers * ctx_len * d_model``
    for attention scores and values (the causal average of the quadratic term)."""
    return 2 * layer_params * num_layers + 2 * num_layers * ctx_len * d_model


def sae_flops_per_token(d: int, m: int, k: int, kernels: str = "sparse") -> int:
    """FLOPs of one SAE training step, per token.

    ``dense``: the usual implementation, ``10 d m``: encoder forward 2dm, dense decode 2dm, and
    their backward 6dm (this is what the paper's Table 2 numbers imply).
    ``sparse``: gsae's kernels, ``2 d m + 8 k d``: the encoder matmul stays dense, the decode,
    the value gradients and both weight gradients touch only the k selected latents.
    """
    if kernels == "dense":
        return 10 * d * m
    if kernels == "sparse":
        return 2 * d * m + 8 * k * d
    raise ValueError(f"kernels must be 'sparse' or 'dense', got {kernels!r}")


def compute_savings(
    num_groups: int, num_layers: int, forward_cost: float, sae_cost: float, extra_saes: int = 0
) -> float:
    """Delta(G) = (A + G T) / (A + L T) - 1 (paper Eq. 5).

    ``forward_cost`` is A, ``sae_cost`` is T (any unit: FLOPs or measured seconds). Unlike the
    paper's Table 2, ``extra_saes`` counts the SAEs trained in both settings (the last layer's
    own SAE), so the ratio is between the totals actually paid.
    """
    trained = forward_cost + (num_groups + extra_saes) * sae_cost
    baseline = forward_cost + (num_layers + extra_saes) * sae_cost
    return trained / baseline - 1


def model_costs(
    loaded, grouped: Sequence[int], ctx_len: int, expansion: int, k: int, kernels: str = "sparse"
) -> tuple[float, float, int]:
    """(A, T, extra SAEs) per token for a loaded model (:class:`gsae.activations.LoadedModel`):
    A is the forward through every layer that gets an SAE, T one SAE step, and the last layer's
    own SAE is counted when it is not grouped."""
    n = loaded.num_layers
    extra = 0 if (n - 1) in grouped else 1
    a_cost = forward_flops_per_token(loaded.layer_params, n, loaded.d_model, ctx_len)
    t_cost = sae_flops_per_token(loaded.d_model, expansion * loaded.d_model, k, kernels)
    return float(a_cost), float(t_cost), extra


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


class Partition(NamedTuple):
    """One grouping: a label per grouped layer (0..G-1 in order of first layer) and its AMAD."""

    labels: list[int]
    amad: float


@dataclass
class Grouping:
    """Distances, every partition from G = 1 to L - 1 and the chosen G_hat, as in groups.json."""

    model: str
    layers: list[int]  # the model layers that were grouped, in order
    distances: list[list[float]]
    tokens: int
    partitions: dict[int, Partition]
    g_hat: int
    threshold: float
    savings: dict[int, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. {"last_layer": 11, "cluster_space": ...}

    def groups(self, num_groups: int | None = None) -> list[list[int]]:
        """Model layers of each group, for G (default: the G trained, else G_hat)."""
        g = num_groups or self.extra.get("g_trained") or self.g_hat
        if g not in self.partitions:
            raise ValueError(f"no partition with G={g}; have {sorted(self.partitions)}")
        out: list[list[int]] = [[] for _ in range(g)]
        for layer, label in zip(self.layers, self.partitions[g].labels, strict=True):
            out[label].append(layer)
        return out

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "layers": self.layers,
            "distances": self.distances,
            "tokens": self.tokens,
            "partitions": {
                str(g): {"labels": p.labels, "amad": p.amad}
                for g, p in sorted(self.partitions.items())
            },
            "g_hat": self.g_hat,
            "threshold": self.threshold,
            "savings": {str(g): s for g, s in sorted(self.savings.items())},
            **self.extra,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Grouping:
        """Read and check a groups.json: a clear error for anything that would train the wrong
        groups (labels outside 0..G-1, an empty group, repeated layers, G_hat missing)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no groups file at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        missing = [k for k in ("model", "layers", "partitions", "g_hat") if k not in data]
        if not isinstance(data, dict) or missing:
            raise ValueError(f"{path} is not a groups.json (missing {missing})")
        known = {f.name for f in fields(cls)} - {"extra"}  # the keys to_json writes itself
        try:
            layers = [_index(x, "layer") for x in data["layers"]]
            partitions = {
                int(g): Partition([_index(x, "label") for x in p["labels"]], _number(p.get("amad")))
                for g, p in data["partitions"].items()
            }
            g_hat = int(data["g_hat"])
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}: malformed groups file ({err})") from None
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"{path}: layers must be distinct, got {layers}")
        for g, p in partitions.items():
            if len(p.labels) != len(layers):
                raise ValueError(
                    f"{path}: partition G={g} has {len(p.labels)} labels for {len(layers)} layers"
                )
            if sorted(set(p.labels)) != list(range(g)):
                raise ValueError(
                    f"{path}: partition G={g} has labels {p.labels}; each of "
                    f"0..{g - 1} must label at least one layer"
                )
        if g_hat not in partitions:
            raise ValueError(
                f"{path}: g_hat = {g_hat} has no partition (have {sorted(partitions)})"
            )
        return cls(
            model=str(data["model"] or ""),
            layers=layers,
            distances=data.get("distances") or [],
            tokens=int(data.get("tokens") or 0),
            partitions=partitions,
            g_hat=g_hat,
            threshold=_number(data.get("threshold", DEFAULT_THRESHOLD)),
            savings={int(g): _number(s) for g, s in (data.get("savings") or {}).items()},
            extra={k: v for k, v in data.items() if k not in known},
        )


def _index(value, what: str) -> int:
    """A non-negative int (JSON may hold 2.0 for 2; never True or 2.5)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not float(value).is_integer() or value < 0:
        raise ValueError(f"a {what} must be a non-negative integer, got {value!r}")
    return int(value)


def _number(value) -> float:
    """A float; null (how strict JSON writes NaN) reads back as NaN."""
    return float("nan") if value is None else float(value)


def check_threshold(threshold: float) -> float:
    """An AMAD threshold: AMAD lies in [0, 1] (distances are angles over pi), so one below 0
    or above 1 means nothing (0 itself: no G qualifies, G_hat falls back to the largest)."""
    if not 0 <= threshold <= 1:
        raise ValueError(
            f"--threshold {threshold}: AMAD lies between 0 and 1, so the threshold must too "
            f"(default {DEFAULT_THRESHOLD})"
        )
    return threshold


def choose_g_hat(amads: dict[int, float], threshold: float) -> int:
    """Smallest G with AMAD(G) < threshold; if none, the largest G tried, with a warning."""
    below = [g for g, a in sorted(amads.items()) if a < threshold]
    if below:
        return below[0]
    fallback = max(amads)
    warnings.warn(
        f"no G has AMAD below {threshold}; using G = {fallback} (one layer per group but one)",
        RuntimeWarning,
        stacklevel=2,
    )
    return fallback


def group_layers(
    matrix,
    layers: Sequence[int] | None = None,
    model: str = "",
    tokens: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    cluster_space: str = "precomputed",
    costs: tuple[float, float, int] | None = None,
    extra: dict | None = None,
) -> Grouping:
    """Partitions for G = 1 .. L-1 of the layers of ``matrix`` (L x L), their AMAD and G_hat.

    ``cluster_space``: ``precomputed`` (the paper: complete linkage on the distances) or
    ``rows`` (Euclidean complete linkage on the matrix rows, as the authors' code). AMAD is
    always measured on the angular distances. ``costs = (A, T, extra_saes)`` adds Delta(G).
    """
    check_threshold(threshold)
    dist = check_distance_matrix(matrix)
    n = dist.shape[0]
    layers = list(range(n)) if layers is None else [int(x) for x in layers]
    if len(layers) != n:
        raise ValueError(f"{len(layers)} layer ids for a {n} x {n} distance matrix")
    if cluster_space not in ("precomputed", "rows"):
        raise ValueError(f"cluster_space must be 'precomputed' or 'rows', got {cluster_space!r}")
    space = dist if cluster_space == "precomputed" else euclidean_rows(dist)
    all_partitions = complete_linkage(space)
    g_values = range(1, n) if n > 1 else range(1, 2)  # G < L: grouping only pays with a merge
    partitions = {g: Partition(all_partitions[g], amad(dist, all_partitions[g])) for g in g_values}
    g_hat = choose_g_hat({g: p.amad for g, p in partitions.items()}, threshold)
    savings = {}
    if costs is not None:
        a_cost, t_cost, extra_saes = costs
        savings = {g: compute_savings(g, n, a_cost, t_cost, extra_saes) for g in partitions}
    return Grouping(
        model=model,
        layers=layers,
        distances=[[float(v) for v in row] for row in dist],
        tokens=int(tokens),
        partitions=partitions,
        g_hat=g_hat,
        threshold=threshold,
        savings=savings,
        extra={"cluster_space": cluster_space, **(extra or {})},
    )


def measure_model(
    loaded,
    texts,
    *,
    tokens: int,
    ctx_len: int,
    batch_size: int,
    repeat: bool = False,
    include_last: bool = False,
    center: bool = False,
    cluster_space: str = "precomputed",
    threshold: float = DEFAULT_THRESHOLD,
    expansion_factor: int = SaeSettings.expansion_factor,
    k: int = SaeSettings.k,
    batches=None,
    merge=None,
) -> Grouping:
    """Stream ``tokens`` tokens of ``texts`` through a loaded model, measure the mean angular
    distance between its layers (the last one too with ``include_last``) and group them.

    ``loaded`` is a :class:`gsae.activations.LoadedModel`; ``texts`` a
    :class:`gsae.activations.TextSource`. The result records the model (as named and where it
    was loaded from), its depth and Delta(G) for gsae's sparse SAE step and a dense one.

    For several processes, each measuring its own part of the data: ``batches(layers)`` is a
    context manager of this process's ``[L, N, d]`` batches (``tokens`` is then its own budget,
    and saying whether the data ran short is the caller's job), and ``merge(acc)`` returns the
    accumulator of every process combined (:meth:`AngularDistances.merge`)."""
    import time

    from .hf.hooks import hidden_states

    check_threshold(threshold)  # before the measurement, not after it
    if tokens < 1:
        raise ValueError(f"--tokens {tokens}: the distances need at least 1 token")
    n = loaded.num_layers
    layers = list(range(n if include_last or n == 1 else n - 1))
    start = time.perf_counter()
    if batches is None:
        source = hidden_states(loaded, layers, texts, ctx_len, batch_size, repeat)
    else:
        source = batches(layers)
    label = "distances" if merge is None else "distances, own shards"  # tokens: this process's
    with source as stream, progress_bar(tokens, label) as bar:
        acc = measure_distances(stream, len(layers), tokens, center, bar.update)
    if merge is not None:
        acc = merge(acc)
    elif acc.count < tokens:
        warnings.warn(
            f"the dataset ran out after {acc.count} of {tokens} tokens (--repeat cycles over it)",
            RuntimeWarning,
            stacklevel=2,
        )
    costs = model_costs(loaded, layers, ctx_len, expansion_factor, k, "sparse")
    dense = model_costs(loaded, layers, ctx_len, expansion_factor, k, "dense")
    result = group_layers(
        acc.matrix(),
        layers,
        model=loaded.name,
        tokens=acc.count,
        threshold=threshold,
        cluster_space=cluster_space,
        costs=costs,
        extra={
            "model_source": loaded.source,
            "num_model_layers": n,
            "center": center,
            "ctx_len": ctx_len,
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    result.extra["savings_dense_sae"] = {
        str(g): compute_savings(g, len(layers), *dense) for g in result.partitions
    }
    return result
