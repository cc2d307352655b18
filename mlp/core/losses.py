"""Losses: `(scores, y) -> (loss, dscores)`, averaged over the batch.

The loss is a NumPy scalar of the scores' dtype (kept, not rounded to a Python float, so
that the gradient check's extended-precision forward passes stay extended).
scores (N, C) float, y (N,) integer class ids in [0, C). dscores has the shape and dtype
of scores. `kink_state(scores, y)` names the branch of each max in the loss (None for a
smooth loss), for the gradient check.
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray


def softmax_loss(scores: Array, y: Array, label_smoothing: float = 0.0) -> tuple[float, Array]:
    """Softmax cross-entropy against targets q: L = mean_i -sum_j q_ij log softmax(scores_i)_j.

    q is onehot(y) without label smoothing (L = mean_i -log softmax(scores_i)[y_i]); with
    label_smoothing s in [0, 1) (Szegedy et al. 2016) q = (1 - s) onehot(y) + s / C, so
    the loss keeps pulling the correct score up only until its probability is about
    1 - s + s / C. Stable by log-sum-exp (scores shifted by their row max). The backward
    is fused with the forward: dscores = (softmax - q) / N. With s = 0 both are, bit for
    bit, those of the plain loss.
    """
    n, num_classes = scores.shape
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    # L_i = log sum_j exp(shifted_ij) - sum_j q_ij shifted_ij, as q_i sums to 1
    target = shifted[rows, y]
    if label_smoothing:
        target = (1 - label_smoothing) * target + label_smoothing * shifted.mean(axis=1)
    loss = np.add.reduce(np.log(sums[:, 0]) - target) / n  # np.mean's value, at less cost
    dscores = exp
    dscores /= sums
    if label_smoothing:
        dscores -= label_smoothing / num_classes
    dscores[rows, y] -= 1 - label_smoothing
    dscores /= n
    return loss, dscores


def svm_loss(scores: Array, y: Array) -> tuple[float, Array]:
    """Multiclass SVM (hinge) loss with margin 1: L = mean_i sum_{j != y_i} max(0, s_j - s_y + 1).

    Each active margin sends +1 to its class and -1 to the correct class (the max gate
    routes where the margin is positive), divided by N.
    """
    n = scores.shape[0]
    rows = np.arange(n)
    margins = scores - scores[rows, y][:, None] + 1
    margins[rows, y] = 0
    active = margins > 0
    loss = np.sum(margins[active]) / n
    dscores = active.astype(scores.dtype)
    dscores[rows, y] = -dscores.sum(axis=1)
    dscores /= n
    return loss, dscores


def svm_kink_state(scores: Array, y: Array) -> Array:
    """Which hinge margins are active (N, C) bool: the branch of each max(0, margin)."""
    rows = np.arange(scores.shape[0])
    active = scores - scores[rows, y][:, None] + 1 > 0
    active[rows, y] = False
    return active


LOSSES = {"softmax": softmax_loss, "svm": svm_loss}
KINK_STATES = {"softmax": None, "svm": svm_kink_state}
