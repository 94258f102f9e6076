"""Figures for groups.json: the distance heatmap (paper Figs. 5-7) and AMAD against G.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly, never through pyplot:
no global backend is switched and no window opened, so a notebook's own plotting is left as it
was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def subplots(*args, figsize=None, layout=None, **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots``, on a bare Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*args, **kwargs)


def _figure(figsize):
    return subplots(figsize=figsize)


def distance_heatmap(distances, layers, path: str | Path, title: str = "") -> None:
    d = np.asarray(distances)
    side = max(4.5, 1.5 + 0.4 * len(layers))
    fig, ax = _figure((side + 0.8, side))
    image = ax.imshow(d, cmap="viridis", vmin=0.0, vmax=max(0.5, float(d.max())))
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    if len(layers) <= 16:
        for i in range(len(layers)):
            for j in range(len(layers)):
                color = "white" if d[i, j] < 0.6 * d.max() else "black"
                ax.text(j, i, f"{d[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "mean angular distance")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def amad_curve(
    amads: dict[int, float], g_hat: int, threshold: float, path: str | Path, title: str = ""
) -> None:
    gs = sorted(amads)
    fig, ax = _figure((5, 3.2))
    ax.plot(gs, [amads[g] for g in gs], marker="o")
    ax.axhline(threshold, color="grey", linestyle="--", label=f"threshold {threshold}")
    ax.plot([g_hat], [amads[g_hat]], marker="s", markersize=10, color="C3", label=f"Ĝ = {g_hat}")
    ax.set_xticks(gs if len(gs) <= 24 else gs[:: max(1, len(gs) // 12)])
    ax.set_xlabel("G (number of groups)")
    ax.set_ylabel("AMAD(G)")
    ax.set_title(title or "AMAD against G")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
