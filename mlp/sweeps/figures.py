"""The figures that compare the runs of a sweep, from the rows of its report (`report.py`
reads the runs from MLflow): validation accuracy over learning rate x regularization,
the learning curves of the best runs, the overfitting gap against the hidden sizes, the
accuracy per activation. Each takes the rows (one dict per run: the swept params as
logged, "val_acc", "test_acc", "gap_acc", "status", "run", "run_id") and the swept keys,
and returns a `matplotlib.figure.Figure` (no pyplot), or None when its param does not vary.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlp.tracking import glance, keys
from mlp.tracking import plots as run_plots
from mlp.tracking.names import short_number

FIGURE_DPI = 110


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def finished(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "FINISHED" and r["val_acc"] is not None]


def heatmap_figure(rows: Sequence[dict], swept: Sequence[str]) -> Figure | None:
    """val_acc over optim.lr (x) x model.reg (y), the best run of each cell (over the
    other swept params); cells whose runs all failed say so. None unless both vary."""
    if not {"optim.lr", "model.reg"} <= set(swept):
        return None
    cells = [(_number(r["optim.lr"]), _number(r["model.reg"]), r) for r in rows]
    cells = [(lr, reg, r) for lr, reg, r in cells if lr is not None and reg is not None]
    lrs = sorted({lr for lr, _, _ in cells})
    regs = sorted({reg for _, reg, _ in cells})
    if len(lrs) < 2 or len(regs) < 2:
        return None
    grid = np.full((len(regs), len(lrs)), np.nan)
    status: dict[tuple[int, int], str] = {}
    for lr, reg, r in cells:
        i, j = regs.index(reg), lrs.index(lr)
        if r["status"] == "FINISHED" and r["val_acc"] is not None:
            grid[i, j] = np.fmax(grid[i, j], r["val_acc"])
        else:
            status.setdefault((i, j), r["status"])
    fig = Figure(figsize=(1.3 * len(lrs) + 3, 0.8 * len(regs) + 2.2), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto")
    lo, hi = (np.nanmin(grid), np.nanmax(grid)) if np.isfinite(grid).any() else (0, 1)
    for i, j in np.ndindex(grid.shape):
        if np.isfinite(grid[i, j]):
            light = hi > lo and (grid[i, j] - lo) / (hi - lo) > 0.6
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=9,
                    color="black" if light else "white")
        else:
            ax.text(j, i, status.get((i, j), "not run"), ha="center", va="center",
                    fontsize=8, color="#a33")
    ax.set_xticks(range(len(lrs)), [short_number(x) for x in lrs])
    ax.set_yticks(range(len(regs)), [short_number(x) for x in regs])
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("L2 regularization (model.reg)")
    others = [k for k in swept if k not in ("optim.lr", "model.reg")]
    ax.set_title("Validation accuracy" + (f" (best over {', '.join(others)})" if others else ""))
    fig.colorbar(image, ax=ax, label="val_acc")
    return fig


def _label(row: dict, swept: Sequence[str]) -> str:
    values = [f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in swept if row[k] is not None]
    return ", ".join(values) or row["run"]


def curves_figure(rows: Sequence[dict], swept: Sequence[str],
                  histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
                  top: int = 5) -> Figure | None:
    """Validation (solid) and train (dashed) accuracy per epoch of the `top` best runs;
    histories: {run id: {metric key: [(step, value), ...]}}."""
    best = finished(rows)[:top]
    if not best:
        return None
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for i, row in enumerate(best):
        color = f"C{i % 10}"
        for key, style in ((keys.ACC_VAL, "-"), (keys.ACC_TRAIN, "--")):
            history = sorted(histories.get(row["run_id"], {}).get(key, []))
            if history:
                label = f"{_label(row, swept)} ({row['val_acc']:.3f})"
                ax.plot([step for step, _ in history], [value for _, value in history], style,
                        color=color, marker="o", ms=3, label=label if key == keys.ACC_VAL else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Learning curves of the {len(best)} best runs (solid: val, dashed: train)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=2, title="best val_acc")
    return fig


def glance_figure(rows: Sequence[dict],
                  histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]
                  ) -> Figure | None:
    """The sweep at a glance (`glance.IMAGE_INCHES`, 96 pixels tall, beside the best
    children on the parent's first screen): the validation accuracy per epoch of the runs
    in `histories` (as in `curves_figure`), the best in colour, the others grey."""
    best = [r for r in finished(rows) if histories.get(r["run_id"], {}).get(keys.ACC_VAL)]
    if not best:
        return None
    fig = Figure(figsize=glance.IMAGE_INCHES, layout="constrained")
    ax = fig.subplots()
    for i, row in reversed(list(enumerate(best))):  # the best drawn last, on top
        history = sorted(histories[row["run_id"]][keys.ACC_VAL])
        ax.plot([step for step, _ in history], [value for _, value in history], "-",
                lw=1.6 if i == 0 else 0.8, color="tab:orange" if i == 0 else "0.6")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"val accuracy, {len(best)} best runs", fontsize=7, pad=2)
    glance.small_axes(ax)
    return fig


def _hidden(value: str) -> list[int] | None:
    try:
        sizes = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    return [int(h) for h in sizes] if isinstance(sizes, list | tuple) else None


def gap_figure(rows: Sequence[dict], swept: Sequence[str]) -> Figure | None:
    """Final gap_acc (train_acc - val_acc) of each run against its hidden layers, ordered
    by total hidden units, colored by activation when that varies too; the mean per
    architecture as a bar. None unless model.hidden_sizes varies."""
    if "model.hidden_sizes" not in swept:
        return None
    by_activation = "model.activation" in swept
    groups: dict[tuple[int, ...], list[tuple[float, str]]] = {}
    for row in finished(rows):
        sizes = _hidden(row["model.hidden_sizes"])
        if sizes is not None and row["gap_acc"] is not None:
            kind = row["model.activation"] if by_activation else "runs"
            groups.setdefault(tuple(sizes), []).append((row["gap_acc"], kind))
    if not groups:
        return None
    order = sorted(groups, key=lambda s: (sum(s), len(s), s))
    kinds = sorted({kind for points in groups.values() for _, kind in points})
    fig = Figure(figsize=(max(6.0, 1.1 * len(order) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(order)), [np.mean([g for g, _ in groups[s]]) for s in order],
           color="gray", alpha=0.25, label="mean")
    for x, sizes in enumerate(order):
        points = groups[sizes]
        offsets = np.linspace(-0.2, 0.2, len(points)) if len(points) > 1 else [0.0]
        for dx, (gap, kind) in zip(offsets, points, strict=True):
            ax.plot(x + dx, gap, "o", ms=5, color=f"C{kinds.index(kind) % 10}")
    for i, kind in enumerate(kinds):
        ax.plot([], [], "o", color=f"C{i % 10}", label=kind)
    ax.set_xticks(range(len(order)),
                  [f"{'x'.join(map(str, s)) or 'linear'}\n({sum(s)} units)" for s in order])
    ax.axhline(0, color="gray", lw=1)
    ax.set_xlabel("hidden layers (ordered by total hidden units)")
    ax.set_ylabel("final gap_acc (train_acc - val_acc)")
    ax.set_title("Overfitting gap vs hidden size")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def activation_figure(rows: Sequence[dict], swept: Sequence[str]) -> Figure | None:
    """Per activation: the best val_acc and the test_acc of that same run, as bars.
    None unless model.activation varies."""
    if "model.activation" not in swept:
        return None
    best: dict[str, dict] = {}
    for row in finished(rows):  # best first: the first row of each activation
        best.setdefault(row["model.activation"], row)
    if not best:
        return None
    names = list(best)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    for offset, key, color in ((-0.2, "val_acc", "tab:blue"), (0.2, "test_acc", "tab:green")):
        values = [best[n][key] if best[n][key] is not None else np.nan for n in names]
        bars = ax.bar(x + offset, values, width=0.4, color=color, label=key)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, min(1.0, 1.15 * max(r["val_acc"] for r in best.values())))
    ax.set_xlabel("activation")
    ax.set_ylabel("accuracy")
    ax.set_title("Best run per activation (by val_acc) and its test accuracy")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def png(fig: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """The figure as PNG bytes at `dpi` (a sweep's figures are drawn at FIGURE_DPI)."""
    return run_plots.png(fig, dpi)


