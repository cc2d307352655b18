"""Gates and the computational graph: the worked examples of cs231n lecture 4."""

import tracemalloc
import warnings

import numpy as np
import pytest

from mlp import gates
from mlp.gates import Node
from mlp.gradcheck import numeric_gradient


def test_add_mul_circuit_lecture_example():
    # f = (x + y) * z at x=-2, y=5, z=-4
    x, y, z = Node(-2.0), Node(5.0), Node(-4.0)
    f = gates.mul(gates.add(x, y), z)
    f.backward()
    assert f.data == -12.0
    assert (x.grad, y.grad, z.grad) == (-4.0, -4.0, 3.0)


def _sigmoid_circuit(w: list[Node], x: list[Node], one_gate: bool) -> Node:
    dot = gates.add(gates.add(gates.mul(w[0], x[0]), gates.mul(w[1], x[1])), w[2])
    if one_gate:
        return gates.sigmoid(dot)
    neg = gates.apply(gates.Scale(-1.0), dot)
    return gates.reciprocal(gates.apply(gates.Shift(1.0), gates.exp(neg)))


@pytest.mark.parametrize("one_gate", [False, True], ids=["elementary", "sigmoid_gate"])
def test_sigmoid_circuit_lecture_example(one_gate):
    w = [Node(2.0), Node(-3.0), Node(-3.0)]
    x = [Node(-1.0), Node(-2.0)]
    f = _sigmoid_circuit(w, x, one_gate)
    f.backward()
    assert f.data == pytest.approx(0.73, abs=5e-3)
    assert np.round([n.grad for n in w], 2).tolist() == [-0.20, -0.39, 0.20]
    assert np.round([n.grad for n in x], 2).tolist() == [0.39, -0.59]


def test_sigmoid_gate_equals_elementary_circuit():
    grads = []
    for one_gate in (False, True):
        w = [Node(2.0), Node(-3.0), Node(-3.0)]
        x = [Node(-1.0), Node(-2.0)]
        f = _sigmoid_circuit(w, x, one_gate)
        f.backward()
        grads.append(np.array([f.data] + [n.grad for n in w + x]))
    assert np.allclose(grads[0], grads[1], rtol=0, atol=1e-12)


def test_negation_operator_is_scale_minus_one():
    a = Node(3.0)
    f = -a
    f.backward()
    assert f.data == -3.0
    assert a.grad == -1.0


def test_squared_norm_of_matrix_vector_product_lecture_example():
    W = Node(np.array([[0.1, 0.5], [-0.3, 0.8]]))
    x = Node(np.array([0.2, 0.4]))
    f = gates.sqnorm(W @ x)
    f.backward()
    assert f.data == pytest.approx(0.116, abs=1e-12)
    np.testing.assert_allclose(W.grad, [[0.088, 0.176], [0.104, 0.208]], atol=1e-12)
    np.testing.assert_allclose(x.grad, [-0.112, 0.636], atol=1e-12)


def test_matmul_sqnorm_batch_of_columns_matches_finite_differences():
    rng = np.random.default_rng(0)
    W0, x0 = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    W, x = Node(W0.copy()), Node(x0.copy())
    gates.sqnorm(gates.matmul(W, x)).backward()

    def f():
        return np.sum((W0 @ x0) ** 2)

    for arr, grad in ((W0, W.grad), (x0, x.grad)):
        numeric, _ = numeric_gradient(f, arr, h=1e-5)
        np.testing.assert_allclose(grad.reshape(-1), numeric, rtol=1e-7, atol=1e-9)


def test_add_gate_distributes_upstream_gradient():
    a, b = Node(2.0), Node(3.0)
    gates.mul(gates.add(a, b), 7.0).backward()
    assert a.grad == 7.0
    assert b.grad == 7.0


def test_mul_gate_swaps_inputs():
    a, b = Node(2.0), Node(3.0)
    gates.mul(gates.mul(a, b), 5.0).backward()
    assert a.grad == 5.0 * 3.0
    assert b.grad == 5.0 * 2.0


