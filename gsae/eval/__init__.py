"""Evaluation of trained (Group-)SAEs: the paper's metrics, similarities, tables and figures.

- :mod:`gsae.eval.runs`: runs that can be compared, held-out text (reading a run is
  :mod:`gsae.run`'s);
- :mod:`gsae.eval.metrics`: FVU (Eq. 6), ΔCE (Eq. 7), CE recovered, KL, the group aggregation;
- :mod:`gsae.eval.similarity`: MMCS (Eq. 18), MMCO (Eqs. 12-17), feature distribution (App. F);
- :mod:`gsae.eval.evaluate`: the pass over held-out tokens (:func:`evaluate_runs`);
- :mod:`gsae.eval.report`: metrics.jsonl/.csv, Tables 1-2, figures and report.html.
"""

from .evaluate import (
    EvalResult,
    LayerResult,
    RunSaes,
    evaluate,
    evaluate_run,
    evaluate_runs,
    prepare,
    run_plan,
)
from .metrics import ce_recovered, delta_ce, fvu, kl_score, pooled
from .runs import HeldOut
from .similarity import CoOccurrence, feature_distribution, mmcs

__all__ = [
    "CoOccurrence",
    "EvalResult",
    "HeldOut",
    "LayerResult",
    "RunSaes",
    "ce_recovered",
    "delta_ce",
    "evaluate",
    "evaluate_run",
    "evaluate_runs",
    "feature_distribution",
    "fvu",
    "kl_score",
    "mmcs",
    "pooled",
    "prepare",
    "run_plan",
]
