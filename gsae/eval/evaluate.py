"""Every metric of every SAE of every run, from one stream of held-out tokens.

:func:`evaluate` is the loop: per batch, one clean forward records the residual stream of every
layer needed (and the logits); each SAE encodes and decodes its layers (reconstruction metrics,
firing counts); each reconstruction is spliced back into a forward of its own (downstream
metrics, against the clean forward and a zero ablation of the layer); the top-k indices feed the
MMCO counts against the baseline. When the MMCO counts of all layer pairs do not fit in
``mmco_memory``, later passes over the same tokens fill the rest (forward and encode only).

Forwards per batch: 1 clean + one zero ablation per layer + one per (run, layer).

:func:`prepare` / :func:`evaluate_runs` do the same from gsae-train output folders, checking
everything that can be checked before any work.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..device import default_dtype, resolve_device
from ..hf.hooks import ActivationReader, lm_logits, record, splice
from ..hf.models import LoadedModel, context_length, load_model
from ..hf.texts import TextSource, heldout_split, open_texts
from ..hf.tokens import StreamPosition, TokenBatch, TokenStream
from ..run import FinishedRun, RunData, load_run
from ..sae import Sae
from .metrics import (
    Downstream,
    LossSums,
    Reconstruction,
    ReconstructionStats,
    downstream,
    next_token_losses,
    reference_logprobs,
    scored_positions,
)
from .runs import check_model, check_runs, heldout_start
from .similarity import CoOccurrence, FeatureDistribution, Mmco, feature_distribution, mmcs

MMCO_PAIRS = ("all", "same-group", "diagonal", "none")
DEFAULT_MMCO_MEMORY = 4 << 30


@dataclass
class RunSaes:
    """A run as :func:`evaluate` takes it: a name and its SAEs, by group name."""

    name: str
    saes: dict[str, Sae]

    def layers(self) -> list[int]:
        return sorted(layer for sae in self.saes.values() for layer in sae.layers)

    def group_of(self, layer: int) -> str:
        return next(name for name, sae in self.saes.items() if layer in sae.layers)


class LayerResult(NamedTuple):
    """Everything measured for one SAE at one layer. ``downstream`` is None for a model without
    an LM head; ``mmcs``/``mmco`` are None without a baseline (or for the baseline itself).
    ``mmcs_init`` is the MMCS of the two SAEs' decoders as initialised (from their configs'
    seeds): SAEs trained with the same seed start from the same random decoder, and the
    similarity they keep from it is not learned."""

    run: str
    group: str
    layer: int
    reconstruction: Reconstruction
    downstream: Downstream | None
    mmcs: float | None
    mmco: Mmco | None
    mmcs_init: float | None = None

    def flat(self) -> dict:
        """One flat record: run, group, layer and every metric by name."""
        out = {"run": self.run, "group": self.group, "layer": self.layer}
        out.update(self.reconstruction._asdict())
        if self.downstream is not None:
            out.update(self.downstream._asdict())
        out["mmcs"] = self.mmcs
        out["mmcs_init"] = self.mmcs_init
        out.update(self.mmco._asdict() if self.mmco else {"mmco": None})
        return out


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    ``mmco[run][(baseline layer, run layer)]`` and ``mmcs[run][(baseline layer, group)]`` compare
    each run with the baseline; ``features[run][group]`` is the Appendix F distribution."""

    tokens: int
    positions: int  # next-token predictions scored (0 without an LM head)
    layers: list[LayerResult]
    features: dict[str, dict[str, FeatureDistribution]]
    mmco: dict[str, dict[tuple[int, int], Mmco]]
    mmcs: dict[str, dict[tuple[int, str], float]]
    mmcs_init: dict[str, dict[tuple[int, str], float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    passes: int = 1
    seconds: float = 0.0

    def for_run(self, run: str) -> list[LayerResult]:
        return [r for r in self.layers if r.run == run]


def mmco_pairs(
    runs: Sequence[RunSaes], baseline: RunSaes | None, mode: str = "all"
) -> list[tuple[str, int, int]]:
    """(run, baseline layer, run layer) for which MMCO is counted. ``all``: every pair of layers
    both cover (the paper's heatmaps); ``same-group``: pairs inside one SAE's group;
    ``diagonal``: the same layer; ``none``. A run of per-layer SAEs other than the baseline
    (e.g. smaller SAEs) gets the diagonal only: its SAE at a layer never saw another layer."""
    if mode not in MMCO_PAIRS:
        raise ValueError(f"mmco pairs must be one of {MMCO_PAIRS}, got {mode!r}")
    if baseline is None or mode == "none":
        return []
    pairs = []
    for run in runs:
        if run.name == baseline.name:
            continue
        common = sorted(set(run.layers()) & set(baseline.layers()))
        per_layer = all(len(sae.layers) == 1 for sae in run.saes.values())
        for l1, l2 in itertools.product(common, common):
            keep = {
                "all": not per_layer or l1 == l2,
                "diagonal": l1 == l2,
                "same-group": run.group_of(l1) == run.group_of(l2),
            }[mode]
            if keep:
                pairs.append((run.name, l1, l2))
    return pairs


def _plan_passes(pairs, size_of, budget: int) -> list[list]:
    """Split the MMCO pairs into passes whose counts fit in ``budget`` bytes (pass 0 always)."""
    passes: list[list] = [[]]
    used = 0
    for pair in pairs:
        size = size_of(pair)
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(pair)
        used += size
    return passes


def trim_mask(mask: torch.Tensor, budget: int) -> torch.Tensor:
    """The attention mask with every real token past the first ``budget`` (row-major) masked:
    a trimmed row ends early, like padding, so earlier positions are unchanged."""
    flat = mask.flatten()
    keep = torch.cumsum(flat, 0) <= budget
    return (flat * keep).view_as(mask)


class _Clean(NamedTuple):
    """One batch's clean forward: residual streams ``{layer: [B, T, d]}``, the attention mask,
    the scored positions ``[B, T-1]`` and the clean log-probabilities there ``[P, V]``."""

    hidden: dict
    mask: torch.Tensor
    valid: torch.Tensor
    reference: torch.Tensor


class _Evaluator:
    def __init__(
        self,
        loaded: LoadedModel,
        runs: Sequence[RunSaes],
        tokens: int,
        baseline: str | None,
        downstream: bool,
        pairs: str,
        mmco_memory: int,
        progress: Callable[[int], None] | None,
    ):
        self.loaded, self.runs, self.tokens = loaded, list(runs), tokens
        self.device = next(loaded.model.parameters()).device
        self.by_name = {run.name: run for run in self.runs}
        if baseline is not None and baseline not in self.by_name:
            raise ValueError(f"the baseline {baseline!r} is not one of the runs")
        self.baseline = self.by_name.get(baseline) if baseline else None
        self.asked_downstream = downstream
        self.downstream = downstream and loaded.lm_head
        self.progress = progress
        self.layers = sorted({layer for run in self.runs for layer in run.layers()})
        self.recon = {
            (run.name, layer): ReconstructionStats(sae.d, sae.m, self.device)
            for run in self.runs
            for sae in run.saes.values()
            for layer in sae.layers
        }
        self.spliced = {key: LossSums(self.device) for key in self.recon}
        self.clean = LossSums(self.device)
        self.zero = {layer: LossSums(self.device) for layer in self.layers}
        pair_list = mmco_pairs(self.runs, self.baseline, pairs)
        self.passes = _plan_passes(pair_list, self._pair_bytes, mmco_memory)
        self.mmco: dict[str, dict[tuple[int, int], Mmco]] = {}
        self._init_cache: dict[tuple, float] = {}
        self.seen = 0

    def _sae(self, run: str, layer: int) -> Sae:
        r = self.by_name[run]
        return r.saes[r.group_of(layer)]

    def _pair_bytes(self, pair) -> int:
        run, l1, l2 = pair
        return CoOccurrence.nbytes(self._sae(self.baseline.name, l1).m, self._sae(run, l2).m)

    # ---- passes

    def run(self, batches: Callable[[], Iterable[TokenBatch]]) -> None:
        for number, pairs in enumerate(self.passes):
            counts = {
                (run, l1, l2): CoOccurrence(
                    self._sae(self.baseline.name, l1).m, self._sae(run, l2).m, self.device
                )
                for run, l1, l2 in pairs
            }
            seen = self._pass(batches, number == 0, counts)
            if number == 0:
                self.seen = seen
            elif seen != self.seen:
                raise RuntimeError(
                    f"pass {number + 1} saw {seen} tokens, the first {self.seen}: "
                    "the token stream is not reproducible"
                )
            for (run, l1, l2), acc in counts.items():
                self.mmco.setdefault(run, {})[(l1, l2)] = acc.mmco()
            del counts

    @torch.inference_mode()
    def _pass(self, batches, first: bool, counts: dict) -> int:
        needed = self.layers if first else sorted({x for _, a, b in counts for x in (a, b)})
        if not first and not needed:
            return self.seen
        seen = 0
        stream = iter(batches())
        try:
            for batch in stream:
                if seen >= self.tokens:
                    break
                mask = trim_mask(batch.attention_mask, self.tokens - seen)
                n = int(mask.sum())
                if n == 0:
                    continue
                self._batch(batch.input_ids, mask, needed, first, counts)
                seen += n
                if self.progress is not None:
                    self.progress(n)
        finally:  # a generator over a TokenStream closes the stream's thread
            getattr(stream, "close", lambda: None)()
        return seen

    def _batch(self, input_ids, mask, needed, first: bool, counts: dict) -> None:
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        keep = mask.bool().flatten()
        clean = None
        if first and self.downstream:
            clean = self._clean(input_ids, mask, needed)
            xs = {layer: clean.hidden[layer].flatten(0, 1)[keep] for layer in needed}  # [N, d]
        else:
            stacked = ActivationReader(self.loaded, needed)(input_ids, mask)  # [L, N, d]
            xs = dict(zip(needed, stacked, strict=True))
        latents = {}
        for run in self.runs:
            for layer in run.layers():
                if layer not in xs or not (first or self._wanted(counts, run.name, layer)):
                    continue
                sae = run.saes[run.group_of(layer)]
                enc = sae.encode(xs[layer], layer=layer)
                latents[(run.name, layer)] = (enc.indices, enc.values > 0)
                if first:
                    x_hat = sae.decode(enc.values, enc.indices, layer=layer)
                    self.recon[(run.name, layer)].update(xs[layer], x_hat, enc.indices, enc.values)
                if clean is not None:
                    full = clean.hidden[layer].clone()  # [B, T, d]: padding keeps its value
                    full.view(-1, full.shape[-1])[keep] = x_hat.to(full.dtype)
                    with splice(self.loaded, {layer: lambda h, full=full: full}):
                        self.spliced[(run.name, layer)].update(*self._losses(input_ids, clean))
        for (run, l1, l2), acc in counts.items():
            acc.update(*latents[(self.baseline.name, l1)], *latents[(run, l2)])

    def _clean(self, input_ids, mask, needed) -> _Clean:
        """The clean forward (residual streams and CE) and each layer's zero ablation."""
        with record(self.loaded, needed) as hidden:
            logits = lm_logits(self.loaded, input_ids, mask)
        valid = scored_positions(mask)
        clean = _Clean(hidden, mask, valid, reference_logprobs(logits, valid))
        self.clean.update(next_token_losses(logits, input_ids, valid)[0])
        del logits
        for layer in needed:
            with splice(self.loaded, {layer: torch.zeros_like}):
                self.zero[layer].update(*self._losses(input_ids, clean))
        return clean

    def _losses(self, input_ids, clean: _Clean):
        """CE and KL from the clean distribution of a forward under the active hooks."""
        logits = lm_logits(self.loaded, input_ids, clean.mask)
        return next_token_losses(logits, input_ids, clean.valid, clean.reference)

    def _wanted(self, counts: dict, run: str, layer: int) -> bool:
        base = self.baseline.name if self.baseline else None
        return any(
            (r == run and l2 == layer) or (run == base and l1 == layer) for r, l1, l2 in counts
        )

    # ---- results

    def result(self) -> EvalResult:
        rows, features, similarity, at_init = [], {}, {}, {}
        base = self.baseline
        for run in self.runs:
            if base is not None and run.name != base.name:
                pairs = [
                    (l1, base.saes[base.group_of(l1)], group, sae)
                    for l1 in base.layers()
                    for group, sae in run.saes.items()
                ]
                similarity[run.name] = {
                    (l1, g): mmcs(a.W_dec, b.W_dec).mean for l1, a, g, b in pairs
                }
                at_init[run.name] = {(l1, g): self._mmcs_init(a, b) for l1, a, g, b in pairs}
            features[run.name] = {
                group: feature_distribution(
                    torch.stack([self.recon[(run.name, x)].fired for x in sae.layers]), sae.layers
                )
                for group, sae in run.saes.items()
            }
            for layer in run.layers():
                group = run.group_of(layer)
                key = (run.name, layer)
                down = None
                if self.downstream:
                    down = downstream(self.spliced[key], self.clean, self.zero[layer])
                same = similarity.get(run.name, {}).get((layer, group))
                init = at_init.get(run.name, {}).get((layer, group))
                co = self.mmco.get(run.name, {}).get((layer, layer))
                rows.append(
                    LayerResult(
                        run.name, group, layer, self.recon[key].result(), down, same, co, init
                    )
                )
        notes = []
        if not self.asked_downstream:
            notes.append("downstream metrics not asked for (downstream=False)")
        elif not self.loaded.lm_head:
            reason = self.loaded.no_head_reason or "the model was loaded without its LM head"
            notes.append(f"downstream metrics (ΔCE, CE recovered, KL) skipped: {reason}")
        return EvalResult(
            self.seen,
            self.clean.count,
            rows,
            features,
            self.mmco,
            similarity,
            at_init,
            notes,
            len(self.passes),
        )

    def _mmcs_init(self, a: Sae, b: Sae) -> float:
        """MMCS of the decoders ``a`` and ``b`` started from (an SAE's initial decoder depends
        only on its seed and shape, so few distinct pairs are ever computed)."""
        key = (a.cfg.seed, a.m, a.d, b.cfg.seed, b.m)
        if key not in self._init_cache:
            first = Sae(a.cfg, a.layers).W_dec.to(self.device)
            second = Sae(b.cfg, b.layers).W_dec.to(self.device)
            self._init_cache[key] = mmcs(first, second).mean
        return self._init_cache[key]


def evaluate(
    loaded: LoadedModel,
    runs: Sequence[RunSaes],
    batches: Callable[[], Iterable[TokenBatch]],
    tokens: int,
    *,
    baseline: str | None = None,
    downstream: bool = True,
    pairs: str = "all",
    mmco_memory: int = DEFAULT_MMCO_MEMORY,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate the SAEs of ``runs`` on the first ``tokens`` tokens of ``batches()``.

    ``loaded``: the model, loaded with ``lm_head=True`` for the downstream metrics (Eq. 7, CE
    recovered, KL; skipped with a note when it has no head or ``downstream=False``).
    ``batches``: returns a fresh iterable of :class:`~gsae.activations.TokenBatch` each time it
    is called, giving the same tokens (called again only when the MMCO counts need another pass).
    ``baseline``: the name of a per-layer run among ``runs``: MMCS (Eq. 18) and MMCO (Eq. 17) of
    every other run against it, over the layer ``pairs`` (see :func:`mmco_pairs`), with at most
    ``mmco_memory`` bytes of counts per pass.
    """
    if tokens <= 0:
        raise ValueError(f"nothing to evaluate: a budget of {tokens} tokens")
    if not runs:
        raise ValueError("no runs to evaluate")
    start = time.perf_counter()
    ev = _Evaluator(loaded, runs, tokens, baseline, downstream, pairs, mmco_memory, progress)
    ev.run(batches)
    if ev.seen == 0:
        raise ValueError("the evaluation text holds no tokens")
    result = ev.result()
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# From gsae-train output folders
# --------------------------------------------------------------------------------------------


@dataclass
class EvalPlan:
    """Everything checked and opened, nothing computed: what :func:`run_plan` evaluates."""

    runs: list[FinishedRun]
    baseline: FinishedRun | None
    model: str  # as asked for (the runs' model unless overridden)
    loaded: LoadedModel
    dataset: str
    split: str
    column: str
    ctx_len: int
    batch_size: int
    start: StreamPosition
    repeat: bool
    tokens: int
    device: str
    model_dtype: str
    downstream: bool
    pairs: str
    mmco_memory: int
    notes: list[str]
    first: TokenBatch | None = None
    _stream: TokenStream | None = None
    _texts: TextSource | None = None

    def open(self) -> TokenStream:
        # the runs' own text source: their saved positions are states of it
        if self._texts is None:
            self._texts = open_texts(self.dataset, self.split, self.column)
        return TokenStream(
            self._texts,
            self.loaded.tokenizer,
            ctx_len=self.ctx_len,
            batch_size=self.batch_size,
            position=self.start,
            repeat=self.repeat,
        )

    def batches(self) -> Iterable[TokenBatch]:
        """The evaluation batches, from the start each call (the first call reuses the stream
        that :func:`prepare` opened to check there is text)."""
        stream, self._stream = self._stream, None
        first, self.first = self.first, None
        stream = stream or self.open()
        try:
            if first is not None:
                yield first
            yield from stream
        finally:
            stream.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    @property
    def model_name(self) -> str:
        """The model as the runs (or ``--model``) name it: ``demo``, ``pythia-160m``, ..."""
        return Path(self.model).name

    def config(self) -> dict:
        """The settings that reproduce the evaluation (no paths of this machine but the runs')."""
        return {
            "model": self.model_name,
            "dataset": self.dataset,
            "split": self.split,
            "column": self.column,
            "ctx_len": self.ctx_len,
            "batch_size": self.batch_size,
            "start_document": self.start.documents,
            "repeat": self.repeat,
            "tokens": self.tokens,
            "model_dtype": self.model_dtype,
            "downstream": self.downstream,
            "mmco_pairs": self.pairs,
        }


def prepare(
    run_dirs: Sequence[str | Path],
    *,
    baseline: str | Path | None = None,
    tokens: int = 1_000_000,
    model: str | None = None,
    allow_overlap: bool = False,
    downstream: bool = True,
    pairs: str = "all",
    mmco_memory: int = DEFAULT_MMCO_MEMORY,
    **data,
) -> EvalPlan:
    """Read and check the runs, load the model, open the held-out text and make sure it holds
    tokens: every refusal (:class:`~gsae.run.RunError`, :class:`~gsae.eval.runs.HeldOut`,
    ``ValueError``, and the model's and dataset's load errors) comes from here, before any
    work. ``data``: the fields of :class:`~gsae.run.RunData` (``dataset``, ``split``,
    ``ctx_len``, ``batch_tokens``, ``device``, ...); the split defaults to the held-out one."""
    data = RunData(**data)
    if tokens <= 0:
        raise ValueError(f"--tokens must be > 0, got {tokens}: an evaluation set of 0 tokens")
    if pairs not in MMCO_PAIRS:
        raise ValueError(f"mmco pairs must be one of {MMCO_PAIRS}, got {pairs!r}")
    if not run_dirs:
        raise ValueError("no runs to evaluate")
    device = resolve_device(data.device)
    runs, base = _runs_and_baseline(run_dirs, baseline)
    check_runs(runs, base, model)
    first = next((r for r in runs if not r.foreign), runs[0])  # a gsae-train run's settings
    dataset, trained_split, column, ctx_len = first.data_settings(
        data.dataset, None, data.column, data.ctx_len
    )
    held_split = heldout_split(dataset, trained_split) if data.split is None else None
    split, batch_tokens = data.split or held_split or trained_split, data.batch_tokens
    if ctx_len < 2 or batch_tokens < 1:
        raise ValueError(
            f"need --ctx-len >= 2 and --batch-tokens >= 1, got {ctx_len}, {batch_tokens}"
        )
    texts = open_texts(dataset, split, column)
    start, notes = heldout_start(runs, dataset, split, column, allow_overlap, texts)
    if held_split:
        notes.append(
            f"held-out text: the {dataset!r} dataset's {split!r} split, which "
            f"training on its {trained_split!r} split never reads"
        )
    notes += _text_notes(runs, ctx_len)
    model_dtype = data.model_dtype or default_dtype(device)
    if model is None:  # the runs' own (a sparsify baseline may not name it)
        model = next((r.model for r in runs if r.args.get("model")), None) or first.model
    loaded = load_model(model, model_dtype, device, lm_head=downstream)
    check_model(runs, loaded.num_layers, loaded.d_model, loaded.name)
    context_length(loaded, ctx_len)  # refuses one longer than the model's positions
    plan = EvalPlan(
        runs,
        base,
        model,
        loaded,
        dataset,
        split,
        column,
        ctx_len,
        max(1, batch_tokens // ctx_len),
        start,
        allow_overlap,
        tokens,
        device,
        model_dtype,
        downstream,
        pairs,
        mmco_memory,
        notes,
    )
    plan._texts = texts
    plan._stream = plan.open()
    plan.first = next(iter(plan._stream), None)
    if plan.first is None:
        plan.close()
        where = f" after document {start.documents}" if start.documents else ""
        raise ValueError(
            f"the evaluation set is empty: {dataset!r} (split {split!r}) has no "
            f"text{where}; pass another --dataset or --split"
        )
    return plan


def _runs_and_baseline(run_dirs, baseline) -> tuple[list[FinishedRun], FinishedRun | None]:
    """The runs to evaluate, the baseline first (it is evaluated too: the figures' star), each
    once and each under a name of its own."""
    runs = _unique([load_run(path) for path in run_dirs])
    base = load_run(baseline) if baseline is not None else None
    if base is not None:
        runs = [r for r in runs if r.path.resolve() != base.path.resolve()]
        runs.insert(0, base)
    names = [r.name for r in runs]
    return (_renamed(runs) if len(set(names)) != len(names) else runs), base


def _text_notes(runs: list[FinishedRun], ctx_len: int) -> list[str]:
    """What the report says of the runs' training text and context against the evaluation's;
    a sparsify run's unrecorded context is taken as the evaluation's (for the FLOP model)."""
    notes = []
    for run in runs:
        if run.foreign and not run.arg("dataset"):
            notes.append(
                f"{run.name}: sparsify SAEs whose training text is unknown (no "
                "config.json): it may overlap the evaluation text"
            )
        if run.foreign:
            run.args.setdefault("ctx_len", ctx_len)
    contexts = sorted({int(r.arg("ctx_len", ctx_len)) for r in runs})
    if contexts != [ctx_len]:
        notes.append(
            f"the runs were trained with contexts of {contexts} tokens; all are "
            f"evaluated with {ctx_len}"
        )
    return notes


def _unique(runs: list[FinishedRun]) -> list[FinishedRun]:
    seen, out = set(), []
    for run in runs:
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


def _renamed(runs: list[FinishedRun]) -> list[FinishedRun]:
    """Runs in folders of the same name (a/run, b/run): named by parent/name instead."""
    for run in runs:
        run.name = f"{run.path.resolve().parent.name}/{run.path.resolve().name}"
    return runs


def run_plan(plan: EvalPlan, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Load the SAEs of a prepared plan and evaluate them."""
    try:
        runs = [RunSaes(r.name, {s.name: s.load(plan.device) for s in r.saes}) for r in plan.runs]
        result = evaluate(
            plan.loaded,
            runs,
            plan.batches,
            plan.tokens,
            baseline=plan.baseline.name if plan.baseline else None,
            downstream=plan.downstream,
            pairs=plan.pairs,
            mmco_memory=plan.mmco_memory,
            progress=progress,
        )
    finally:
        plan.close()
    result.notes[:0] = plan.notes
    if result.tokens < plan.tokens:
        result.notes.append(
            f"the evaluation text ran out after {result.tokens:,} of {plan.tokens:,} tokens"
        )
    return result


def evaluate_runs(run_dirs: Sequence[str | Path], **kwargs) -> tuple[EvalResult, EvalPlan]:
    """:func:`prepare` then :func:`run_plan`: e.g. ``evaluate_runs(["runs/auto"],
    baseline="runs/per-layer", tokens=100_000)``."""
    plan = prepare(run_dirs, **kwargs)
    return run_plan(plan), plan


def evaluate_run(run_dir: str | Path, **kwargs) -> EvalResult:
    """One run's metrics per layer (see :func:`prepare` for the keywords)."""
    return evaluate_runs([run_dir], **kwargs)[0]


__all__ = [
    "EvalPlan",
    "EvalResult",
    "LayerResult",
    "RunSaes",
    "evaluate",
    "evaluate_run",
    "evaluate_runs",
    "mmco_pairs",
    "prepare",
    "run_plan",
]
