"""The plots of ``evosearch report`` (matplotlib, an optional extra: ``pip install "evosearch[plot]"``).

Each function draws one figure from data `evosearch.report` has read and saves it as a
PNG: `heatmap` (the allocation, unit types x layers), `convergence` (fitness over
evaluations, one line per sampler) and `pareto_front` (fitness against the traded-off
resource). Figures are made with matplotlib's object API, never pyplot, so drawing
them changes no global state and needs no display.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from evosearch.allocation import RESOURCE_LABELS, number

if TYPE_CHECKING:
    from evosearch.engine import History


def heatmap(alloc: dict, path: Path, title: str = "", target: float | None = None) -> Path:
    """Heat map of the allocation (unit types x layers) under each layer's size-weighted mean."""
    rows, layers = alloc["rows"], alloc["layers"]
    grid = np.array([[np.nan if v is None else v for v in row] for row in alloc["values"]], dtype=float)
    resource = alloc["resource"]
    label = RESOURCE_LABELS.get(resource, resource)
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2.8), 2.4 + 0.36 * len(rows)), layout="constrained")
    top, heat = fig.subplots(2, 1, sharex=True, height_ratios=[1.6, max(1.0, 0.36 * len(rows))])
    means = np.array([np.nan if m is None else m for m in alloc["layer_mean"]], dtype=float)
    top.plot(layers, means, "o-", color="0.3", markersize=3, linewidth=1, label="layer mean (size-weighted)")
    if target is not None:
        top.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"budget {target:g}")
    top.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, fontsize=8, frameon=False, borderaxespad=0)
    top.grid(alpha=0.3)
    top.set_ylabel(resource, fontsize=8)
    top.tick_params(labelsize=8)
    top.set_title(title, fontsize=10, pad=18)
    distinct = sorted({float(v) for v in grid[np.isfinite(grid)]})
    named = 1 < len(distinct) <= 6  # a few levels (keep/drop, dense/2:4, bit-widths): one colour each, named
    if named:
        cmap = ListedColormap([colormaps["viridis"](i / (len(distinct) - 1)) for i in range(len(distinct))])
        edges = [distinct[0] - 0.5] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [distinct[-1] + 0.5]
        norm = BoundaryNorm(edges, cmap.N)
    else:
        cmap, norm = colormaps["viridis"], None
    cmap = cmap.with_extremes(bad="0.9")
    image = heat.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                        extent=(layers[0] - 0.5, layers[-1] + 0.5, len(rows) - 0.5, -0.5))
    heat.set_yticks(range(len(rows)), rows, fontsize=8)
    heat.set_xticks(layers, [str(l) for l in layers], fontsize=7)
    heat.set_xlabel("layer")
    bar = fig.colorbar(image, ax=[top, heat], location="right", shrink=0.9, pad=0.01)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=8)
    if named:
        bar.set_ticks(distinct, labels=_level_names(alloc, distinct))
    fig.savefig(path, dpi=150)
    return path


def _level_names(alloc: dict, distinct: list[float]) -> list[str]:
    """Colour-bar names of a few-valued allocation: the level's own name where it has one (drop, 2:4)."""
    names = {}
    for row_values, row_labels in zip(alloc["values"], alloc["labels"]):
        for v, name in zip(row_values, row_labels):
            if v is not None:
                names.setdefault(float(v), name)
    return [names.get(v, number(v)) for v in distinct]


def convergence(runs: list[tuple[str, History, dict]], path: Path) -> Path:
    """Fitness over evaluations, one colour per run (sampler): each complete candidate and the best so far.

    ``runs`` holds (folder, history, baselines); the first run's baselines are drawn as lines.
    """
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    distinct = len({h.sampler for _, h, _ in runs}) == len(runs)
    values, lines = [], []  # every value drawn; the values of the lines, which the frame must hold
    for i, (folder, history, _) in enumerate(runs):
        colour = colours[i % len(colours)]
        xs = [p.evaluations for p in history.points]
        ys = [p.value for p in history.points]
        best_so_far = list(itertools.accumulate(ys, min))
        ax.scatter(xs, ys, s=12, alpha=0.5, color=colour, linewidths=0)
        ax.step(xs + [history.evaluations], best_so_far + best_so_far[-1:], where="post", color=colour,
                label=f"{history.sampler if distinct else folder}: best {best_so_far[-1]:.4g} "
                      f"after {history.evaluations} evaluations")
        values += ys
        lines.append(best_so_far[0])
    for j, (baseline, record) in enumerate(runs[0][2].items()):
        if record.get("kl") is not None:
            ax.axhline(record["kl"], color="0.3", linestyle=(0, (4, 2 + 2 * j)), linewidth=1,
                       label=f"{baseline} baseline: {record['kl']:.4g}")
            lines.append(record["kl"])
    # The frame holds the lines; candidates far worse than every line (a random start, say) would flatten them.
    low, high = min(values + lines), max(lines)
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.01
    above = sum(v > high + pad for v in values)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("fitness evaluations (all selection stages)")
    ax.set_ylabel(f"KL to dense, nats/token\n({runs[0][1].points[0].fidelity} calibration tokens)")
    ax.set_title("Fitness of complete candidates (dots) and best so far (line)"
                 + (f"; {above} candidates lie above the frame" if above else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=150)
    return path


def pareto_front(history: History, path: Path, chosen: int | None = None) -> Path:
    """Fitness against the traded-off resource: every complete candidate, the Pareto front, the chosen one."""
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter([p.tradeoff for p in history.points], [p.value for p in history.points], s=10, color="0.6",
               label=f"complete candidates ({len(history.points)})")
    front = sorted(history.pareto(), key=lambda p: p.tradeoff)
    ax.plot([p.tradeoff for p in front], [p.value for p in front], "o-", color="tab:red", markersize=4,
            label=f"Pareto front ({len(front)})")
    for p in history.points:
        if p.trial == chosen:
            ax.scatter([p.tradeoff], [p.value], marker="*", s=160, color="tab:blue", zorder=3,
                       label=f"chosen (trial {p.trial}, lowest fitness)")
    ax.set_xlabel(f"{history.tradeoff['label']} ({history.tradeoff['direction']}d)")
    ax.set_ylabel(f"KL to dense, nats/token\n({history.points[0].fidelity} calibration tokens)")
    ax.set_title("Fitness against resource: the Pareto front", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=150)
    return path
