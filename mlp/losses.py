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


def softmax_loss(scores: Array, y: Array) -> tuple[float, Array]:
    """Softmax cross-entropy: L = mean_i -log softmax(scores_i)[y_i].

    Stable by log-sum-exp (scores shifted by their row max). The backward is fused with
    the forward: dscores = (softmax - onehot(y)) / N.
    """
    n = scores.shape[0]
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = np.mean(np.log(sums[:, 0]) - shifted[rows, y])
    dscores = exp
    dscores /= sums
    dscores[rows, y] -= 1
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
