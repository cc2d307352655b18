"""mlp-lab: a NumPy multi-layer perceptron with hand-written backpropagation, trained on
CIFAR-10 and recorded in MLflow.

The packages, each importing only those below it (import-linter holds this, see
pyproject.toml):

    cli/       the console entry points (mlp-train, mlp-gradcheck, mlp-report, mlp-sync,
               mlp-reproduce), each a thin composition
    sweeps/    a sweep's parent run, skip/resume policy, report and figures, Optuna pruning
    tracking/  the record: the store and its URI, the metric sink, what a run logs
    config/    the one schema and the command-line check
    training/  the loop (`Trainer`), EMA, checkpoints, console lines, the memory budget
    data/      CIFAR-10 from the archive to a minibatch
    core/      the lecture in code: gates, layers, losses, the model, optimizers, the
               gradient check and the training step (NumPy and the standard library only)

The public face below is loaded on first use, so `import mlp` costs nothing and importing
the core never pulls in the data, the loop or MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "MLP": "mlp.core.model",
    "make_optimizer": "mlp.core.optim",
    "Schedule": "mlp.core.optim",
    "check_model": "mlp.core.gradcheck",
    "check_training_step": "mlp.core.gradcheck",
    "check_layer": "mlp.core.gradcheck",
    "numeric_gradient": "mlp.core.gradcheck",
    "rel_error": "mlp.core.gradcheck",
    "step": "mlp.core.step",
    "Trainer": "mlp.training.trainer",
    "TrainSettings": "mlp.training.trainer",
    "load_cifar10": "mlp.data",
    "split": "mlp.data",
    "Normalizer": "mlp.data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mlp' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
