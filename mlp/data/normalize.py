"""Stage 5, normalize: preprocessing fitted on the training split, uint8 rows -> floats."""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from mlp.data.cifar import DataError

_FIT_ROWS = 1024  # rows per float64 chunk in Normalizer.fit: 25 MB, not a copy of the split


def _check_mode(mode: str) -> str:
    if mode not in Normalizer.MODES:
        raise DataError(
            f"data.normalize={mode!r}: unknown mode; choose one of {', '.join(Normalizer.MODES)}."
        )
    return mode


class Normalizer:
    """Preprocessing fitted on the training split: X uint8 (B, 3072) -> (X - mean) / scale.

    Modes: "mean_image" subtracts the per-pixel mean image of the training split (cs231n);
    "channel" subtracts the per-channel mean and divides by the per-channel std; "none" keeps
    the raw pixel values 0..255, as floats. `mean` and `scale` are float64 (3072,) arrays
    (scale is all ones except in "channel" mode), saved by `state_dict`.
    """

    MODES = ("mean_image", "channel", "none")

    def __init__(self, mode: str = "channel") -> None:
        self.mode = _check_mode(mode)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, X: np.ndarray) -> Normalizer:
        """Compute mean and scale from X uint8 (N, 3072), in float64 chunks; returns self."""
        n, d = X.shape
        if self.mode == "none":
            self.mean, self.scale = np.zeros(d), np.ones(d)
            return self
        if n == 0:
            raise DataError("cannot fit the normalizer on an empty training split.")
        total, squares = np.zeros(d), np.zeros(d)
        for start in range(0, n, _FIT_ROWS):
            chunk = X[start : start + _FIT_ROWS].astype(np.float64)
            total += chunk.sum(axis=0)
            if self.mode == "channel":
                squares += np.einsum("ij,ij->j", chunk, chunk)
        if self.mode == "mean_image":
            self.mean, self.scale = total / n, np.ones(d)
            return self
        count = n * (d // 3)
        mean = total.reshape(3, -1).sum(axis=1) / count
        std = np.sqrt(np.maximum(squares.reshape(3, -1).sum(axis=1) / count - mean**2, 0.0))
        std[std == 0] = 1.0  # a constant channel: nothing to scale, and no division by zero
        self.mean, self.scale = np.repeat(mean, d // 3), np.repeat(std, d // 3)
        return self

    def __call__(
        self, X: np.ndarray, dtype: DTypeLike = np.float32, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalize X uint8 (B, 3072) into a new float (B, 3072) array of `dtype`.

        With `out` (a float (B, 3072) buffer to reuse) the result is written there, in out's
        dtype, and `out` is returned.
        """
        if self.mean is None or self.scale is None:
            raise RuntimeError("Normalizer: call fit() or load_state_dict() first.")
        if out is None:
            out = np.empty(X.shape, dtype=dtype)
        np.subtract(X, self.mean.astype(out.dtype), out=out)
        np.multiply(out, (1.0 / self.scale).astype(out.dtype), out=out)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"mode": 0-d str array, "mean": (3072,), "scale": (3072,)}: plain arrays for .npz."""
        if self.mean is None or self.scale is None:
            raise RuntimeError("Normalizer: nothing to save before fit().")
        return {"mode": np.array(self.mode), "mean": self.mean.copy(), "scale": self.scale.copy()}

    def check_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Raise DataError unless `state` is what `state_dict()` returns: a known mode, and
        mean and scale of one shape (D,), finite, scale > 0."""
        missing = sorted({"mode", "mean", "scale"} - state.keys())
        if missing:
            raise DataError(f"normalizer state lacks {missing}.")
        _check_mode(str(state["mode"]))
        mean, scale = np.asarray(state["mean"]), np.asarray(state["scale"])
        if mean.ndim != 1 or mean.shape != scale.shape or not (
                np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise DataError(f"normalizer state: mean {mean.shape} and scale {scale.shape} must "
                            "be finite vectors of one length, scale > 0.")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore mode, mean and scale from `state_dict()` output (checked first)."""
        self.check_state_dict(state)
        self.mode = _check_mode(str(state["mode"]))
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.scale = np.array(state["scale"], dtype=np.float64)

