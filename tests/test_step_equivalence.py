"""The optimized training step computes what a plain implementation computes.

The reference below is the textbook MLP, written for clarity only: fresh arrays at every
operation, the loss and the backward pass spelled out layer by layer, the L2 gradient added
to the gradient and then the optimizer's formula on whole arrays. mlp-lab's step (reused
buffers, the activation gates with `out=`, the fused softmax backward, the L2 term folded
into the optimizer's chunked pass) must give the same loss, gradients and parameters in
float64, to a relative error below 1e-10, also over several steps and changing batch sizes
(a stale buffer would show there).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlp import elementwise
from mlp.model import MLP
from mlp.optim import make_optimizer

TOL = 1e-10
D, C = 20, 5


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-300))


# -- the reference ---------------------------------------------------------------------------

def act_forward(name: str, z: np.ndarray, slope: float = 0.01, alpha: float = 1.0):
    if name == "relu":
        return np.maximum(z, 0)
    if name == "leaky_relu":
        return np.where(z > 0, z, slope * z)
    if name == "elu":
        return np.where(z > 0, z, alpha * (np.exp(np.minimum(z, 0)) - 1))
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    return np.tanh(z)


def act_grad(name: str, z: np.ndarray, a: np.ndarray, slope: float = 0.01, alpha: float = 1.0):
    if name == "relu":
        return (z > 0).astype(float)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, slope)
    if name == "elu":
        return np.where(z > 0, 1.0, a + alpha)
    if name == "sigmoid":
        return a * (1 - a)
    return 1 - a ** 2


def reference_loss_and_grads(params: dict, X: np.ndarray, y: np.ndarray, activation: str,
                             loss: str, reg: float, depth: int, pieces: int = 2):
    """Loss and gradients of {affine - activation} x depth - affine - loss, + reg sum W^2."""
    h, cache = X, []
    for i in range(1, depth + 1):
        z = h @ params[f"W{i}"] + params[f"b{i}"]
        if activation == "maxout":
            zp = z.reshape(len(z), -1, pieces)
            a = zp.max(axis=2)
            cache.append((h, z, zp.argmax(axis=2)))
        else:
            a = act_forward(activation, z)
            cache.append((h, z, a))
        h = a
    L = depth + 1
    scores = h @ params[f"W{L}"] + params[f"b{L}"]
    n, rows = len(y), np.arange(len(y))
    if loss == "softmax":
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        data_loss = -np.mean(np.log(p[rows, y]))
        dscores = p.copy()
        dscores[rows, y] -= 1
        dscores /= n
    else:
        margins = np.maximum(0, scores - scores[rows, y][:, None] + 1)
        margins[rows, y] = 0
        data_loss = margins.sum() / n
        active = (margins > 0).astype(float)
        active[rows, y] = -active.sum(axis=1)
        dscores = active / n
    weights = [k for k in params if k.startswith("W")]
    total = data_loss + reg * sum(np.sum(params[k] ** 2) for k in weights)
    grads = {f"W{L}": h.T @ dscores, f"b{L}": dscores.sum(axis=0)}
    dh = dscores @ params[f"W{L}"].T
    for i in range(depth, 0, -1):
        h_in, z, extra = cache[i - 1]
        if activation == "maxout":
            dz = np.zeros((len(z), z.shape[1] // pieces, pieces))
            np.put_along_axis(dz, extra[..., None], dh[..., None], axis=2)
            dz = dz.reshape(z.shape)
        else:
            dz = dh * act_grad(activation, z, extra)
        grads[f"W{i}"] = h_in.T @ dz
        grads[f"b{i}"] = dz.sum(axis=0)
        dh = dz @ params[f"W{i}"].T
    for k in weights:
        grads[k] = grads[k] + 2 * reg * params[k]
    return total, grads


def reference_update(name: str, p, g, state: dict, lr: float, t: int):
    """One update of cs231n's rules on whole arrays; returns the new p."""
    mu, d, b1, b2, eps = 0.9, 0.99, 0.9, 0.999, 1e-8
    if name == "sgd":
        return p - lr * g
    if name == "momentum":
        state["v"] = mu * state.get("v", 0 * p) - lr * g
        return p + state["v"]
    if name == "nesterov":
        v_prev = state.get("v", 0 * p)
        state["v"] = mu * v_prev - lr * g
        return p - mu * v_prev + (1 + mu) * state["v"]
    if name == "rmsprop":
        state["cache"] = d * state.get("cache", 0 * p) + (1 - d) * g ** 2
        return p - lr * g / (np.sqrt(state["cache"]) + eps)
    state["m"] = b1 * state.get("m", 0 * p) + (1 - b1) * g
    state["v"] = b2 * state.get("v", 0 * p) + (1 - b2) * g ** 2
    mhat, vhat = state["m"] / (1 - b1 ** t), state["v"] / (1 - b2 ** t)
    return p - lr * mhat / (np.sqrt(vhat) + eps)


# -- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("loss", ["softmax", "svm"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "sigmoid", "tanh",
                                        "maxout"])
def test_loss_and_grads_equal_the_reference(activation: str, loss: str, depth: int):
    model = MLP(D, [16, 12][:depth], C, activation=activation, loss=loss, reg=0.05,
                dtype="float64", seed=depth)
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((16, D)), rng.integers(0, C, 16)
    expected_loss, expected = reference_loss_and_grads(
        {k: v.copy() for k, v in model.params.items()}, X, y, activation, loss, 0.05, depth)
    for _ in range(2):  # the second call runs on the reused buffers of the first
        got_loss, grads = model.loss_and_grads(X, y)
        assert rel(got_loss, expected_loss) < TOL
        assert grads.keys() == expected.keys()
        for k in expected:
            assert rel(grads[k], expected[k]) < TOL, k


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "rmsprop", "adam"])
def test_training_steps_equal_the_reference(name: str, monkeypatch: pytest.MonkeyPatch):
    # chunks smaller than W1, so the optimizer's pass really works chunk by chunk
    monkeypatch.setattr(elementwise, "CHUNK", 100)
    model = MLP(D, [16, 12], C, reg=0.01, dtype="float64", seed=1)
    optimizer = make_optimizer(name, model.params)
    params = {k: v.copy() for k, v in model.params.items()}
    states: dict[str, dict] = {k: {} for k in params}
    rng = np.random.default_rng(3)
    for t, batch in enumerate([16, 16, 9, 16, 5], start=1):  # smaller batches in between
        X, y = rng.standard_normal((batch, D)), rng.integers(0, C, batch)
        # the lines of Trainer.fit
        loss, grads = model.data_loss_and_grads(X, y)
        loss += optimizer.step(model.params, grads, 1e-2, l2=model.l2_coefficients())

        expected_loss, expected = reference_loss_and_grads(params, X, y, "relu", "softmax",
                                                           0.01, 2)
        assert rel(loss, expected_loss) < TOL
        params = {k: reference_update(name, params[k], expected[k], states[k], 1e-2, t)
                  for k in params}
        model.scores(rng.standard_normal((7, D)))  # evaluation in between, other shapes
        for k in params:
            assert rel(model.params[k], params[k]) < TOL, (t, k)


def test_scores_returned_earlier_are_not_overwritten():
    model = MLP(D, [16, 12], C, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    X1, X2 = rng.standard_normal((8, D)), rng.standard_normal((8, D))
    first = model.scores(X1)
    kept = first.copy()
    model.scores(X2)
    model.loss_and_grads(X2, np.zeros(8, dtype=int))
    np.testing.assert_array_equal(first, kept)