def test_max_gate_routes_to_larger_input_only():
    a, b = Node(np.array([1.0, 5.0, 2.0])), Node(np.array([3.0, 2.0, 2.0]))
    gates.sqnorm(gates.maximum(a, b)).backward()
    # upstream is 2 * max = [6, 10, 4]; the tie (last entry) goes to a
    np.testing.assert_array_equal(a.grad, [0.0, 10.0, 4.0])
    np.testing.assert_array_equal(b.grad, [6.0, 0.0, 0.0])


def test_node_used_twice_gets_sum_of_gradients():
    x = Node(3.0)
    (x * x).backward()
    assert x.grad == 6.0

    x, y = Node(3.0), Node(2.0)
    ((x + y) * x).backward()  # f = x^2 + x y
    assert x.grad == 2 * 3.0 + 2.0
    assert y.grad == 3.0


def test_backward_twice_does_not_accumulate():
    x, y = Node(3.0), Node(2.0)
    f = (x + y) * x
    f.backward()
    f.backward()
    assert x.grad == 8.0
    assert y.grad == 3.0


ELEMENTWISE_GATES = [
    gates.Scale(-2.5),
    gates.Shift(1.5),
    gates.Exp(),
    gates.Reciprocal(),
    gates.Sigmoid(),
    gates.Tanh(),
    gates.ReLU(),
    gates.LeakyReLU(0.1),
    gates.ELU(0.7),
]


@pytest.mark.parametrize("gate", ELEMENTWISE_GATES, ids=repr)
def test_local_grad_matches_centered_difference(gate):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 2.0, size=(6, 7)) * rng.choice([-1.0, 1.0], size=(6, 7))
    h = 1e-5
    numeric = (gate.forward(x + h) - gate.forward(x - h)) / (2 * h)
    np.testing.assert_allclose(gate.local_grad(x, gate.forward(x)), numeric,
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gate", ELEMENTWISE_GATES, ids=repr)
def test_backward_is_upstream_times_local_grad(gate):
    rng = np.random.default_rng(2)
    x = rng.uniform(0.2, 2.0, size=(5, 3)) * rng.choice([-1.0, 1.0], size=(5, 3))
    dout = rng.standard_normal(x.shape)
    out = gate.forward(x)
    np.testing.assert_allclose(gate.backward(dout, x, out), dout * gate.local_grad(x, out),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("gate", [gates.Sigmoid(), gates.ReLU(), gates.Tanh()], ids=repr)
def test_wide_elementwise_gate_backward_never_builds_jacobian(gate):
    x = np.random.default_rng(3).standard_normal((100, 4096))
    dout = np.ones_like(x)
    tracemalloc.start()
    try:
        out = gate.forward(x)
        dx = gate.backward(dout, x, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dx.shape == x.shape
    # A Jacobian would be 100 * 4096 * 4096 * 8 bytes = 13 GB; the input is 3.3 MB.
    assert peak < 10 * x.nbytes


def test_wide_gate_through_graph_never_builds_jacobian():
    x = Node(np.random.default_rng(4).standard_normal((100, 4096)))
    tracemalloc.start()
    try:
        gates.apply(gates.Tanh(), x).backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.grad.shape == (100, 4096)
    assert peak < 10 * x.data.nbytes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gate", [gates.Sigmoid(), gates.Tanh(), gates.ELU()], ids=repr)
def test_saturating_gates_are_stable_at_plus_minus_1000(gate, dtype):
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0], dtype=dtype)
    # Underflow of e^-1000 to 0 is benign and ignored (NumPy's default); overflow,
    # invalid operations and divisions by zero must not happen.
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise",
                                                 divide="raise", under="ignore"):
        warnings.simplefilter("error")
        out = gate.forward(x)
        grad = gate.local_grad(x, out)
    assert out.dtype == dtype
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(grad))
    lo, hi = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "elu": (-1.0, 1000.0)}[gate.name]
    assert out[0] == pytest.approx(lo)
    assert out[-1] == pytest.approx(hi)
