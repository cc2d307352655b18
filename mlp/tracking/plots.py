"""Figures of a training run: curves with the overfitting gap, confusion matrix,
per-class accuracy, first-layer weights as images.

Built on `matplotlib.figure.Figure` directly (no pyplot): no global state and no GUI
backend, so figures can be made in any process or thread of a sweep. Every function
returns a Figure and leaves saving or logging it to the caller. Matplotlib is imported
with the first figure (`_figure`), not with this module: `mlp-train` starts ~0.5 s sooner,
and in a sweep the figures are drawn on the thread that records a run's tail
(`tracking.deferred`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mlp.tracking import glance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Array = np.ndarray

# CIFAR-10 rows: the R, G and B planes of a 32x32 image, one after the other.
IMAGE_SHAPE = (3, 32, 32)
INPUT_DIM = 3 * 32 * 32
UNIT_GAP = 2  # white pixels between two units' images in `weights_figure`


def _figure(figsize: tuple[float, float], margins: tuple[float, float, float, float],
            **adjust: float) -> Figure:
    """A new matplotlib Figure of `figsize` inches (matplotlib loads here, the first time)
    whose axes leave `margins` (left, bottom, right, top), in inches, to their labels;
    `adjust`: more of `Figure.subplots_adjust` (wspace).

    Fixed margins, not a layout engine: constrained layout measures every label in a
    draw of its own before the draw that saves the figure; without it a run's five
    figures take 0.9 s of CPU instead of 1.3 s, on the thread that shares the cores with
    the next job of a sweep. What the figures hold has a known size (CIFAR-10's class
    names, accuracies, losses up to the thousands): each function says how much room it
    leaves, and the tests measure what is drawn against it (`room_left`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    (w, h), (left, bottom, right, top) = figsize, margins
    fig.subplots_adjust(left=left / w, bottom=bottom / h, right=1 - right / w, top=1 - top / h,
                        **adjust)
    return fig


def png(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes at `dpi` (matplotlib's default when None)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **({} if dpi is None else {"dpi": dpi}))
    return buffer.getvalue()


def room_left(fig: Figure) -> tuple[float, float, float, float]:
    """The white space, in inches, between each edge of `fig` (left, bottom, right, top)
    and what is drawn on it (axes with their ticks, labels and titles; figure texts),
    measured on a draw: negative where something is cut off. What `_figure`'s fixed
    margins are checked with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    boxes += [t.get_window_extent(renderer) for t in fig.texts]
    w, h = fig.get_size_inches() * fig.dpi
    return (min(b.x0 for b in boxes) / fig.dpi, min(b.y0 for b in boxes) / fig.dpi,
            (w - max(b.x1 for b in boxes)) / fig.dpi, (h - max(b.y1 for b in boxes)) / fig.dpi)


def _labels(y_true: Array, y_pred: Array, num_classes: int) -> tuple[Array, Array]:
    """y_true, y_pred as int64 (N,) arrays, checked to be class ids in [0, num_classes)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape}: expected two (N,)")
    # An out-of-range label would not fail in bincount: it would land in another cell.
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def confusion_matrix(y_true: Array, y_pred: Array, num_classes: int) -> Array:
    """Counts of (true, predicted) pairs: y_true, y_pred int (N,) in [0, C) -> (C, C) int64,
    row = true class, column = predicted class. One bincount over the flat index
    true * C + pred; labels outside [0, C) or mismatched shapes raise ValueError."""
    y_true, y_pred = _labels(y_true, y_pred, num_classes)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(y_true: Array, y_pred: Array, num_classes: int) -> Array:
    """Accuracy of each true class: y_true, y_pred int (N,) in [0, C) -> (C,) float64, the
    diagonal of the confusion matrix over its row sums; NaN for a class with no samples
    (an unknown accuracy, not a zero one)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    totals = cm.sum(axis=1)
    return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def _accuracy(cm: Array) -> float:
    """Overall accuracy from a (C, C) confusion matrix; NaN when it counts nothing."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def curves_figure(history: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch, train vs validation, in two panels. history holds lists of
    equal length E >= 1 (epochs 1..E) under "train_loss", "val_loss", "train_acc",
    "val_acc" (accuracies as fractions). The gap between train and validation is shaded,
    its final value written at the last epoch (val - train for the loss, train - val in
    percentage points for the accuracy, as the gap_loss / gap_acc metrics), and the epoch of
    the best validation accuracy is marked."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig = _figure((11, 4.2), (0.95, 0.5, 0.2, 0.35), wspace=0.22)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, name in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        train = np.asarray(history[f"train_{key}"], dtype=float)
        val = np.asarray(history[f"val_{key}"], dtype=float)
        ax.plot(epochs, train, "o-", ms=3, label=f"train {key}")
        ax.plot(epochs, val, "o-", ms=3, label=f"val {key}")
        ax.fill_between(epochs, train, val, color="tab:red", alpha=0.15, label="gap")
        gap = val[-1] - train[-1] if key == "loss" else train[-1] - val[-1]
        text = f"gap {gap:.3f}" if key == "loss" else f"gap {100 * gap:.1f} pts"
        # Left of the last point, so the label stays inside the axes at any epoch count.
        ax.annotate(text, (epochs[-1], (train[-1] + val[-1]) / 2), xytext=(-8, 0),
                    textcoords="offset points", ha="right", va="center", fontsize=9)
        ax.set_title(f"{name} (train vs val)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower())
        # Integer epochs only (a fractional tick would suggest a mid-epoch evaluation), and
        # room around a single epoch, which matplotlib would otherwise zoom into.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(0.5, epochs[-1] + 0.5)
        # At most 4 significant digits and never an offset ("+1e0" over a flat curve):
        # the labels keep to the margin, from 0.0002 to 2.5e+04.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))
        ax.grid(alpha=0.3)
    val_acc = np.asarray(history["val_acc"], dtype=float)
    if np.isfinite(val_acc).any():
        best = int(np.nanargmax(np.where(np.isfinite(val_acc), val_acc, np.nan)))
        ax_acc.axvline(epochs[best], color="gray", ls="--", lw=1,
                       label=f"best val {val_acc[best]:.3f} (epoch {epochs[best]})")
        ax_acc.plot(epochs[best], val_acc[best], "*", color="tab:orange", ms=12)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    return fig


def glance_figure(history: dict[str, list[float]]) -> Figure:
    """The run's learning curves at a glance (`glance.IMAGE_INCHES`, 96 pixels tall, beside
    the result on the Overview's first screen): train and validation accuracy per epoch
    (history as in `curves_figure`), the gap between them shaded, the best validation
    epoch marked."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    epochs = np.arange(1, len(history["train_acc"]) + 1)
    train = np.asarray(history["train_acc"], dtype=float)
    val = np.asarray(history["val_acc"], dtype=float)
    fig = _figure(glance.IMAGE_INCHES, (0.27, 0.16, 0.08, 0.13))
    ax = fig.subplots()
    style = "-" if len(epochs) > 1 else "o"  # a line of one point is not drawn
    ax.plot(epochs, train, style, lw=1.2, ms=3, label="train")
    ax.plot(epochs, val, style, lw=1.2, ms=3, label="val")
    ax.fill_between(epochs, train, val, color="tab:red", alpha=0.15, lw=0)
    if np.isfinite(val).any():
        best = int(np.nanargmax(np.where(np.isfinite(val), val, np.nan)))
        ax.axvline(epochs[best], color="gray", ls="--", lw=0.7)
        ax.plot(epochs[best], val[best], "*", color="tab:orange", ms=7, label="best val")
    ax.set_title("accuracy per epoch", fontsize=7, pad=2)
    # The legend in one row above the curves (the top third kept free for it): in 96
    # pixels, one anywhere else covers a curve.
    shown = np.concatenate([train[np.isfinite(train)], val[np.isfinite(val)]])
    if shown.size:
        lo, hi = float(shown.min()), float(shown.max())
        span = max(hi - lo, 0.02)
        ax.set_ylim(lo - 0.08 * span, hi + 0.6 * span)
        # Ticks where the curves are, not up in the legend's room (no accuracy of 1.2).
        ticks = MaxNLocator(2).tick_values(lo, hi)
        ax.set_yticks(ticks[(ticks >= lo - 0.08 * span) & (ticks <= hi)])
    # Short labels, never an offset ("+1e0" over the title of a flat curve at 1.0): in
    # 27 pixels of margin, "0.45" fits, "1.000000" does not.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    ax.legend(fontsize=6, frameon=False, handlelength=1, loc="upper center", ncols=3,
              borderaxespad=0.1, columnspacing=1)
    glance.small_axes(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.5, epochs[-1] + 0.5)
    return fig


def confusion_figure(y_true: Array, y_pred: Array, classes: Sequence[str]) -> Figure:
    """The row-normalized confusion matrix as an image: y_true, y_pred int (N,) in [0, C),
    classes the C names. Cell (i, j) is the percentage of class i predicted as j, so each
    row sums to 100 whatever the class sizes; a class with no samples has an empty row.
    The overall accuracy is in the title."""
    c = len(classes)
    cm = confusion_matrix(y_true, y_pred, c)
    totals = cm.sum(axis=1, keepdims=True)
    rates = np.where(totals > 0, cm / np.maximum(totals, 1), np.nan)
    fig = _figure((1.5 + 0.6 * c, 1 + 0.55 * c), (1.25, 1.05, 0.1, 0.35))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(c, c):
        if np.isfinite(rates[i, j]):
            # White on the dark cells so the number stays readable.
            ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), classes, rotation=45, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (% of each true class), accuracy {_accuracy(cm):.3f}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    return fig


def per_class_figure(y_true: Array, y_pred: Array, classes: Sequence[str]) -> Figure:
    """Per-class accuracy as horizontal bars, one per class in the order of classes (C names),
    with the overall accuracy as a vertical line: y_true, y_pred int (N,) in [0, C). A class
    with no samples gets no bar and is labelled so, rather than showing a false zero."""
    c = len(classes)
    acc = per_class_accuracy(y_true, y_pred, c)
    overall = _accuracy(confusion_matrix(y_true, y_pred, c))
    fig = _figure((6.5, 1.2 + 0.35 * c), (1.0, 0.5, 0.6, 0.35))
    ax = fig.subplots()
    rows = np.arange(c)
    ax.barh(rows, np.nan_to_num(acc), color="tab:blue")
    # Values in a column right of the axes, where neither the bars nor the line can cover them.
    for row, value in zip(rows, acc, strict=True):
        text = f"{value:.3f}" if np.isfinite(value) else "no samples"
        ax.text(1.02, row, text, transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    if np.isfinite(overall):
        ax.axvline(overall, color="tab:red", ls="--", label=f"overall {overall:.3f}")
        ax.legend(loc="best", fontsize=8)
    ax.set_yticks(rows, classes)
    ax.invert_yaxis()  # first class on top, as in the confusion matrix
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("Accuracy per class")
    return fig


def weights_figure(W: Array, max_units: int = 100) -> Figure:
    """First-layer weights W (3072, H) as a grid of 32x32 RGB images, one per hidden unit
    (column of W), for the first min(H, max_units) units. A column holds CIFAR's R, G and B
    planes, so it is reshaped to (3, 32, 32) and moved to (32, 32, 3); each image is rescaled
    to [0, 1] on its own (as in cs231n), which shows its pattern, not its scale. The grid
    is one image (white lines between the units; `UNIT_GAP` pixels), row by row: drawn in
    ~0.1 s where one axes per unit took ~1 s. Any other input width, or max_units < 1,
    raises ValueError."""
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] != INPUT_DIM or W.shape[1] == 0:
        raise ValueError(f"W has shape {W.shape}: expected first-layer weights ({INPUT_DIM}, H)")
    if max_units < 1:
        raise ValueError(f"max_units must be >= 1, got {max_units}")
    # Slice before converting: W can be wide and only the shown units need float64.
    shown = W[:, :max_units].T.astype(np.float64)
    units = shown.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)
    lo = units.min(axis=(1, 2, 3), keepdims=True)
    hi = units.max(axis=(1, 2, 3), keepdims=True)
    units = (units - lo) / np.maximum(hi - lo, 1e-12)  # a constant unit becomes black
    cols = int(np.ceil(np.sqrt(len(units))))
    rows = int(np.ceil(len(units) / cols))
    side = IMAGE_SHAPE[1] + UNIT_GAP
    grid = np.ones((rows * side - UNIT_GAP, cols * side - UNIT_GAP, 3))
    for k, image in enumerate(units):
        r, c = divmod(k, cols)
        grid[r * side:r * side + IMAGE_SHAPE[1], c * side:c * side + IMAGE_SHAPE[2]] = image
    fig = _figure((max(cols * 0.9, 3.5), rows * 0.9 + 0.4), (0.05, 0.05, 0.05, 0.35))
    ax = fig.subplots()
    ax.set_axis_off()
    ax.imshow(grid, interpolation="nearest")
    fig.suptitle(f"First-layer weights ({len(units)} of {W.shape[1]} units)")
    return fig

