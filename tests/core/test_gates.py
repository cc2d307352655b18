"""Gates and the computational graph: the worked examples of cs231n lecture 4."""

import tracemalloc
import warnings

import numpy as np
import pytest

from mlp.core import gates
from mlp.core.gates import Node
from mlp.core.gradcheck import numeric_gradient


def _example(start: str) -> dict:
    (values,) = [v for title, v in gates.lecture_examples().items() if title.startswith(start)]
    return values


def test_add_mul_circuit_lecture_example():
    assert _example("f = (x + y) z") == {"f": -12.0, "df/dx": -4.0, "df/dy": -4.0,
                                         "df/dz": 3.0}


@pytest.mark.parametrize("variant", ["gate by gate", "as one sigmoid gate"])
def test_sigmoid_circuit_lecture_example(variant):
    (values,) = [v for title, v in gates.lecture_examples().items()
                 if title.startswith("f = 1 / (1 + e^") and title.endswith(variant)]
    assert values["f"] == pytest.approx(0.73, abs=5e-3)
    assert np.round([values[f"df/dw{i}"] for i in range(3)], 2).tolist() == [-0.20, -0.39, 0.20]
    assert np.round([values[f"df/dx{i}"] for i in range(2)], 2).tolist() == [0.39, -0.59]


def test_sigmoid_gate_equals_elementary_circuit():
    one, elementary = (v for title, v in gates.lecture_examples().items()
                       if title.startswith("f = 1 / (1 + e^"))
    assert one.keys() == elementary.keys()
    np.testing.assert_allclose(list(one.values()), list(elementary.values()), rtol=0,
                               atol=1e-12)


def test_patterns_lecture_example():
    # add distributes (x y and max get 2), max routes (z wins, w gets 0), mul swaps
    assert _example("f = 2 (x y + max(z, w))") == {"f": -20.0, "df/dx": -8.0, "df/dy": 6.0,
                                                   "df/dz": 2.0, "df/dw": 0.0}


def test_squared_norm_of_matrix_vector_product_lecture_example():
    values = _example("f = ||W x||^2")
    assert values["f"] == pytest.approx(0.116, abs=1e-12)
    np.testing.assert_allclose(values["df/dW"], [[0.088, 0.176], [0.104, 0.208]], atol=1e-12)
    np.testing.assert_allclose(values["df/dx"], [-0.112, 0.636], atol=1e-12)


def test_the_command_line_prints_every_example(capsys: pytest.CaptureFixture):
    gates.main()
    printed = capsys.readouterr().out
    for title in gates.lecture_examples():
        assert title in printed
    assert "df/dw0  -0.1966" in printed and "f       -20" in printed


def test_negation_operator_is_scale_minus_one():
    a = Node(3.0)
    f = -a
    f.backward()
    assert f.data == -3.0
    assert a.grad == -1.0


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
def test_backward_is_upstream_times_the_derivative(gate):
    # Against finite differences of forward, not against local_grad (which backward is
    # built from): a wrong backward, or a wrong override of it, fails here. Both ways of
    # calling it are checked, a new array and the training loop's reused one.
    rng = np.random.default_rng(2)
    x = rng.uniform(0.2, 2.0, size=(5, 3)) * rng.choice([-1.0, 1.0], size=(5, 3))
    dout = rng.standard_normal(x.shape)
    h = 1e-6
    expected = dout * (gate.forward(x + h) - gate.forward(x - h)) / (2 * h)
    out = gate.forward(x)
    np.testing.assert_allclose(gate.backward(dout, x, out), expected, rtol=1e-7, atol=1e-9)
    dx = np.empty_like(x)
    assert gate.backward(dout, x, out, dx=dx) is dx
    np.testing.assert_allclose(dx, expected, rtol=1e-7, atol=1e-9)


def test_matmul_backward_writes_into_given_arrays_and_can_skip_da():
    rng = np.random.default_rng(7)
    a, b, dout = (rng.standard_normal(s) for s in ((4, 3), (3, 5), (4, 5)))
    da, db = np.empty((4, 3)), np.empty((3, 5))
    got_da, got_db = gates.matmul_backward(a, b, dout, da=da, db=db)
    assert got_da is da and got_db is db
    np.testing.assert_allclose(da, dout @ b.T, rtol=1e-14)
    np.testing.assert_allclose(db, a.T @ dout, rtol=1e-14)
    assert gates.matmul_backward(a, b, dout, need_da=False)[0] is None


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
