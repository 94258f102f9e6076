"""What gsae-eval writes: metrics per layer, the paper's tables, figures and one HTML page.

- ``metrics.jsonl`` / ``metrics.csv``: one record per run x layer, with the run, its group, the
  token counts and the config that reproduces the numbers;
- ``summary.json``: per run and per group, the paper's aggregation (:func:`~.metrics.pooled`);
- ``table1.md`` / ``table1.csv``: FVU and ΔCE% per approach (the paper's Table 1, with every run);
- ``table2.md``: A+LT, A+ĜT and Δ(Ĝ) from the FLOP model gsae-groups prints
  (:func:`gsae.grouping.model_costs`, :func:`gsae.grouping.compute_savings`);
- PNGs (:mod:`gsae.eval.figures`) and ``report.html``, self-contained (images embedded).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

from .. import grouping as gp
from ..io import atomic_dir, atomic_path, finite, write_json
from ..outdir import write_marker
from ..run import FinishedRun
from .approaches import POOLED, RunSummary, g_hat_of, summarize, table_layers
from .evaluate import EvalPlan, EvalResult
from .metrics import Pooled, pooled

CSV_COLUMNS = [
    "run",
    "approach",
    "group",
    "group_layers",
    "layer",
    "tokens",
    "fvu",
    "explained_variance",
    "cosine",
    "l0",
    "never_fired",
    "positions",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "delta_ce_pct",
    "ce_recovered",
    "kl",
    "kl_zero",
    "kl_score",
    "mmcs",
    "mmcs_init",
    "mmco",
    "mmco_fired",
    "d",
    "m",
    "k",
    "tokens_trained",
    "model",
    "dataset",
    "split",
    "start_document",
]


# --------------------------------------------------------------------------------------------
# Records and tables
# --------------------------------------------------------------------------------------------


def records(result: EvalResult, plan: EvalPlan, summaries: list[RunSummary]) -> list[dict]:
    """One record per run x layer: every metric, and what reproduces it."""
    by_name = {s.run.name: s for s in summaries}
    config = plan.config()
    out = []
    for row in result.layers:
        s = by_name[row.run]
        run = s.run
        sae = run.sae_for(row.layer)
        record = row.flat()
        record.update(
            {
                "approach": s.approach,
                "run_path": str(run.path),
                "group_layers": sae.layers,
                "d": sae.d,
                "m": sae.m,
                "k": sae.k,
                "tokens_trained": run.tokens_trained,
                "training": {k: run.args.get(k) for k in TRAINING_KEYS},
                "eval": config,
            }
        )
        out.append(record)
    return out


TRAINING_KEYS = (
    "model",
    "dataset",
    "split",
    "column",
    "ctx_len",
    "batch_tokens",
    "groups",
    "groups_file",
    "include_last",
    "layers_per_token",
    "expansion_factor",
    "k",
    "k_aux",
    "auxk_alpha",
    "dead_threshold",
    "lr",
    "scale_mode",
    "seed",
    "tokens",
    "model_dtype",
)


def _csv_row(record: dict) -> dict:
    row = {}
    for key in CSV_COLUMNS:
        value = record.get(key, record.get("eval", {}).get(key))
        if key == "group_layers":
            value = " ".join(map(str, value))
        elif key == "model":
            value = record["eval"]["model"]
        row[key] = _fmt(value)
    return row


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_metrics(rows: list[dict], out: Path) -> list[Path]:
    """metrics.jsonl and metrics.csv; returns their paths."""
    jsonl = _write_text(out / "metrics.jsonl", _jsonl(rows))
    return [jsonl, _write_csv(out / "metrics.csv", CSV_COLUMNS, [_csv_row(r) for r in rows])]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(finite(r)) + "\n" for r in rows)  # NaN and inf as null


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return _write_text(path, buffer.getvalue())


def pm(stat: Pooled | dict, scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` of a :class:`~.metrics.Pooled` or of a summary's ``{"mean", "std"}``
    (gsae-autointerp's: None where nothing was scored); "–" without a mean."""
    pair = (stat["mean"], stat["std"]) if isinstance(stat, dict) else (stat.mean, stat.std)
    mean, std = (_nan(x) for x in pair)
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def table1(summaries: list[RunSummary], layers: list[int]) -> tuple[str, list[dict]]:
    """Markdown and CSV rows: FVU and ΔCE% per approach over ``layers`` (mean ± std over the
    layers, the paper's group-weighted aggregation), with the compute each one took."""
    order = sorted(
        summaries, key=lambda s: (not s.is_baseline, not s.is_g_hat, -s.num_groups, s.approach)
    )
    head = (
        "| Approach | run | G | c | FLOPs vs per-layer | FVU | ΔCE% | CE recovered "
        "| KL score |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines, rows = [head], []
    for s in order:
        m = s.metrics
        lines.append(
            f"| {s.approach} | {s.run.name} | {s.num_groups} | {s.expansion:g} "
            f"| {s.flops_fraction:.3f} | {pm(m['fvu'])} | {pm(m['delta_ce_pct'], digits=2)} "
            f"| {pm(m['ce_recovered'])} | {pm(m['kl_score'])} |"
        )
        rows.append(
            {
                "approach": s.approach,
                "run": s.run.name,
                "groups": s.num_groups,
                "expansion_factor": _fmt(s.expansion),
                "flops_fraction": _fmt(s.flops_fraction),
                "amad": _fmt(s.amad),
                **{
                    f"{k}_{w}": _fmt(getattr(m[k], w))
                    for k in ("fvu", "delta_ce_pct", "ce_recovered", "kl_score")
                    for w in ("mean", "std")
                },
            }
        )
    caption = (
        f"\nMean ± std over layers {layers} (each group's mean and std over its layers, "
        "weighted by its number of layers: the paper's aggregation). FLOPs: training "
        "compute per token relative to the per-layer SAEs (dense SAE step, as the paper)."
    )
    return "\n".join(lines) + "\n" + caption + "\n", rows


def table2(plan: EvalPlan, summaries: list[RunSummary]) -> str:
    """A+LT, A+ĜT and Δ(Ĝ) per model, with :func:`gsae.grouping.model_costs` and
    :func:`gsae.grouping.compute_savings` exactly as gsae-groups computes them."""
    runs = plan.runs
    g_hat = g_hat_of(runs)
    reference = plan.baseline or runs[0]
    grouped = reference.grouped_layers if not reference.per_layer else table_layers(runs)
    ctx = int(reference.arg("ctx_len"))
    c = int(
        round(
            max(s.expansion for s in summaries if s.run.per_layer)
            if any(s.run.per_layer for s in summaries)
            else reference.expansion_factor
        )
    )
    k = reference.k
    shown = sorted(
        {s.num_groups for s in summaries if not s.run.per_layer}
        | ({g_hat} if g_hat is not None else set())
    )
    name = plan.model_name
    lines = ["| Model | G | SAE step | A+LT | A+GT | Δ%(G) |", "|---|---|---|---:|---:|---:|"]
    for g in shown:
        for kernels in ("dense", "sparse"):
            a_cost, t_cost, extra = gp.model_costs(plan.loaded, grouped, ctx, c, k, kernels)
            n = len(grouped)
            full = a_cost + (n + extra) * t_cost
            part = a_cost + (g + extra) * t_cost
            delta = gp.compute_savings(g, n, a_cost, t_cost, extra)
            label = f"{g} (Ĝ)" if g == g_hat else str(g)
            step = "dense (paper)" if kernels == "dense" else "gsae sparse kernels"
            lines.append(
                f"| {name} | {label} | {step} | {full / 1e6:.3f} | {part / 1e6:.3f} "
                f"| {100 * delta:.1f}% |"
            )
    note = (
        f"\nFLOPs in units of 10^15 per 10^9 training tokens (= MFLOP per token; the paper's "
        f"Table 2 uses 10^18), L = {len(grouped)} grouped layers plus the last layer's own "
        f"SAE counted on both sides, c = {c}, k = {k}, context {ctx}. Δ(G) = (A+GT)/(A+LT) - 1"
        " (Eq. 5), as gsae-groups prints it."
    )
    if g_hat is None:
        note += " No run measured the layer distances, so Ĝ is unknown."
    return "\n".join(lines) + "\n" + note + "\n"


def group_summary(result: EvalResult) -> dict:
    """Per run, per group: mean and std of each metric over the group's layers."""
    out: dict = {}
    for row in result.layers:
        out.setdefault(row.run, {}).setdefault(row.group, []).append(row.flat())
    return {
        run: {
            group: {
                "layers": [r["layer"] for r in rs],
                **{k: pooled([[r.get(k) for r in rs]])._asdict() for k in POOLED},
            }
            for group, rs in groups.items()
        }
        for run, groups in out.items()
    }


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------


def write_report(result: EvalResult, plan: EvalPlan, out: str | Path) -> list[Path]:
    """Write every output of gsae-eval into ``out``, replaced as a whole (an interruption leaves
    the earlier outputs; nothing of an earlier evaluation survives beside the new one but the
    auto-interp scores of the runs evaluated again). Returns the files written."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        kept = [e for e in read_autointerp(out) if _same_run(e.get("run_path"), plan.runs)]
        if kept:
            _write_autointerp(tmp, kept)
        written = _write_files(result, plan, tmp)
        write_marker(tmp, "gsae-eval")
    return [out / path.name for path in written]


def _same_run(path: str | None, runs: list[FinishedRun]) -> bool:
    return path is not None and Path(path).resolve() in {r.path.resolve() for r in runs}


def _write_files(result: EvalResult, plan: EvalPlan, out: Path) -> list[Path]:
    from . import figures

    summaries = summarize(result, plan)
    layers = table_layers(plan.runs)
    rows = records(result, plan, summaries)
    written = write_metrics(rows, out)  # and each file below, as it is written
    t1_md, t1_rows = table1(summaries, layers)
    t2_md = table2(plan, summaries)
    written += [_write_text(out / "table1.md", t1_md), _write_text(out / "table2.md", t2_md)]
    written.append(_write_csv(out / "table1.csv", list(t1_rows[0]), t1_rows))
    written.append(out / "summary.json")
    write_json(
        written[-1],
        {
            "eval": plan.config(),
            "tokens": result.tokens,
            "positions": result.positions,
            "seconds": round(result.seconds, 2),
            "passes": result.passes,
            "notes": result.notes,
            "runs": {
                s.run.name: {
                    "path": str(s.run.path.resolve()),
                    "approach": s.approach,
                    "groups": s.num_groups,
                    "amad": s.amad,
                    "flops_fraction": s.flops_fraction,
                    **{k: v._asdict() for k, v in s.metrics.items()},
                }
                for s in summaries
            },
            "per_group": group_summary(result),
            "mmco": {
                run: {f"{a},{b}": v._asdict() for (a, b), v in d.items()}
                for run, d in result.mmco.items()
            },
            "mmcs": {
                run: {f"{a},{g}": v for (a, g), v in d.items()} for run, d in result.mmcs.items()
            },
            "mmcs_init": {
                run: {f"{a},{g}": v for (a, g), v in d.items()}
                for run, d in result.mmcs_init.items()
            },
        },
    )
    feature_files = write_features(result, out)
    images = figures.write_all(result, plan, summaries, out)
    page = html_report(result, plan, t1_md, t2_md, images)
    page = _with_autointerp(page, out)  # auto-interp results added earlier stay in the report
    written.append(_write_text(out / "report.html", page))
    return written + feature_files + [path for path, _ in images]


def write_features(result: EvalResult, out: Path) -> list[Path]:
    """``features_<run>.csv`` for each run with a multi-layer SAE: per latent, how many
    evaluation tokens of each layer of its group it fired on, its total and its mean layer
    (Appendix F; the figures draw the shares)."""
    written = []
    for run, groups in result.features.items():
        multi = {g: d for g, d in groups.items() if len(d.layers) > 1}
        if not multi:
            continue
        layers = sorted({x for d in multi.values() for x in d.layers})
        columns = ["group", "latent", "fired", "mean_layer"] + [f"layer_{x}" for x in layers]
        rows = []
        for group, dist in multi.items():
            counts = dist.counts.tolist()  # [L_g][m]
            totals = dist.counts.sum(0).tolist()
            means = dist.mean_layer.tolist()
            for latent in range(dist.counts.shape[1]):
                row = {
                    "group": group,
                    "latent": latent,
                    "fired": totals[latent],
                    "mean_layer": _fmt(means[latent]),
                }
                for i, x in enumerate(dist.layers):
                    row[f"layer_{x}"] = counts[i][latent]
                rows.append(row)
        path = out / f"features_{run.replace('/', '_')}.csv"
        _write_csv(path, columns, rows)
        written.append(path)
    return written


def _md_table_html(markdown: str) -> str:
    """The tables written here as HTML (pipes only, first row header, second the rule)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    body = []
    for number, line in enumerate(lines):
        if number == 1:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        tag = "th" if number == 0 else "td"
        body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    rest = "\n".join(line for line in markdown.splitlines() if line and not line.startswith("|"))
    return f"<table>{''.join(body)}</table>\n<p class='note'>{html.escape(rest)}</p>"


def html_report(
    result: EvalResult, plan: EvalPlan, t1: str, t2: str, images: list[tuple[Path, str]]
) -> str:
    """One self-contained page: tables, figures (embedded PNGs) and a line under each."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>gsae-eval: {html.escape(plan.model_name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:90%}</style>"
        "</head><body>",
        f"<h1>Group-SAE evaluation: {html.escape(plan.model_name)}</h1>",
        f"<p>{result.tokens:,} held-out tokens of {html.escape(plan.dataset)!s} (split "
        f"{html.escape(plan.split)}, from document {plan.start.documents + 1}), context "
        f"{plan.ctx_len}; {result.positions:,} next-token predictions scored; "
        f"{len(plan.runs)} runs; {result.seconds:.0f} s.</p>",
    ]
    if result.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")
    parts += [
        "<h2>Table 1: reconstruction and downstream quality per approach</h2>",
        _md_table_html(t1),
        "<h2>Table 2: training compute</h2>",
        _md_table_html(t2),
    ]
    for path, caption in images:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f"<figure><img alt='{html.escape(path.name)}' "
            f"src='data:image/png;base64,{data}'><figcaption class='note'>"
            f"{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Per layer</h2>" + _layer_table(result))
    parts.append(AUTOINTERP_BEGIN + AUTOINTERP_END)
    parts.append("</body></html>")
    return "\n".join(parts)


def _layer_table(result: EvalResult) -> str:
    keys = [
        "run",
        "group",
        "layer",
        "fvu",
        "cosine",
        "l0",
        "never_fired",
        "delta_ce_pct",
        "ce_recovered",
        "kl_score",
        "mmcs",
        "mmcs_init",
        "mmco",
    ]
    head = "<tr>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    rows = []
    for r in result.layers:
        flat = r.flat()
        cells = "".join(f"<td>{html.escape(_fmt(flat.get(k)))}</td>" for k in keys)
        rows.append(f"<tr>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


# --------------------------------------------------------------------------------------------
# Auto-interpretability (gsae-autointerp adds its results to a gsae-eval folder)
# --------------------------------------------------------------------------------------------

AUTOINTERP_FILE = "autointerp.jsonl"
AUTOINTERP_FIGURE = "fig4_autointerp.png"
AUTOINTERP_BEGIN, AUTOINTERP_END = "<!-- gsae-autointerp -->", "<!-- /gsae-autointerp -->"


def read_autointerp(out: Path) -> list[dict]:
    """The auto-interp summaries kept in a gsae-eval folder, one per run."""
    path = Path(out) / AUTOINTERP_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_autointerp(out: str | Path, summary: dict) -> list[Path]:
    """Add a run's auto-interp summary (:func:`gsae.autointerp.score.summarize`) to the
    gsae-eval folder ``out``: ``autointerp.jsonl`` (one line per run, this run's replaced), the
    detection and fuzzing scores against AMAD(G) (the paper's Figure 4,
    ``fig4_autointerp.png``, when gsae-eval measured the runs' AMAD) and the auto-interp
    section of ``report.html``. Returns the files written."""
    out = Path(out)
    if not (out / "report.html").exists():
        raise FileNotFoundError(
            f"{out} holds no gsae-eval report (no report.html): run gsae-eval --out {out} first"
        )
    check_report_run(out, summary.get("run_path"))
    kept = [s for s in read_autointerp(out) if s.get("run_path") != summary.get("run_path")]
    _write_autointerp(out, kept + [summary])
    _write_text(out / "report.html", _with_autointerp((out / "report.html").read_text(), out))
    written = [out / AUTOINTERP_FILE, out / "report.html"]
    return written + ([out / AUTOINTERP_FIGURE] if (out / AUTOINTERP_FIGURE).exists() else [])


def check_report_run(out: str | Path, run_path: str | None) -> None:
    """Refuse to add the scores of a run that the gsae-eval report in ``out`` did not evaluate:
    they would be shown as that report's."""
    out = Path(out)
    try:
        runs = json.loads((out / "summary.json").read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--report {out}: no gsae-eval summary.json there") from None
    paths = {Path(r.get("path", "")).resolve() for r in runs.values() if isinstance(r, dict)}
    if run_path is None or Path(run_path).resolve() not in paths:
        raise ValueError(
            f"--report {out} evaluated {', '.join(runs) or 'no run'}, not the run "
            f"{run_path}: evaluate it there first (gsae-eval ... --out {out})"
        )


def _write_autointerp(out: Path, entries: list[dict]) -> None:
    _write_text(out / AUTOINTERP_FILE, _jsonl(entries))


def _with_autointerp(page: str, out: Path) -> str:
    """``page`` with its auto-interp section rendered from ``out/autointerp.jsonl``."""
    entries = read_autointerp(out)
    if not entries or AUTOINTERP_BEGIN not in page:
        return page
    section = _autointerp_html(entries, out)
    head, rest = page.split(AUTOINTERP_BEGIN, 1)
    tail = rest.split(AUTOINTERP_END, 1)[1] if AUTOINTERP_END in rest else rest
    return head + AUTOINTERP_BEGIN + section + AUTOINTERP_END + tail


def _autointerp_html(entries: list[dict], out: Path) -> str:
    runs = {}
    if (out / "summary.json").exists():
        runs = json.loads((out / "summary.json").read_text()).get("runs", {})
    rows = []
    for e in entries:
        info = runs.get(e["run"], {})
        det, fuz = e["overall"]["detection"], e["overall"]["fuzzing"]
        rows.append(
            f"<tr><td>{html.escape(str(info.get('approach', '')))}</td>"
            f"<td>{html.escape(e['run'])}</td><td>{e['latents_scored']}</td>"
            f"<td>{pm(det)}</td><td>{pm(fuz)}</td>"
            "</tr>"
        )
    layer_rows = []
    for e in entries:
        for layer, v in e["per_layer"].items():
            layer_rows.append(
                f"<tr><td>{html.escape(e['run'])}</td><td>{html.escape(v['sae'])}"
                f"</td><td>{layer}</td><td>{v['latents']}</td>"
                f"<td>{_fmt(v['detection'])}</td><td>{_fmt(v['fuzzing'])}</td>"
                "</tr>"
            )
    figure = ""
    if _autointerp_figure(entries, runs, out / AUTOINTERP_FIGURE):
        data = base64.b64encode((out / AUTOINTERP_FIGURE).read_bytes()).decode()
        figure = (
            f"<figure><img alt='{AUTOINTERP_FIGURE}' src='data:image/png;base64,{data}'>"
            "<figcaption class='note'>Detection and fuzzing accuracy against AMAD(G), as "
            "the paper's Figure 4 (star: per-layer baseline, square: Ĝ; mean ± std over "
            "layers).</figcaption></figure>"
        )
    return (
        "<h2>Auto-interpretability</h2><p class='note'>Latents sampled per SAE, each explained "
        "by an explainer LLM from its top-activating windows at each layer of its group, then "
        "scored by a scorer LLM: detection (which windows activate it) and fuzzing (are the "
        "marked tokens the active ones), accuracy against the truth, chance 0.5; mean ± std "
        "over layers with the paper's group weighting (gsae-autointerp).</p>"
        "<table><tr><th>Approach</th><th>run</th><th>latents scored</th><th>detection</th>"
        f"<th>fuzzing</th></tr>{''.join(rows)}</table>{figure}"
        "<table><tr><th>run</th><th>SAE</th><th>layer</th><th>latents</th><th>detection</th>"
        f"<th>fuzzing</th></tr>{''.join(layer_rows)}</table>"
    )


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _autointerp_figure(entries: list[dict], runs: dict, path: Path) -> bool:
    """Figure 4: detection and fuzzing against AMAD(G), one point per run whose AMAD is known."""
    from ..plots import subplots

    points = [
        (runs[e["run"]], e)
        for e in entries
        if e["run"] in runs and runs[e["run"]].get("amad") is not None
    ]
    if not points:
        return False
    fig, axes = subplots(1, 2, figsize=(10.4, 3.8))
    for ax, metric in zip(axes, ("detection", "fuzzing"), strict=True):
        for info, e in points:
            approach = str(info.get("approach", ""))
            style = (
                {"marker": "*", "markersize": 16, "color": "C3"}
                if approach.startswith("Per-layer")
                else {"marker": "s", "markersize": 10, "color": "C0"}
                if "Ĝ" in approach
                else {"marker": "o", "markersize": 6, "color": "C0"}
            )
            m = e["overall"][metric]
            ax.errorbar(
                [info["amad"]],
                [_nan(m["mean"])],
                yerr=[_nan(m["std"])],
                capsize=3,
                linestyle="",
                **style,
            )
            ax.annotate(
                e["run"],
                (info["amad"], _nan(m["mean"])),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
        ax.set_xlabel("AMAD(G)")
        ax.set_ylabel(f"{metric} accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
