"""What a trained model answers for raw images: its class scores, the one rule that the
trainer's evaluation and the served model (`mlp.tracking.serving`) both follow, so that
the test accuracy a run records is the accuracy of what it serves.

Test-time augmentation averages a model's scores (logits) over views of each image, the
views its training augmentation made likely inputs (`Scoring`): the image and, with
`flip`, its mirror image; with `shift` s > 0, also the image moved by s pixels up, down,
left and right (zero-filled, as the training crops are), each mirrored too with `flip`.
The mean of the views' scores errs less than any one view's. The mean is taken over the
scores, so the loss of the averaged scores is still a cross-entropy of one set of scores.

Imports NumPy, `mlp.core` and `mlp.data` only: the served model loads it where nothing
else of mlp-lab's dependencies is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from mlp.core.model import MLP
from mlp.data.batches import mirror, shift
from mlp.data.normalize import Normalizer

Array = np.ndarray


@dataclass(frozen=True)
class Scoring:
    """The views scores are averaged over (`data.augment.test_flip`, `.test_shift`)."""

    flip: bool = False
    shift: int = 0

    def offsets(self) -> list[tuple[int, int]]:
        """The (rows, columns) moves of the views, (0, 0) first."""
        s = self.shift
        return [(0, 0)] + ([(-s, 0), (s, 0), (0, -s), (0, s)] if s else [])

    @property
    def views(self) -> int:
        return len(self.offsets()) * (2 if self.flip else 1)


PLAIN = Scoring()  # each image as it is


def scores(model: MLP, normalizer: Normalizer, X: Array, dtype: DTypeLike,
           scoring: Scoring = PLAIN, out: Array | None = None) -> Array:
    """Class scores (N, C), a new array, of `model` in evaluation mode for pixels X
    (N, 3072) (uint8, or floats on the 0-255 scale) normalized by `normalizer` into `dtype`
    (into `out`, a reusable (N, normalizer.out_dim) array, when given): the mean of the
    scores of `scoring`'s views of X."""
    total = None
    for dy, dx in scoring.offsets():
        moved = shift(X, dy, dx) if dy or dx else X
        for view in (moved, mirror(moved)) if scoring.flip else (moved,):
            s = model.scores(normalizer(view, dtype, out=out))
            # a copy first: the model may reuse its arrays in the next view's pass
            total = s.copy() if total is None else np.add(total, s, out=total)
    if scoring.views > 1:
        total /= scoring.views
    return total
