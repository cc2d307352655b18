"""The fused training step equals the reference step.

`train.step` lets the GEMM that computes a weight's gradient accumulate it into the
optimizer's state (`Optimizer.sinks`, `Linear.backward(dout, into=...)`, `blas.gemm_tn`);
`fused=False` is the reference: every layer's plain backward, every gradient materialized,
then the optimizer's pass. In float64 both must move every parameter, velocity and moment
the same way (relative 1e-10) for every layer type, activation, norm, loss and optimizer,
with and without the L2 term, from the first step (zero state) on.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlp.core import blas, optim
from mlp.core.layers import ACTIVATIONS
from mlp.core.model import MLP
from mlp.training import trainer as train

D, C, N = 14, 5, 12


def _net(activation: str, norm: str | None, loss: str, reg: float, dropout: float,
         dtype: str = "float64") -> MLP:
    return MLP(D, (9, 7), C, activation=activation, norm=norm, loss=loss, reg=reg,
               dropout=dropout, dtype=dtype, seed=3)


def _run(fused: bool, activation: str, norm: str | None, loss: str, reg: float,
         dropout: float, name: str, steps: int = 3, dtype: str = "float64"
         ) -> tuple[dict, dict, dict, list[float]]:
    """(parameter moves, optimizer state, buffers, losses) after `steps` steps."""
    model = _net(activation, norm, loss, reg, dropout, dtype)
    start = {k: p.copy() for k, p in model.params.items()}
    optimizer = optim.make_optimizer(name, model.params)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(steps):
        X = rng.standard_normal((N, D)).astype(dtype)
        y = rng.integers(0, C, N)
        loss, _ = train.step(model, optimizer, X, y, lr=0.05 * (i + 1), fused=fused)
        losses.append(loss)
    moves = {k: model.params[k] - start[k] for k in start}
    return moves, optimizer.state_dict(), dict(model.buffers), losses


def _assert_same(got: dict, want: dict, what: str) -> None:
    # Relative 1e-10; coordinates whose value is rounding noise (below 1e-9 of the largest:
    # e.g. the bias before a batch norm, whose gradient is 0 up to 1e-18) compare absolutely.
    scale = max((float(np.max(np.abs(v))) for v in want.values() if np.size(v)), default=0.0)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-9 * scale,
                                   err_msg=f"{what} {key}")


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_the_fused_step_moves_everything_as_the_reference_step(name: str, activation: str,
                                                               norm: str | None):
    # Each case also varies what the parametrization does not: the loss, L2 and dropout.
    cases = [("softmax", 1e-3, 0.0), ("svm", 0.0, 0.3)]
    for loss, reg, dropout in cases:
        fused = _run(True, activation, norm, loss, reg, dropout, name)
        reference = _run(False, activation, norm, loss, reg, dropout, name)
        what = f"{name} {activation} {norm} {loss} reg={reg} dropout={dropout}:"
        _assert_same(fused[0], reference[0], f"{what} move of")
        _assert_same(fused[1], reference[1], f"{what} optimizer state")
        _assert_same(fused[2], reference[2], f"{what} buffer")
        np.testing.assert_allclose(fused[3], reference[3], rtol=1e-12, err_msg=f"{what} loss")


@pytest.mark.parametrize("name,fuses", [("sgd", True), ("momentum", True), ("nesterov", False),
                                        ("rmsprop", False), ("adam", False)])
def test_sgd_and_momentum_take_the_weight_gradients_from_the_gemm(name: str, fuses: bool):
    model = _net("relu", None, "softmax", 1e-3, 0.0)
    optimizer = optim.make_optimizer(name, model.params)
    linear = optimizer.sinks(model.params, model.linear_names(), 0.1, model.l2_coefficients())
    assert sorted(linear) == (sorted(model.linear_names()) if fuses else [])  # W and b
    sinks = optimizer.sinks(model.params, model.weight_names(), 0.1, model.l2_coefficients())
    assert sorted(sinks) == (sorted(model.weight_names()) if fuses else [])
    if fuses:  # the gradient arrays of the weights are not written: the GEMM went elsewhere
        stale = {k: layer.grads[key].copy()
                 for k, (layer, key) in model._param_layers.items() if k in sinks}
        rng = np.random.default_rng(1)
        model.backprop(rng.standard_normal((N, D)), rng.integers(0, C, N), into=sinks)
        for k, (layer, key) in model._param_layers.items():
            if k in sinks:
                np.testing.assert_array_equal(layer.grads[key], stale[k])


def test_the_fused_float32_step_is_the_reference_step_to_float32_rounding():
    fused = _run(True, "relu", "batch", "softmax", 5e-4, 0.0, "momentum", dtype="float32")
    reference = _run(False, "relu", "batch", "softmax", 5e-4, 0.0, "momentum",
                     dtype="float32")
    scale = max(float(np.max(np.abs(move))) for move in reference[0].values())
    for key in reference[0]:  # the bias before the norm moves by float32 noise only
        np.testing.assert_allclose(fused[0][key], reference[0][key], rtol=1e-4,
                                   atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.1, 0.9), (2.0, 1.0)])
def test_gemm_tn_computes_alpha_at_b_plus_beta_c(dtype: type, alpha: float, beta: float):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((33, 20)).astype(dtype), rng.standard_normal((33, 7)).astype(dtype)
    c = rng.standard_normal((20, 7)).astype(dtype)
    want = alpha * (a.astype(np.float64).T @ b) + beta * c.astype(np.float64)
    got = blas.gemm_tn(a, b, c, alpha, beta)
    assert got is c
    np.testing.assert_allclose(c, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_gemm_tn_takes_row_views_and_ignores_c_when_beta_is_0():
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((10, 12))
    a = wide[:, :8]  # rows of stride 12: a view the BLAS call reads in place
    b = rng.standard_normal((10, 3))
    c = np.full((8, 3), np.nan)
    blas.gemm_tn(a, b, c, 1.0, 0.0)
    np.testing.assert_allclose(c, a.T @ b, rtol=1e-12)
    with pytest.raises(ValueError, match="expected a"):
        blas.gemm_tn(a, b, np.zeros((3, 8)), 1.0, 0.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.gemm_tn(a, b, np.zeros((3, 8)).T, 1.0, 0.0)


def test_the_gemm_runs_in_numpys_own_blas_here():
    # The fused step is only fast when the call reaches NumPy's BLAS (one thread pool);
    # on this platform (NumPy's wheels bundle OpenBLAS) it must find it.
    assert blas.available(np.float32) and blas.available(np.float64)


def test_axpy_adds_in_place_and_checks_its_arrays():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x, y = rng.standard_normal(1000).astype(dtype), rng.standard_normal(1000).astype(dtype)
        want = y.astype(np.float64) - 0.5 * x
        assert blas.axpy(-0.5, x, y) is y
        np.testing.assert_allclose(y, want, rtol=1e-6)
    y = np.zeros(4)
    blas.axpy(2.0, np.ones(4, dtype=np.float32), y)  # mixed dtypes: the NumPy way
    np.testing.assert_array_equal(y, 2.0)
    with pytest.raises(ValueError, match="one shape"):
        blas.axpy(1.0, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.axpy(1.0, np.ones((4, 2)).T, np.ones((2, 4)))
