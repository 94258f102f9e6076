"""The paper's evaluation figures as PNGs: quality against AMAD(G) (Figure 2) and against
training FLOPs (Figure 3), MMCO heatmaps with group borders (Figures 9-11), MMCS per group
(Figures 12-14) and feature distributions over a group's layers (Figures 15-17)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from ..plots import subplots
from .approaches import RunSummary
from .evaluate import EvalPlan, EvalResult


def _style(s: RunSummary) -> dict:
    """Star: the per-layer baseline; square: Ĝ; triangle: evenly spaced; diamond: smaller
    SAEs; circle: other G."""
    if s.is_baseline:
        return {"marker": "*", "markersize": 16, "color": "C3", "zorder": 4}
    if s.run.per_layer:
        return {"marker": "D", "markersize": 8, "color": "C2", "zorder": 3}
    if s.run.groups_spec.startswith("even:"):
        return {"marker": "^", "markersize": 9, "color": "C1", "zorder": 3}
    if s.is_g_hat:
        return {"marker": "s", "markersize": 10, "color": "C0", "zorder": 4}
    return {"marker": "o", "markersize": 6, "color": "C0", "zorder": 3}


def quality_against(
    summaries: list[RunSummary], x_key: str, path: Path, xlabel: str, title: str
) -> bool:
    """FVU and ΔCE% (mean ± std over layers) of each run against ``x_key`` (``amad`` or
    ``flops_fraction``); AMAD-grouped runs are joined by a line with a one-std band."""
    points = [s for s in summaries if not math.isnan(getattr(s, x_key))]
    if not points:
        return False
    panels = [("fvu", "FVU")]
    if any(not math.isnan(s.metrics["delta_ce_pct"].mean) for s in points):
        panels.append(("delta_ce_pct", "ΔCE (%)"))
    fig, axes = subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        line = sorted((s for s in points if _on_line(s)), key=lambda s: getattr(s, x_key))
        if len(line) > 1:
            xs = [getattr(s, x_key) for s in line]
            mu = np.array([s.metrics[key].mean for s in line])
            sd = np.array([s.metrics[key].std for s in line])
            ax.plot(xs, mu, color="C0", linewidth=1, zorder=2)
            ax.fill_between(xs, mu - sd, mu + sd, color="C0", alpha=0.15, zorder=1)
        for s in points:
            m = s.metrics[key]
            ax.errorbar(
                [getattr(s, x_key)], [m.mean], yerr=[m.std], capsize=3, linestyle="", **_style(s)
            )
            ax.annotate(
                _short(s),
                (getattr(s, x_key), m.mean),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _on_line(s: RunSummary) -> bool:
    return s.is_baseline or (not s.run.per_layer and not s.run.groups_spec.startswith("even:"))


def _short(s: RunSummary) -> str:
    if s.is_baseline:
        return "per-layer"
    if s.run.per_layer:
        return f"c'={s.expansion:g}"
    prefix = "even " if s.run.groups_spec.startswith("even:") else ""
    return f"{prefix}G={s.num_groups}"


def _grid(n: int, size: float = 3.6):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(size * cols + 0.6, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _group_blocks(ax, summary: RunSummary, layers: list[int]) -> None:
    """Black squares around the layers of each SAE of the run (the paper's group borders)."""
    from matplotlib.patches import Rectangle

    position = {layer: i for i, layer in enumerate(layers)}
    for sae in summary.run.saes:
        cells = sorted(position[x] for x in sae.layers if x in position)
        if cells and cells == list(range(cells[0], cells[-1] + 1)):
            side = len(cells)
            ax.add_patch(
                Rectangle(
                    (cells[0] - 0.5, cells[0] - 0.5),
                    side,
                    side,
                    fill=False,
                    edgecolor="black",
                    linewidth=2,
                )
            )


def _panels(summaries: list[RunSummary], by_run: dict) -> tuple | None:
    """A grid of one axis per run but the baseline with values in ``by_run`` (by run name), in
    :func:`_by_groups`' order:
    ``(fig, axes, [(ax, summary, values)])``, or None when no run has any."""
    shown = [s for s in _by_groups(summaries) if by_run.get(s.run.name)]
    if not shown:
        return None
    fig, axes = _grid(len(shown))
    return fig, axes, [(ax, s, by_run[s.run.name]) for ax, s in zip(axes, shown, strict=True)]


def mmco_heatmaps(result: EvalResult, summaries: list[RunSummary], path: Path) -> bool:
    """One heatmap per run: MMCO of the baseline SAE at layer l1 (rows) with the run's SAE at
    layer l2 (columns); black squares mark the run's groups."""
    panels = _panels(summaries, result.mmco)
    if panels is None:
        return False
    fig, axes, shown = panels
    for ax, s, values in shown:
        layers = sorted({x for pair in values for x in pair})
        grid = np.full((len(layers), len(layers)), np.nan)
        for (l1, l2), v in values.items():
            grid[layers.index(l1), layers.index(l2)] = v.mmco
        image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1)
        if len(layers) <= 12:
            for i in range(len(layers)):
                for j in range(len(layers)):
                    if not np.isnan(grid[i, j]):
                        color = "white" if grid[i, j] > 0.6 else "black"
                        ax.text(
                            j,
                            i,
                            f"{grid[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color=color,
                        )
        _group_blocks(ax, s, layers)
        ticks = range(len(layers)) if len(layers) <= 16 else range(0, len(layers), 2)
        ax.set_xticks(list(ticks), [str(layers[i]) for i in ticks])
        ax.set_yticks(list(ticks), [str(layers[i]) for i in ticks])
        ax.set_xlabel(f"{_short(s)}: SAE layer")
        ax.set_ylabel("baseline SAE layer")
        ax.set_title(s.run.name, fontsize=9)
    fig.colorbar(image, ax=axes, fraction=0.03)
    fig.suptitle("MMCO: baseline vs group SAEs")
    fig.savefig(path, dpi=110)
    return True


