"""Figures of a training run: curves with the overfitting gap, confusion matrix,
per-class accuracy, first-layer weights as images.

Built on `matplotlib.figure.Figure` directly (no pyplot): no global state and no GUI
backend, so figures can be made in any process or thread of a sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

Array = np.ndarray


def confusion_matrix(y_true: Array, y_pred: Array, num_classes: int) -> Array:
    """Counts (C, C) int64: row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(y_true: Array, y_pred: Array, num_classes: int) -> Array:
    """Accuracy of each true class (C,), NaN for a class with no samples."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def curves_figure(history: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch, train vs validation, with the gap between them shaded
    and the final gap and the best validation epoch marked. history: lists of equal
    length under "train_loss", "val_loss", "train_acc", "val_acc"."""
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        train = np.asarray(history[f"train_{key}"], dtype=float)
        val = np.asarray(history[f"val_{key}"], dtype=float)
        ax.plot(epochs, train, "o-", ms=3, label=f"train {key}")
        ax.plot(epochs, val, "o-", ms=3, label=f"val {key}")
        ax.fill_between(epochs, train, val, color="tab:red", alpha=0.15, label="gap")
        gap = val[-1] - train[-1] if key == "loss" else train[-1] - val[-1]
        text = f"gap {gap:.3f}" if key == "loss" else f"gap {100 * gap:.1f} pts"
        ax.annotate(text, (epochs[-1], (train[-1] + val[-1]) / 2), xytext=(-8, 0),
                    textcoords="offset points", ha="right", va="center", fontsize=9)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    val_acc = np.asarray(history["val_acc"], dtype=float)
    best = int(np.argmax(val_acc))
    ax_acc.axvline(epochs[best], color="gray", ls="--", lw=1,
                   label=f"best val {val_acc[best]:.3f} (epoch {epochs[best]})")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    return fig


def confusion_figure(y_true: Array, y_pred: Array, classes: Sequence[str]) -> Figure:
    """The row-normalized confusion matrix (rows: true class) with percentages."""
    c = len(classes)
    cm = confusion_matrix(y_true, y_pred, c)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(c, c):
        ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), classes, rotation=45, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix (%), accuracy {np.trace(cm) / max(cm.sum(), 1):.3f}")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def per_class_figure(y_true: Array, y_pred: Array, classes: Sequence[str]) -> Figure:
    """Per-class accuracy as horizontal bars, the overall accuracy as a line."""
    acc = per_class_accuracy(y_true, y_pred, len(classes))
    overall = float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(classes)), np.nan_to_num(acc), color="tab:blue")
    ax.axvline(overall, color="tab:red", ls="--", label=f"overall {overall:.3f}")
    ax.set_yticks(range(len(classes)), classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("Test accuracy per class")
    ax.legend(loc="lower right")
    return fig


def weights_figure(W: Array, max_units: int = 100) -> Figure:
    """First-layer weights W (3072, H) as 32x32 RGB images, one per unit (up to
    max_units), each rescaled to [0, 1] on its own as in cs231n."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != 3072:
        raise ValueError(f"W has shape {W.shape}: expected (3072, H) first-layer weights")
    units = W[:, :max_units].T.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    lo = units.min(axis=(1, 2, 3), keepdims=True)
    hi = units.max(axis=(1, 2, 3), keepdims=True)
    units = (units - lo) / np.maximum(hi - lo, 1e-12)
    cols = int(np.ceil(np.sqrt(len(units))))
    rows = int(np.ceil(len(units) / cols))
    fig = Figure(figsize=(cols * 0.9, rows * 0.9 + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image in zip(axes, units, strict=False):
        ax.imshow(image, interpolation="nearest")
    fig.suptitle(f"First-layer weights ({min(W.shape[1], max_units)} of {W.shape[1]} units)")
    return fig
