"""Auto-interpretability of a run's SAEs from the browser's collection: sample latents, build
their examples, ask for explanations, score them by detection and fuzzing, aggregate.

As in the Group-SAE paper (Section 4, Appendix D; the authors' code scores every layer of a
group separately): for each SAE, ``latents`` latents are sampled (among those that fired), and
each is explained and scored **at each layer of its group** from windows of that layer:

- explanation: its ``explain`` top-activating windows at the layer;
- detection and fuzzing: ``test`` windows where it fired (a uniform sample of them, without the
  windows the explainer saw) and as many windows of the same layer where it never fired (from
  the collection's random pool), shuffled with a seed, so a resumed run sends the same prompts.
  When fewer of either are available, both sets shrink to the smaller size, so that chance
  stays at 0.5.

Scores are accuracies (both sets have the same size, so chance is 0.5). Per layer: the mean
over the latents scored there; per group, and for the run, the paper's aggregation
(:func:`gsae.eval.metrics.pooled`: mean and std over layers, groups weighted by size).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..browse.collect import Collection
from ..eval.metrics import pooled
from ..hf.tokens import TokenText
from ..io import atomic_path, finite, write_json
from . import prompts
from .client import ChatClient


@dataclass
class AutoInterpConfig:
    """``latents`` per SAE (the paper's 64), ``explain`` windows shown to the explainer,
    ``test`` activating and as many non-activating windows per scoring prompt (the paper's
    10 + 10), ``seed`` for every random choice."""

    latents: int = 64
    explain: int = 10
    test: int = 10
    seed: int = 0

    def validate(self) -> AutoInterpConfig:
        for name in ("latents", "explain", "test"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        return self

    def check_sizes(self, latents_per_sae: dict[str, int]) -> AutoInterpConfig:
        """Refuse ``latents`` beyond an SAE's m (``{name: m}``): it would silently become every
        latent that fired, thousands of paid requests."""
        name, m = min(latents_per_sae.items(), key=lambda item: item[1])
        if self.latents > m:
            raise ValueError(
                f"--latents {self.latents}: SAE {name} has only {m} latents; "
                f"sample at most {m} per SAE (default {AutoInterpConfig.latents})"
            )
        return self


@dataclass
class Window:
    tokens: list[int]  # token ids (padding removed)
    acts: list[float]  # the latent's activation at each token
    where: int  # the window's id in the stream


@dataclass
class Task:
    """One latent at one layer of its SAE: the windows the prompts are built from."""

    sae: str
    layers: list[int]  # the SAE's group
    layer: int
    latent: int
    frequency: float  # fraction of the layer's tokens where it fired
    explain: list[Window]
    active: list[Window]
    inactive: list[Window]
    explanation: str | None = None
    answers: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.sae}/{self.layer}/{self.latent}"


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def sample_latents(col: Collection, name: str, n: int, seed: int) -> list[int]:
    """``n`` latents of SAE ``name`` drawn without replacement among those that fired (all of
    them when fewer fired), sorted."""
    fired = torch.nonzero(col.saes[name]["fired"].sum(0) > 0).squeeze(1).tolist()
    rng = _rng("latents", name, seed)
    return sorted(rng.sample(fired, min(n, len(fired))))


def _windows(t: dict, prefix: str, row: int) -> list[Window]:
    out = []
    for slot in range(t[f"{prefix}.keys"].shape[1]):
        if not torch.isfinite(t[f"{prefix}.keys"][row, slot]):
            break
        tokens = t[f"{prefix}.tokens"][row, slot]
        real = tokens >= 0
        acts = t[f"{prefix}.acts"][row, slot].float()[real]
        out.append(
            Window(tokens[real].tolist(), acts.tolist(), int(t[f"{prefix}.where"][row, slot]))
        )
    return out


def _inactive(t: dict, pos: int, latent: int) -> list[Window]:
    """Pool windows of layer position ``pos`` where ``latent`` fired on no token."""
    idx, val = t["pool.indices"][pos], t["pool.values"][pos]  # [P, W, k]
    fires = ((idx == latent) & (val > 0)).flatten(1).any(1)  # [P]
    out = []
    for p in range(idx.shape[0]):
        tokens = t["pool.tokens"][pos, p]
        real = tokens >= 0
        if fires[p] or not bool(real.any()):
            continue
        n = int(real.sum())
        out.append(Window(tokens[real].tolist(), [0.0] * n, int(t["pool.where"][pos, p])))
    return out


def build_tasks(col: Collection, cfg: AutoInterpConfig) -> tuple[list[Task], list[dict]]:
    """The tasks of every sampled latent at every layer of its SAE, and the (latent, layer)
    pairs skipped, with why (too few windows)."""
    tasks, skipped = [], []
    for name, t in col.saes.items():
        layers = col.layers(name)
        m = col.meta["saes"][name]["m"]
        for latent in sample_latents(col, name, cfg.latents, cfg.seed):
            for pos, layer in enumerate(layers):
                row = pos * m + latent
                top = _windows(t, "top", row)
                explain = top[: cfg.explain]
                seen = {w.where for w in explain}
                active = [w for w in _windows(t, "random", row) if w.where not in seen]
                inactive = _inactive(t, pos, latent)
                # as many of each (chance is then 0.5): as many as both have, up to --test
                n = min(cfg.test, len(active), len(inactive))
                rng = _rng("inactive", name, layer, latent, cfg.seed)
                inactive = rng.sample(inactive, n)
                active = active[:n]
                why = None
                if not explain:
                    why = "never fired at this layer"
                elif not active:
                    why = "no activating window left beyond the explainer's"
                elif not inactive:
                    why = "no window of the pool where it does not fire"
                if why:
                    skipped.append({"sae": name, "layer": layer, "latent": latent, "why": why})
                    continue
                tokens = max(1, int(t["tokens"][pos]))
                freq = float(t["fired"][pos, latent]) / tokens
                tasks.append(Task(name, layers, layer, latent, freq, explain, active, inactive))
    return tasks, skipped


# --------------------------------------------------------------------------------------------
# Prompts, answers, scores
# --------------------------------------------------------------------------------------------


def explanation_request(task: Task, vocab: TokenText) -> list[dict]:
    return prompts.explanation_messages([(vocab(w.tokens), w.acts) for w in task.explain])


def scoring_sets(task: Task, seed: int):
    """The detection and fuzzing excerpts of a task (tokens ids, marked positions) with their
    truth, in a seeded shuffled order."""
    rng = _rng("score", task.sae, task.layer, task.latent, seed)
    counts = [sum(a > 0 for a in w.acts) for w in task.active]
    items = [(w, {j for j, a in enumerate(w.acts) if a > 0}, 1) for w in task.active]
    for w in task.inactive:
        n = min(len(w.tokens), max(1, rng.choice(counts)))
        items.append((w, set(rng.sample(range(len(w.tokens)), n)), 0))
    rng.shuffle(items)
    return items


def score_requests(task: Task, vocab: TokenText, seed: int) -> tuple[list, list, list[int]]:
    items = scoring_sets(task, seed)
    labels = [label for _, _, label in items]
    excerpts = [(vocab(w.tokens), marks) for w, marks, _ in items]
    detection = prompts.detection_messages(task.explanation, [tokens for tokens, _ in excerpts])
    fuzzing = prompts.fuzzing_messages(task.explanation, excerpts)
    return detection, fuzzing, labels


def accuracy(answer: str, labels: list[int]) -> dict:
    """The scorer's list against the truth: accuracy, and the confusion counts."""
    predicted = prompts.parse_labels(answer, len(labels))
    if predicted is None:
        return {"accuracy": None, "n": len(labels), "unparsed": answer[-300:]}
    pairs = list(zip(predicted, labels, strict=True))
    tp = sum(p == 1 and t == 1 for p, t in pairs)
    tn = sum(p == 0 and t == 0 for p, t in pairs)
    return {
        "accuracy": (tp + tn) / len(labels),
        "n": len(labels),
        "tp": tp,
        "tn": tn,
        "fp": sum(p == 1 and t == 0 for p, t in pairs),
        "fn": sum(p == 0 and t == 1 for p, t in pairs),
        "predicted": predicted,
        "labels": labels,
    }


@dataclass
class AutoInterpResult:
    """Per (SAE, layer, latent) records, the skipped pairs, and the aggregation."""

    records: list[dict]
    skipped: list[dict]
    summary: dict


def run_autointerp(
    col: Collection,
    tokenizer,
    explainer: ChatClient,
    scorer: ChatClient,
    cfg: AutoInterpConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> AutoInterpResult:
    """Explain and score the sampled latents of every SAE in ``col``. ``progress(stage,
    done, total)`` is called as answers arrive."""
    cfg = (cfg or AutoInterpConfig()).validate()
    tasks, skipped = build_tasks(col, cfg)
    vocab = TokenText(tokenizer)

    def tick(stage: str, total: int):
        done = [0]

        def step(n: int):
            done[0] += n
            if progress is not None:
                progress(stage, done[0], total)

        return step

    answers = explainer.complete_many(
        [explanation_request(t, vocab) for t in tasks],
        tick("explain", len(tasks)),
        lambda i, a: _explanation(a) is not None,
    )
    for task, answer in zip(tasks, answers, strict=True):
        task.answers["explanation"] = answer
        task.explanation = _explanation(answer)
    scored = [t for t in tasks if t.explanation]
    for t in tasks:
        if not t.explanation:
            skipped.append(
                {
                    "sae": t.sae,
                    "layer": t.layer,
                    "latent": t.latent,
                    "why": "the explainer gave no explanation",
                }
            )
    requests, labels = [], []
    for task in scored:
        detection, fuzzing, truth = score_requests(task, vocab, cfg.seed)
        requests += [detection, fuzzing]
        labels.append(truth)
    answers = scorer.complete_many(
        requests,
        tick("score", len(requests)),
        lambda i, a: prompts.parse_labels(a, len(labels[i // 2])) is not None,
    )
    records = []
    for n, task in enumerate(scored):
        det, fuzz = answers[2 * n], answers[2 * n + 1]
        records.append(
            {
                "sae": task.sae,
                "group_layers": task.layers,
                "layer": task.layer,
                "latent": task.latent,
                "frequency": task.frequency,
                "explanation": task.explanation,
                "detection": accuracy(det, labels[n]),
                "fuzzing": accuracy(fuzz, labels[n]),
                "examples": {
                    "explain": [w.where for w in task.explain],
                    "active": [w.where for w in task.active],
                    "inactive": [w.where for w in task.inactive],
                },
            }
        )
    summary = summarize(records, col)
    summary["unreadable_answers"] = explainer.unreadable + (
        scorer.unreadable if scorer is not explainer else 0
    )
    return AutoInterpResult(records, skipped, summary)


def _explanation(answer: str) -> str | None:
    return prompts.parse_explanation(answer) or _last_line(answer)


def _last_line(answer: str) -> str | None:
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def summarize(records: list[dict], col: Collection) -> dict:
    """Per layer: mean detection and fuzzing accuracy over the latents scored there; per group:
    mean and std over its layers; the run: the paper's aggregation over groups."""
    per_layer: dict[int, dict] = {}
    for metric in ("detection", "fuzzing"):
        for r in records:
            value = r[metric]["accuracy"]
            entry = per_layer.setdefault(r["layer"], {"sae": r["sae"], "latents": 0})
            entry.setdefault(metric, []).append(value)
    for entry in per_layer.values():
        entry["latents"] = len(entry.get("detection", []))
        for metric in ("detection", "fuzzing"):
            values = [v for v in entry.get(metric, []) if v is not None]
            entry[metric] = sum(values) / len(values) if values else None
            entry[f"{metric}_scored"] = len(values)
    groups, run = {}, {}
    for name in col.saes:
        layers = [x for x in col.layers(name) if x in per_layer]
        groups[name] = {"layers": layers}
        for metric in ("detection", "fuzzing"):
            p = pooled([[per_layer[x][metric] for x in layers]])
            groups[name][metric] = {"mean": p.mean, "std": p.std}
    for metric in ("detection", "fuzzing"):
        by_group = [[per_layer[x][metric] for x in g["layers"]] for g in groups.values()]
        p = pooled(by_group)
        run[metric] = {"mean": p.mean, "std": p.std}
    return {
        "run": col.meta["run_name"],
        "run_path": col.meta["run"],
        "model": col.meta["model"],
        "latents_scored": len(records),
        "per_layer": {str(k): v for k, v in sorted(per_layer.items())},
        "per_group": groups,
        "overall": run,
    }


def write_results(result: AutoInterpResult, out: str | Path) -> list[Path]:
    """``out/autointerp.jsonl`` (one record per scored latent and layer: explanation, both
    scores, the scorer's answers read as lists, the windows used), ``out/skipped.jsonl`` and
    ``out/summary.json`` (per layer, per group, the run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"autointerp.jsonl": result.records, "skipped.jsonl": result.skipped}
    for name, rows in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text("".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in rows))
    write_json(out / "summary.json", result.summary)  # NaN (no score) as null
    return [out / name for name in files] + [out / "summary.json"]


def load_collection(run_dir: str | Path, collection: str | Path) -> Collection:
    """A saved collection for the run ``run_dir``: ``collection`` is a gsae-browse output or
    its ``collection`` folder. Refuses one collected for another run."""
    path = Path(collection)
    if not (path / "collection.json").exists() and (path / "collection").is_dir():
        path = path / "collection"
    col = Collection.load(path)
    if Path(col.meta["run"]).resolve() != Path(run_dir).resolve():
        raise ValueError(
            f"{collection} was collected for the run {col.meta['run']}, not "
            f"{Path(run_dir).resolve()}"
        )
    return col


def collection_for(
    run_dir: Path,
    out: Path,
    *,
    collection: str | Path | None,
    settings: dict,
    tokens: int,
    data: dict,
    config,
    progress=None,
) -> tuple[Collection, str]:
    """The collection to score, and how it was had: ``collection`` (a gsae-browse output of
    this run) as given; the one an earlier run of the same ``settings`` left in ``out`` (a
    rerun scores the same examples); or streamed now (``data``: the run-data keyword
    arguments of :func:`~gsae.browse.collect.collect`) and saved in ``out/collection``, after
    the marker that records its ``settings``."""
    from ..browse.collect import collect
    from ..outdir import MARKER, write_marker

    if collection:
        col, how = load_collection(run_dir, collection), f"the collection in {collection}"
    elif (out / "collection" / "collection.json").exists():
        col = load_collection(run_dir, out / "collection")
        how = f"reusing the collection in {out / 'collection'} ({col.meta['tokens']:,} tokens)"
    else:
        col = collect(run_dir, tokens=tokens, **data, config=config, progress=progress)
        write_marker(out, "gsae-autointerp", settings)  # first: what it is collected with
        col.save(out / "collection")
        how = f"collected {tokens:,} tokens into {out / 'collection'}"
    if not (out / MARKER).exists():
        write_marker(out, "gsae-autointerp")
    return col, how
