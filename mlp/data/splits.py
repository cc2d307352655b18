"""Stage 4, split: a seeded validation set held out of the training images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlp.data.cache import Cifar10
from mlp.data.cifar import DataError


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test sets: X uint8 (N, 3072) rows, y int64 (N,) labels.

    `fingerprint` identifies the split for tracking: archive_sha256, n_train, n_val, n_test,
    limit, val_size, seed.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    fingerprint: dict


def split(data: Cifar10, val_size: int = 5000, limit: int | None = None, seed: int = 0) -> Splits:
    """Hold `val_size` images out of the first `limit` training images (all when None).

    The validation images are chosen by `np.random.default_rng(seed).permutation`; train and
    validation rows keep their archive order. The test set is passed through untouched. X_train
    (limit - val_size, 3072) and X_val (val_size, 3072) are in-memory copies (one read of the
    memory-mapped cache); y_* int64. val_size may be 0 (an empty validation set) and must be
    smaller than the number of images used; otherwise DataError.
    """
    available = len(data.y_train)
    n = available if limit is None else limit
    if not 1 <= n <= available:
        raise DataError(
            f"data.limit={limit}: must be between 1 and the {available} training images."
        )
    if not 0 <= val_size < n:
        raise DataError(
            f"data.val_size={val_size}: must be at least 0 and smaller than the {n} training "
            f"images used (data.limit={limit}). Lower data.val_size or raise data.limit."
        )
    order = np.random.default_rng(seed).permutation(n)
    # sorted indices read the memory-mapped cache front to back; batches() shuffles anyway
    val_idx = np.sort(order[:val_size])
    train_idx = np.sort(order[val_size:])
    fingerprint = {
        "archive_sha256": data.digest,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(data.y_test),
        "limit": limit,
        "val_size": val_size,
        "seed": seed,
    }
    return Splits(
        X_train=data.X_train[train_idx],
        y_train=np.asarray(data.y_train[train_idx]),
        X_val=data.X_train[val_idx],
        y_val=np.asarray(data.y_train[val_idx]),
        X_test=data.X_test,
        y_test=data.y_test,
        classes=data.classes,
        fingerprint=fingerprint,
    )

