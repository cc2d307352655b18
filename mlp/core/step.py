"""The training step: one forward/backward pass through the model and one update by the
optimizer. It is the one step the trainer runs, the benchmark times and the per-run
gradient check verifies (`gradcheck.check_training_step`), in its fused form (the
weights' gradients accumulated by the GEMMs into what the update rule changes) and in its
reference form (every gradient materialized)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mlp.core.model import MLP
from mlp.core.optim import Optimizer

Array = np.ndarray


def step(model: MLP, optimizer: Optimizer, X: Array, y: Array, lr: float, fused: bool = True,
         guard: Callable[[float], None] | None = None) -> tuple[float, dict[str, Array]]:
    """One training step of `model` by `optimizer` on a batch X (N, D), y (N,), at `lr`;
    returns the batch's loss (data + L2) and the data gradients. `guard` sees the data
    loss before the update ends (the trainer's divergence guard).

    Where the optimizer's rule allows it (`Optimizer.sinks`: SGD, momentum), the GEMM
    that computes a weight's gradient adds it straight into the array the rule updates
    (and the bias's sum, the bias's), and `optimizer.step` finishes those parameters;
    their entries of the returned grads are then stale. The other gradients are the
    model's own arrays (no copy: read once, by the optimizer's pass, before the next pass
    overwrites them). The L2 term is left to the optimizer, in the one pass it makes over
    the weights. `fused=False` is the reference path, every gradient materialized:
    `gradcheck.check_training_step` checks its gradients and that the fused step lands on
    the same parameters, `gradcheck.check_step_precision` that this step in float32 lands
    where the float64 reference step does.
    """
    l2 = model.l2_coefficients()
    sinks = optimizer.sinks(model.params, model.linear_names(), lr, l2) if fused else {}
    loss, grads = model.backprop(X, y, into=sinks)
    if guard is not None:
        guard(float(loss))
    loss += optimizer.step(model.params, grads, lr, l2=l2, fused=sinks.keys())
    return float(loss), grads
