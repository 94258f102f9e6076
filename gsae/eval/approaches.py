"""The runs gsae-eval compares as the paper's approaches (Table 1's rows): per run its approach,
AMAD(G), training FLOPs relative to per-layer SAEs and metrics pooled over the table's layers
(:func:`~.metrics.pooled`), read by the tables (:mod:`.report`) and the figures (:mod:`.figures`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import grouping as gp
from ..run import FinishedRun
from .evaluate import EvalPlan, EvalResult
from .metrics import Pooled, pooled

POOLED = (
    "fvu",
    "delta_ce_pct",
    "ce_recovered",
    "kl_score",
    "cosine",
    "l0",
    "never_fired",
    "mmcs",
    "mmco",
)


@dataclass
class RunSummary:
    """One run as a point of the paper's comparisons."""

    run: FinishedRun
    approach: str
    num_groups: int
    expansion: float
    amad: float  # AMAD(G) of its partition (NaN: no distances known)
    flops_fraction: float  # training FLOPs relative to the reference per-layer SAEs
    metrics: dict[str, Pooled]  # over the table's layers
    is_baseline: bool
    is_g_hat: bool


def g_hat_of(runs: list[FinishedRun]) -> int | None:
    """Ĝ of the model (the smallest G with AMAD(G) below the threshold), from the first run
    whose groups.json measured the distances (its ``g_hat`` is the G trained for ``--groups
    N``, so Ĝ is chosen again from the partitions, as gsae-groups does)."""
    import warnings

    for run in runs:
        g = run.grouping
        if g is not None and g.distances:
            with warnings.catch_warnings():  # none below the threshold: the largest G, quietly
                warnings.simplefilter("ignore", RuntimeWarning)
                return gp.choose_g_hat({n: p.amad for n, p in g.partitions.items()}, g.threshold)
    return None


def distances_of(runs: list[FinishedRun]) -> tuple[np.ndarray, list[int]] | None:
    for run in runs:
        if run.grouping is not None and run.grouping.distances:
            return np.asarray(run.grouping.distances), list(run.grouping.layers)
    return None


def approach(run: FinishedRun, reference_c: float, g_hat: int | None) -> str:
    """The run's row name in Table 1 (from its ``--groups`` setting and size)."""
    spec = run.groups_spec
    c = run.expansion_factor
    if run.per_layer:
        if c < reference_c:
            return f"Smaller SAEs (all layers, c'={c:g})"
        return f"Per-layer SAEs (baseline, c={c:g})"
    g = run.num_groups
    mark = "Ĝ" if g == g_hat else "G"
    if spec.startswith("even:"):
        return f"Group SAEs (evenly spaced, {mark}={g})"
    if spec == "file":
        return f"Group SAEs (groups file, {mark}={g})"
    return f"Group SAEs (AMAD, {mark}={g})"


def table_layers(runs: list[FinishedRun]) -> list[int]:
    """The layers Table 1 averages over: those every run grouped (all but the last, usually:
    the last layer has an SAE of its own in every approach)."""
    common = set(runs[0].grouped_layers)
    for run in runs[1:]:
        common &= set(run.grouped_layers)
    return sorted(common) or sorted(set.intersection(*(set(r.layers) for r in runs)))


def training_flops(run: FinishedRun, loaded, kernels: str = "dense") -> float:
    """Per-token training FLOPs of a run: one forward A plus one step T of each of its SAEs
    (:func:`gsae.grouping.model_costs`, at the run's context, expansion and k)."""
    a_cost, _, _ = gp.model_costs(
        loaded, run.grouped_layers, int(run.arg("ctx_len")), 1, run.k, kernels
    )
    steps = sum(gp.sae_flops_per_token(loaded.d_model, sae.m, sae.k, kernels) for sae in run.saes)
    return float(a_cost + steps)  # T at each SAE's own width


def summarize(result: EvalResult, plan: EvalPlan) -> list[RunSummary]:
    runs = plan.runs
    layers = table_layers(runs)
    g_hat = g_hat_of(runs)
    reference = plan.baseline or max(
        (r for r in runs if r.per_layer), key=lambda r: r.expansion_factor, default=None
    )
    reference_c = (
        max(r.expansion_factor for r in runs) if reference is None else (reference.expansion_factor)
    )
    known = distances_of(runs)
    out = []
    for run in runs:
        rows = {r.layer: r.flat() for r in result.for_run(run.name)}
        by_group = {}
        for layer in layers:
            by_group.setdefault(rows[layer]["group"], []).append(rows[layer])
        metrics = {
            key: pooled([[row.get(key) for row in group] for group in by_group.values()])
            for key in POOLED
        }
        amad = float("nan")
        if known is not None:
            dist, dist_layers = known
            if set(run.grouped_layers) == set(dist_layers):
                amad = gp.amad(dist, run_labels(run, dist_layers))
        cost = training_flops(run, plan.loaded)
        if reference is not None:
            ref_cost = training_flops(reference, plan.loaded)
        else:  # one SAE per layer at the largest expansion among the runs
            ref_cost = _per_layer_cost(run, plan.loaded, reference_c)
        out.append(
            RunSummary(
                run,
                approach(run, reference_c, g_hat),
                run.num_groups,
                run.expansion_factor,
                amad,
                cost / ref_cost,
                metrics,
                reference is not None and run is reference,
                run.num_groups == g_hat and not run.per_layer,
            )
        )
    return out


def run_labels(run: FinishedRun, layers: list[int]) -> list[int]:
    first: dict[str, int] = {}
    return [first.setdefault(run.sae_for(x).name, len(first)) for x in layers]


def _per_layer_cost(run: FinishedRun, loaded, c: float) -> float:
    a_cost, _, _ = gp.model_costs(
        loaded, run.grouped_layers, int(run.arg("ctx_len")), 1, run.k, "dense"
    )
    d = loaded.d_model
    return a_cost + loaded.num_layers * gp.sae_flops_per_token(d, int(c * d), run.k, "dense")