def mmcs_lines(result: EvalResult, summaries: list[RunSummary], path: Path) -> bool:
    """Per run, MMCS of each baseline layer's SAE with each of the run's SAEs (one colour per
    SAE; filled markers on the layers the SAE was trained on)."""
    panels = _panels(summaries, result.mmcs)
    if panels is None:
        return False
    fig, _, shown = panels
    for ax, s, values in shown:
        for number, sae in enumerate(s.run.saes):
            pairs = sorted((l1, v) for (l1, g), v in values.items() if g == sae.name)
            xs = [x for x, _ in pairs]
            ys = [v for _, v in pairs]
            color = f"C{number % 10}"
            ax.plot(xs, ys, color=color, linewidth=1, label=sae.name)
            init = result.mmcs_init.get(s.run.name, {})
            ax.plot(
                xs,
                [init.get((x, sae.name), np.nan) for x in xs],
                color=color,
                linewidth=1,
                linestyle=":",
            )
            inside = [(x, y) for x, y in pairs if x in sae.layers]
            ax.plot([x for x, _ in inside], [y for _, y in inside], "o", color=color)
        ax.set_xlabel("baseline SAE layer")
        ax.set_ylabel("MMCS(baseline, group)")
        ax.set_title(f"{s.run.name} ({_short(s)})", fontsize=9)
        ax.grid(alpha=0.3)
        if len(s.run.saes) <= 8:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def feature_heatmaps(result: EvalResult, summary: RunSummary, path: Path) -> bool:
    """For each multi-layer SAE of a run, the share of each latent's firings at each layer of
    its group, latents sorted by their mean layer (only latents that fired)."""
    named = [
        (g, d) for g, d in result.features.get(summary.run.name, {}).items() if len(d.layers) > 1
    ]
    if not named:
        return False
    height = 0.9 + sum(0.45 * len(d.layers) + 0.6 for _, d in named)
    fig, axes = subplots(len(named), 1, figsize=(8, height), squeeze=False, layout="constrained")
    image = None
    for ax, (group, dist) in zip(axes[:, 0], named, strict=True):
        share = dist.share[:, dist.order].numpy()
        if share.shape[1] == 0:
            ax.set_title(f"{group}: no latent fired on the evaluation tokens", fontsize=9)
            ax.axis("off")
            continue
        image = ax.imshow(
            share, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_yticks(range(len(dist.layers)), [str(x) for x in dist.layers])
        ax.set_ylabel("layer")
        ax.set_title(
            f"{group}: {len(dist.order)} latents that fired, sorted by mean layer", fontsize=9
        )
    axes[-1, 0].set_xlabel("latent (sorted)")
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, label="share of firings")
    fig.suptitle(f"Feature distribution: {summary.run.name}")
    fig.savefig(path, dpi=110)
    return True


def _by_groups(summaries: list[RunSummary]) -> list[RunSummary]:
    """Non-baseline runs, fewest groups first (as the paper's panels, G = 1 .. Ĝ)."""
    return sorted(
        (s for s in summaries if not s.is_baseline),
        key=lambda s: (s.run.per_layer, s.num_groups, s.run.name),
    )


def write_all(
    result: EvalResult, plan: EvalPlan, summaries: list[RunSummary], out: Path
) -> list[tuple[Path, str]]:
    """Every figure that the runs allow, with the line the report prints under it."""
    name = plan.model_name
    # (file, draw(path) -> whether it drew anything, the line under it)
    figures = [
        (
            "fig2_amad.png",
            lambda path: quality_against(
                summaries, "amad", path, "AMAD(G)", f"{name}: quality against AMAD(G)"
            ),
            "Figure 2: FVU and ΔCE% (mean ± std over layers) against AMAD(G) "
            "of each run's partition; star: per-layer baseline, square: Ĝ, triangle: "
            "evenly spaced groups, diamond: smaller per-layer SAEs. Lower is "
            "better; the paper finds a turning point near AMAD = 0.2.",
        ),
        (
            "fig3_flops.png",
            lambda path: quality_against(
                summaries,
                "flops_fraction",
                path,
                "training FLOPs / per-layer SAEs",
                f"{name}: quality against training compute",
            ),
            "Figure 3: the same metrics against the training FLOPs of each "
            "approach relative to one SAE per layer (dense SAE step, as the paper).",
        ),
        (
            "mmco.png",
            lambda path: mmco_heatmaps(result, summaries, path),
            "Figures 9-11: MMCO (Eq. 17) between the baseline SAE of each "
            "layer (rows) and each run's SAE at each layer (columns), over the "
            "evaluation tokens; black squares: the run's groups. High values inside "
            "the squares: the group SAE fires like the per-layer ones.",
        ),
        (
            "mmcs.png",
            lambda path: mmcs_lines(result, summaries, path),
            "Figures 12-14: MMCS (Eq. 18) of each baseline layer's decoder "
            "with each group SAE's decoder; filled markers on the group's own "
            "layers, where the paper finds the similarity peaks. Dotted: the same "
            "pair of decoders as initialised: SAEs trained with one seed start from "
            "one random decoder, and what they keep of it is not learned.",
        ),
    ]
    for s in _by_groups(summaries):
        figures.append(
            (
                f"features_{s.run.name.replace('/', '_')}.png",
                functools.partial(feature_heatmaps, result, s),
                f"Figures 15-17 ({s.run.name}): how each latent's firings "
                "spread over the layers of its group (share per layer, darker = "
                "more), latents sorted by their mean layer.",
            )
        )
    return [(out / file, caption) for file, draw, caption in figures if draw(out / file)]
