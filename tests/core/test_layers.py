"""Layers: Linear, the activations and Maxout, checked against finite differences."""

import numpy as np
import pytest

from mlp.core import layers
from mlp.core.gradcheck import DEFAULT_H, check_layer, numeric_gradient

N, D, H = 5, 6, 4
GATE_NAMES = ("relu", "leaky_relu", "elu", "sigmoid", "tanh")


def _linear(seed: int = 0, d: int = D, h: int = H) -> layers.Linear:
    rng = np.random.default_rng(seed)
    return layers.Linear(rng.standard_normal((d, h)), rng.standard_normal(h))


def _maxout(pieces: int, seed: int = 0) -> layers.Maxout:
    rng = np.random.default_rng(seed)
    return layers.Maxout(rng.standard_normal((D, H * pieces)), rng.standard_normal(H * pieces),
                         pieces)


def _x(shape: tuple[int, ...] = (N, D), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _assert_good(report) -> None:
    assert report.passed, str(report)
    assert report.max_rel_error < 1e-7, str(report)


def test_linear_passes_gradient_check():
    report = check_layer(_linear(), _x())
    _assert_good(report)
    assert [r.name for r in report.rows] == ["x", "W", "b"]


@pytest.mark.parametrize("name", GATE_NAMES)
def test_activation_passes_gradient_check(name):
    report = check_layer(layers.Activation(layers.activation_gate(name)), _x((N, H)))
    _assert_good(report)
    assert report.kinks == 0


@pytest.mark.parametrize("pieces", [2, 3])
def test_maxout_passes_gradient_check(pieces):
    report = check_layer(_maxout(pieces), _x())
    _assert_good(report)


def test_linear_backward_shapes():
    layer = _linear()
    out = layer.forward(_x())
    dx = layer.backward(np.ones_like(out))
    assert out.shape == (N, H)
    assert dx.shape == (N, D)
    assert layer.grads["W"].shape == (D, H)
    assert layer.grads["b"].shape == (H,)


@pytest.mark.parametrize("name", GATE_NAMES)
def test_activation_backward_shapes(name):
    layer = layers.Activation(layers.activation_gate(name))
    out = layer.forward(_x((N, H)))
    assert out.shape == (N, H)
    assert layer.backward(np.ones_like(out)).shape == (N, H)


@pytest.mark.parametrize("pieces", [2, 3])
def test_maxout_backward_shapes(pieces):
    layer = _maxout(pieces)
    out = layer.forward(_x())
    dx = layer.backward(np.ones_like(out))
    assert out.shape == (N, H)
    assert dx.shape == (N, D)
    assert layer.grads["W"].shape == (D, H * pieces)
    assert layer.grads["b"].shape == (H * pieces,)


def _per_sample(layer: layers.Layer, x: np.ndarray, dout: np.ndarray):
    """Forward/backward one sample at a time: outputs, dx rows and summed param grads."""
    outs, dxs = [], []
    grads = {k: np.zeros_like(p) for k, p in layer.params.items()}
    for i in range(len(x)):
        outs.append(layer.forward(x[i:i + 1])[0])
        dxs.append(layer.backward(dout[i:i + 1])[0])
        for k in grads:
            grads[k] += layer.grads[k]
    return np.array(outs), np.array(dxs), grads


@pytest.mark.parametrize("make", [
    _linear,
    lambda: layers.Activation(layers.activation_gate("elu")),
    lambda: _maxout(3),
], ids=["linear", "elu", "maxout3"])
def test_batch_forward_backward_equals_per_sample_loop(make):
    layer = make()
    width = D if layer.params else H
    x = _x((N, width))
    out = layer.forward(x)
    dout = np.random.default_rng(7).standard_normal(out.shape)
    dx = layer.backward(dout)
    grads = {k: g.copy() for k, g in layer.grads.items()}

    outs, dxs, loop_grads = _per_sample(layer, x, dout)
    np.testing.assert_allclose(out, outs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dxs, rtol=1e-12, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], loop_grads[k], rtol=1e-12, atol=1e-12)


def test_relu_kinks_at_and_within_h_of_zero_are_detected_and_excluded():
    x = _x((N, H))
    x[x > 0] += 0.1  # keep every other input well away from the kink
    x[x <= 0] -= 0.1
    kinked = [(0, 0), (1, 2), (2, 1), (4, 3)]
    for (i, j), v in zip(kinked, [0.0, 0.5 * DEFAULT_H, -0.3 * DEFAULT_H, 0.9 * DEFAULT_H],
                         strict=True):
        x[i, j] = v
    layer = layers.Activation(layers.activation_gate("relu"))
    report = check_layer(layer, x)
    assert report.kinks == len(kinked)
    _assert_good(report)  # the kinked coordinates would read ~0.5: they must be excluded

    xn = x.astype(np.longdouble)
    layer.forward(xn)
    dout = np.ones_like(xn)

    def f():
        return np.sum(layer.forward(xn) * dout)

    _, flags = numeric_gradient(f, xn, kink_state=lambda: [layer.kink_state()])
    assert sorted(np.flatnonzero(flags)) == sorted(i * H + j for i, j in kinked)


def test_check_layer_rejects_float32_parameters():
    layer = layers.Linear(np.zeros((D, H), np.float32), np.zeros(H, np.float32))
    with pytest.raises(ValueError, match="float64"):
        check_layer(layer, _x())


def test_maxout_rejects_columns_not_a_multiple_of_pieces():
    with pytest.raises(ValueError, match="multiple of 3"):
        layers.Maxout(np.zeros((D, 7)), np.zeros(7), 3)


@pytest.mark.parametrize("name", ["maxout", "swish"])
def test_activation_gate_rejects_names_without_a_gate(name):
    with pytest.raises(ValueError, match=f"activation='{name}'"):
        layers.activation_gate(name)
