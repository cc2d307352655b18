"""Stage 5, normalize: preprocessing fitted on the training split, uint8 rows -> floats."""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from mlp.data.cifar import DIM, DataError

_FIT_ROWS = 1024  # rows per float64 chunk in Normalizer.fit: 25 MB, not a copy of the split


def _check_mode(mode: str) -> str:
    if mode not in Normalizer.MODES:
        raise DataError(
            f"data.normalize={mode!r}: unknown mode; choose one of {', '.join(Normalizer.MODES)}."
        )
    return mode


def _check_whiten(whiten: str) -> str:
    if whiten not in Normalizer.WHITENINGS:
        raise DataError(f"data.whiten.name={whiten!r}: unknown whitening; choose one of "
                        f"{', '.join(Normalizer.WHITENINGS)}.")
    return whiten


def output_dim(whiten: str, components: int | None, in_dim: int = DIM) -> int:
    """Features per image out of a Normalizer: `components` (all in_dim when None) for PCA,
    which keeps the leading principal components only; in_dim otherwise. The model's
    input_dim, known from the config before any image is read."""
    return (components or in_dim) if whiten == "pca" else in_dim


class Normalizer:
    """Preprocessing fitted on the training split: X uint8 (B, 3072) -> (X - mean) / scale,
    then optionally whitened: -> ((X - mean) / scale) @ projection, (B, out_dim).

    Modes: "mean_image" subtracts the per-pixel mean image of the training split (cs231n);
    "channel" subtracts the per-channel mean and divides by the per-channel std; "none" keeps
    the raw pixel values 0..255, as floats. `mean` and `scale` are float64 (3072,) arrays
    (scale is all ones except in "channel" mode), saved by `state_dict`.

    Whitening decorrelates the pixels of the normalized training images: with their
    covariance U diag(s) U^T (eigenvalues s descending), "pca" projects onto the leading
    `components` eigenvectors U_k and rescales each to unit variance, projection = U_k /
    sqrt(s_k + eps), (3072, k); "zca" rotates that back onto the pixels, projection =
    U_k / sqrt(s_k + eps) U_k^T, (3072, 3072), the whitening that moves the images least.
    Whitening needs every pixel centred, so `mean` is then the per-pixel mean whatever
    the mode. `eps` is in the units of the normalized pixels' variance (see __init__).
    """

    MODES = ("mean_image", "channel", "none")
    WHITENINGS = ("none", "pca", "zca")

    def __init__(self, mode: str = "channel", whiten: str = "none",
                 components: int | None = None, eps: float = 0.1) -> None:
        # eps = 0.1: channel-normalized pixels have variance ~1 each (3027 in all on
        # CIFAR-10's training split), whose top components hold 879, 344, 204, ... while
        # 2455 of the 3072 hold less than 0.1 (0.7% of the variance, fine detail down to
        # 3e-5, the size of 8-bit rounding). eps caps their gain at 1/sqrt(0.1) ~ 3 instead
        # of up to 170, which would amplify them into noise, and whitens the components
        # well above 0.1 fully.
        self.mode = _check_mode(mode)
        self.whiten = _check_whiten(whiten)
        if components is not None and components < 1:
            raise DataError(f"data.whiten.components={components}: expected null or >= 1.")
        if not eps > 0:
            raise DataError(f"data.whiten.eps={eps}: expected a number > 0.")
        self.components, self.eps = components, eps
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.projection: np.ndarray | None = None  # float64 (3072, out_dim) when whitening
        self._cast: dict[np.dtype, np.ndarray] = {}  # the projection in each batch dtype

    @property
    def in_dim(self) -> int:
        """Pixels per image in (3072)."""
        if self.mean is None:
            raise RuntimeError("Normalizer: call fit() or load_state_dict() first.")
        return len(self.mean)

    @property
    def out_dim(self) -> int:
        """Features per image out: the model's input_dim (see `output_dim`)."""
        return self.in_dim if self.projection is None else self.projection.shape[1]

    def fit(self, X: np.ndarray) -> Normalizer:
        """Compute mean and scale (and the projection when whitening) from X uint8
        (N, 3072), in float64 chunks; returns self."""
        n, d = X.shape
        self.projection, self._cast = None, {}
        if self.mode == "none" and self.whiten == "none":
            self.mean, self.scale = np.zeros(d), np.ones(d)
            return self
        if n == 0:
            raise DataError("cannot fit the normalizer on an empty training split.")
        if self.components is not None and self.components > d:
            raise DataError(f"data.whiten.components={self.components}: an image has only "
                            f"{d} pixels.")
        total, squares = np.zeros(d), np.zeros(d)
        for start in range(0, n, _FIT_ROWS):
            chunk = X[start : start + _FIT_ROWS].astype(np.float64)
            total += chunk.sum(axis=0)
            if self.mode == "channel":
                squares += np.einsum("ij,ij->j", chunk, chunk)
        if self.mode == "channel":
            count = n * (d // 3)
            mean = total.reshape(3, -1).sum(axis=1) / count
            std = np.sqrt(np.maximum(squares.reshape(3, -1).sum(axis=1) / count - mean**2, 0.0))
            std[std == 0] = 1.0  # a constant channel: nothing to scale, and no division by zero
            self.mean, self.scale = np.repeat(mean, d // 3), np.repeat(std, d // 3)
        else:
            self.mean, self.scale = (total / n if self.mode == "mean_image" else np.zeros(d),
                                     np.ones(d))
        if self.whiten != "none":
            self.mean = total / n
            self.projection = self._fit_projection(X)
        return self

    def _fit_projection(self, X: np.ndarray) -> np.ndarray:
        """The whitening projection (3072, out_dim), float64, from the covariance of the
        normalized rows of X uint8 (N, 3072): its eigendecomposition (`_eig_of_cov`), or,
        from fewer images than pixels when the projection needs no eigenvector of the
        covariance's null space, the SVD of those rows (`_eig_of_rows`: the same
        eigenpairs; 600 images of 3072 pixels: 7.7 s against 29 s for eigh, measured under
        load)."""
        n, d = X.shape
        k = self.components or d
        if n < d and (k <= n or (self.whiten == "zca" and k == d)):
            s, U = self._eig_of_rows(X)
        else:
            s, U = self._eig_of_cov(X)
        # eigh's rounding leaves some zero eigenvalues of a singular covariance negative
        s, U = np.maximum(s[:k], 0.0), U[:, :k]
        projection = U / np.sqrt(s + self.eps)
        if self.whiten == "zca":
            projection = projection @ U.T
            if U.shape[1] < k:  # U_k U_k^T / sqrt(s + eps) over the null space too (s = 0)
                projection += (np.eye(d) - U @ U.T) / np.sqrt(self.eps)
        return np.ascontiguousarray(projection)

    def _normalized_chunks(self, X: np.ndarray):
        """The rows of X uint8 (N, 3072) normalized, float64, _FIT_ROWS at a time."""
        inv_scale = 1.0 / self.scale
        for start in range(0, len(X), _FIT_ROWS):
            z = X[start : start + _FIT_ROWS].astype(np.float64)
            z -= self.mean
            z *= inv_scale
            yield z

    def _eig_of_cov(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The covariance's eigenvalues (d,) descending and eigenvectors (d, d), the
        covariance summed chunk by chunk into one (3072, 3072) array: the peak is that, one
        product of the same size and a 25 MB chunk (then `eigh`'s own work arrays), never a
        float64 copy of X."""
        d = X.shape[1]
        cov, product = np.zeros((d, d)), np.empty((d, d))
        for z in self._normalized_chunks(X):
            np.matmul(z.T, z, out=product)
            cov += product
        del product
        cov /= len(X)
        s, U = np.linalg.eigh(cov)
        return s[::-1], U[:, ::-1]

    def _eig_of_rows(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The covariance's nonzero-rank eigenpairs from the SVD of the normalized rows Z
        (N, d), N < d: Z = V S W^T gives cov = W (S^2 / N) W^T; (N,) descending, (d, N).
        Holds Z in float64 (N x d, at most 75 MB)."""
        Z = np.concatenate(list(self._normalized_chunks(X)))
        _, S, Wt = np.linalg.svd(Z, full_matrices=False)
        return S**2 / len(X), Wt.T

    def __call__(
        self, X: np.ndarray, dtype: DTypeLike = np.float32, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalize X uint8 (B, 3072) into a new float (B, out_dim) array of `dtype`.

        With `out` (a float (B, out_dim) buffer to reuse) the result is written there, in
        out's dtype, and `out` is returned. Whitening normalizes into a (B, 3072) scratch
        array first (per call: the trainer prepares batches on a helper thread while it
        evaluates), then multiplies by the projection in that dtype.
        """
        if self.mean is None or self.scale is None:
            raise RuntimeError("Normalizer: call fit() or load_state_dict() first.")
        if out is None:
            out = np.empty((len(X), self.out_dim), dtype=dtype)
        pixels = out if self.projection is None else np.empty(X.shape, dtype=out.dtype)
        np.subtract(X, self.mean.astype(out.dtype), out=pixels)
        np.multiply(pixels, (1.0 / self.scale).astype(out.dtype), out=pixels)
        if self.projection is not None:
            np.matmul(pixels, self._projection_as(out.dtype), out=out)
        return out

    def _projection_as(self, dtype: np.dtype) -> np.ndarray:
        """The projection in `dtype`, cast once (a ZCA projection is 38 MB in float32)."""
        projection = self._cast.get(dtype)
        if projection is None:
            projection = self._cast[dtype] = self.projection.astype(dtype, copy=False)
        return projection

    def image_weights(self, W: np.ndarray) -> np.ndarray:
        """First-layer weights W (out_dim, H) over the pixels, (3072, H), for
        `plots.weights_figure`: W itself when the model's inputs are pixels (no whitening,
        ZCA); after PCA, each unit's weights on the k components rotated back onto the
        pixels by the eigenvectors U_k (the projection's columns, unit length again),
        which is what a ZCA model with those weights shows."""
        if self.projection is None or self.whiten == "zca":
            return W
        U = self.projection / np.linalg.norm(self.projection, axis=0)
        return U @ W

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"mode": 0-d str array, "mean": (3072,), "scale": (3072,)}, and when whitening
        "whiten": 0-d str array, "projection": (3072, out_dim): plain arrays for .npz."""
        if self.mean is None or self.scale is None:
            raise RuntimeError("Normalizer: nothing to save before fit().")
        state = {"mode": np.array(self.mode), "mean": self.mean.copy(),
                 "scale": self.scale.copy()}
        if self.projection is not None:
            state |= {"whiten": np.array(self.whiten), "projection": self.projection.copy()}
        return state

    def check_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Raise DataError unless `state` is what `state_dict()` returns: a known mode, and
        mean and scale of one shape (D,), finite, scale > 0; with "whiten", a known
        whitening and a finite projection (D, k), k <= D (k = D for ZCA)."""
        missing = sorted({"mode", "mean", "scale"} - state.keys())
        if missing:
            raise DataError(f"normalizer state lacks {missing}.")
        _check_mode(str(state["mode"]))
        mean, scale = np.asarray(state["mean"]), np.asarray(state["scale"])
        if mean.ndim != 1 or mean.shape != scale.shape or not (
                np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise DataError(f"normalizer state: mean {mean.shape} and scale {scale.shape} must "
                            "be finite vectors of one length, scale > 0.")
        if ("whiten" in state) != ("projection" in state):
            raise DataError("normalizer state: 'whiten' and 'projection' go together.")
        if "whiten" not in state:
            return
        whiten = _check_whiten(str(state["whiten"]))
        projection, d = np.asarray(state["projection"]), len(mean)
        k = projection.shape[1] if projection.ndim == 2 else -1
        if (whiten == "none" or projection.ndim != 2 or projection.shape[0] != d
                or not 1 <= k <= d or (whiten == "zca" and k != d)
                or not np.all(np.isfinite(projection))):
            raise DataError(f"normalizer state: a {whiten} projection {projection.shape} must "
                            f"be finite, ({d}, k) with 1 <= k <= {d} ({d} for zca).")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore mode, mean, scale and any whitening from `state_dict()` output (checked
        first). `components` and `eps` act in `fit` only: the projection carries them."""
        self.check_state_dict(state)
        self.mode = _check_mode(str(state["mode"]))
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.scale = np.array(state["scale"], dtype=np.float64)
        self._cast = {}
        if "whiten" in state:
            self.whiten = str(state["whiten"])
            self.projection = np.array(state["projection"], dtype=np.float64)
        else:
            self.whiten, self.projection = "none", None
