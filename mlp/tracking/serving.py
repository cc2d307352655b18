"""The served model: raw pixels in, class probabilities out.

A model logged by mlp-lab is an MLflow pyfunc model whose `loader_module` is this module
and which carries the `mlp` package as its code (`code_paths`), so it loads, predicts
and serves (`mlflow models serve -m models:/<name>@champion --env-manager local`) where
mlp-lab is not installed: its whole import chain (this module, `mlp.core`, `mlp.data`,
`mlp.training.inference`) needs NumPy and the standard library only. Its data directory
holds the trained parameters (`model.npz`), the training split's normalizer
(`normalizer.npz`, with its whitening projection when the run whitened), the class names
(`classes.json`) and the views the run's test averaged its scores over (`scoring.json`,
`inference.Scoring`: `{"flip": true, "shift": 3}`; a model logged before the file
existed scores images as they are). It scores as the run's test did
(`mlp.training.inference.scores`), so it is as accurate as the run recorded.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.training import inference

Array = np.ndarray

SIGNATURE_DTYPE = np.float64
"""The dtype of the model's input signature, a tensor (-1, 3072). The scoring server casts
a request's JSON numbers to it: whole numbers and floats on the 0-255 scale arrive as
they were sent, and floats on a 0-1 scale arrive as such and are refused here (a uint8
signature would truncate them to 0 and answer 200). MLflow checks a tensor's dtype
strictly, so in Python `load_model(...).predict` takes float64 arrays
(`X.astype(np.float64)` for uint8 images)."""
SCALE = 255
SCORING_FILE = "scoring.json"


def softmax(scores: Array) -> Array:
    """Class probabilities (N, C) from scores (N, C), computed stably in float64."""
    shifted = np.asarray(scores, dtype=np.float64) - np.max(scores, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class PixelClassifier:
    """What `mlflow.pyfunc.load_model` returns for an mlp-lab model."""

    def __init__(self, model: MLP, normalizer: Normalizer, classes: list[str],
                 scoring: inference.Scoring = inference.PLAIN) -> None:
        self.model, self.normalizer, self.classes = model, normalizer, classes
        self.scoring = scoring

    def predict(self, model_input: Any, params: dict | None = None) -> Array:
        """model_input: (N, 3072) pixels, uint8 or floats on the 0-255 scale (an array, a
        list of rows or a DataFrame); returns (N, 10) class probabilities (float64, each
        row sums to 1), columns in the order of `classes`. Raises ValueError (the scoring
        server answers 400 with it) for another shape, values outside 0-255, and a float
        batch whose largest value is at most 1: images on a 0-1 scale, which would be
        classified as nearly black."""
        X = np.asarray(getattr(model_input, "values", model_input))
        if X.ndim != 2 or X.shape[1] != self.normalizer.in_dim:
            raise ValueError(f"input has shape {X.shape}: expected (N, "
                             f"{self.normalizer.in_dim}) pixel values on the 0-{SCALE} scale")
        if X.dtype.kind not in "uif":
            raise ValueError(f"input has dtype {X.dtype}: expected pixel values, uint8 or "
                             f"floats on the 0-{SCALE} scale")
        if X.size and not (np.isfinite(X).all() and X.min() >= 0 and X.max() <= SCALE):
            raise ValueError(f"pixel values range over [{X.min()}, {X.max()}]: expected "
                             f"uint8 or floats on the 0-{SCALE} scale")
        if X.dtype.kind == "f" and X.size and X.max() <= 1:
            raise ValueError(f"pixel values are all within [0, 1]: expected the 0-{SCALE} "
                             f"scale (multiply images on a 0-1 scale by {SCALE})")
        return softmax(inference.scores(self.model, self.normalizer, X, np.float64,
                                        self.scoring))


def save(directory: Path, model: MLP, normalizer: Normalizer, classes: tuple[str, ...],
         scoring: inference.Scoring = inference.PLAIN) -> Path:
    """Write the files `_load_pyfunc` reads into `directory` (created) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / "model.npz")
    np.savez(directory / "normalizer.npz", **normalizer.state_dict())
    (directory / "classes.json").write_text(json.dumps(list(classes)))
    (directory / SCORING_FILE).write_text(json.dumps(asdict(scoring)))
    return directory


def _load_pyfunc(data_path: str) -> PixelClassifier:
    path = Path(data_path)
    normalizer = Normalizer()
    with np.load(path / "normalizer.npz", allow_pickle=False) as f:
        normalizer.load_state_dict({k: f[k] for k in f.files})
    classes = json.loads((path / "classes.json").read_text())
    scoring = path / SCORING_FILE  # what `save` wrote, field for field
    views = (inference.Scoring(**json.loads(scoring.read_text())) if scoring.exists()
             else inference.PLAIN)
    return PixelClassifier(MLP.load(path / "model.npz"), normalizer, classes, views)
