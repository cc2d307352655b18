"""The training step in the dtype that trains: float32, checked against float64.

The gradient checks run in float64. `gradcheck.check_step_precision` runs the step as the
trainer runs it (`mlp.core.step.step`, fused where the optimizer allows, float32 arrays)
and, before each step, the float64 reference step (`fused=False`) from the same
parameters, optimizer state and batch, and compares every parameter's move within
`gradcheck.step_tolerance`, 8 * sqrt(chain) * eps(float32), chain the longest chain of
sums in the step, or 8 times what summing the batch in another order changes
(`gradcheck.order_spread`), plus what storing the parameter in float32 rounds
(`gradcheck.storage_share`).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlp.core import gradcheck, optim
from mlp.core.gradcheck import (
    check_step_precision,
    check_step_precision_clear,
    order_spread,
    step_tolerance,
    storage_share,
)
from mlp.core.layers import ACTIVATIONS
from mlp.core.model import MLP
from mlp.training import trainer as train

EPS32 = float(np.finfo(np.float32).eps)


def _batch(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d), dtype=np.float32), rng.integers(0, classes, n)


def _check_all(name: str, activation: str, norm: str | None) -> None:
    for loss, reg, dropout in (("softmax", 1e-3, 0.0), ("svm", 0.0, 0.3)):
        model = MLP(40, (24, 16), 6, activation=activation, norm=norm, loss=loss, reg=reg,
                    dropout=dropout, seed=1)
        check = check_step_precision(model, name, *_batch(32, 40, 6), steps=3)
        assert check.kinks == 0, check  # these seeds put no unit within rounding of a kink
        assert check.passed, check
        assert check.dtype == "float32"
        assert 0 < check.max_rel_error  # float32 really ran: the moves are not bit-equal
        assert check.loss_rel_error < check.tol


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_the_float32_step_lands_where_the_float64_reference_step_lands(
        name: str, activation: str, norm: str | None):
    _check_all(name, activation, norm)


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_the_adaptive_rules_float32_step_lands_where_the_float64_step_lands(
        name: str, norm: str | None):
    # Not every activation: RMSProp and Adam divide by the gradient's own size, so an entry
    # whose gradient is rounding-size (saturated units) moves by what its rounding says, in
    # either dtype (`check_step_precision`); with ReLU the gradients are not that small.
    _check_all(name, "relu", norm)


@pytest.mark.parametrize("hidden", [(100,), (512,) * 4, (1024, 1024)])
def test_the_benchmarks_nets_at_batch_256_are_within_tolerance(hidden: tuple[int, ...]):
    # The shapes that train (BLAS's blocked, threaded kernels), SGD momentum with L2.
    model = MLP(3072, hidden, 10, reg=5e-4, seed=0)
    check = check_step_precision(model, "momentum", *_batch(256, 3072, 10), lr=1e-2)
    assert check.passed, check
    # measured 9.4e-6, 2.5e-5, 1.8e-5 against 5.6e-5, 7.9e-5, 7.6e-5: 3 to 6 times below
    assert check.max_rel_error < check.tol / 2, check


def test_the_tolerance_is_derived_from_float32_eps_and_the_sizes():
    model = MLP(3072, (100,), 10)
    chain = 3072 + 100 + 10 + 10 + 256  # fan-ins, fan-outs but the first's, classes, batch
    assert step_tolerance(model, 256, 2) == pytest.approx(2 * 8 * np.sqrt(chain) * EPS32)
    assert step_tolerance(model.copy("float64"), 256, 2) == pytest.approx(
        2 * 8 * np.sqrt(chain) * float(np.finfo(np.float64).eps))


def test_a_batch_norms_gamma_is_judged_with_what_float32_storage_rounds():
    # best_mlp's net and step: gamma sits at 1, where float32's numbers are 1.2e-7 apart,
    # and moves by ~1e-4 a step. Its gradient in float32 is as exact as any other; its
    # stored move is off by more than the arithmetic's tolerance (measured 1.6e-4, 5.7e-5).
    model = MLP(256, (1024, 1024), 10, norm="batch", reg=5e-4, label_smoothing=0.1, seed=0)
    X, y = _batch(256, 256, 10)
    grads = [net.loss_and_grads(X.astype(net.dtype), y)[1]["gamma1"]
             for net in (model, model.copy("float64"))]
    assert np.linalg.norm(grads[0] - grads[1]) < step_tolerance(model, 256, 1) / 10 * (
        np.linalg.norm(grads[1]))
    check = check_step_precision(model, "momentum", X, y, lr=0.05)
    assert check.errors["gamma1"] > check.tol  # the arithmetic's share alone would fail it
    assert check.passed, check
    assert check.tol_of("W1") < check.tol_of("gamma1") < 20 * check.tol


def test_the_storage_share_is_half_a_spacing_for_each_of_two_writes_a_step():
    ones = np.ones(4, dtype=np.float32)
    assert storage_share(ones, ones, 2) == pytest.approx(2 * 2 * EPS32)  # 4 entries: norm 2
    assert storage_share(ones, 2 * ones, 1) == pytest.approx(2 * 2 * EPS32)  # spacing at 2
    assert storage_share(ones.astype(np.float64), ones, 1) == pytest.approx(
        2 * float(np.finfo(np.float64).eps))


def test_a_gamma_moved_one_percent_off_in_float32_fails(monkeypatch):
    # The storage share does not hide a wrong step: gamma's tolerance is ~1e-3 of its move.
    model = MLP(256, (1024, 1024), 10, norm="batch", reg=5e-4, seed=0)
    real = optim.Momentum._update

    def off(self, p, g, *state, lr, scratch):
        scale = 1.01 if p.dtype == np.float32 else 1.0  # the unfused params: the BNs'
        real(self, p, g * scale, *state, lr=lr, scratch=scratch)

    monkeypatch.setattr(optim.Momentum, "_update", off)
    check = check_step_precision(model, "momentum", *_batch(256, 256, 10), lr=0.05)
    assert not check.passed
    assert {k for k, e in check.errors.items() if e >= check.tol_of(k)} == {
        "gamma1", "beta1", "gamma2", "beta2"}


def test_rmsprop_on_a_batch_norm_net_is_judged_against_its_own_rounding():
    # RMSProp divides each gradient entry by its own size: an entry that cancels over the
    # batch moves by its rounding. Measured here: W2 at 1.6 tol (the arithmetic's tolerance
    # alone failed it), its own tolerance 8.9 tol from another order of the batch.
    model = MLP(256, (256, 256), 10, norm="batch", activation="tanh", reg=5e-4, seed=0)
    X, y = _batch(256, 256, 10)
    check = check_step_precision(model, "rmsprop", X, y, lr=0.05)
    assert check.kinks == 0 and max(check.errors.values()) > check.tol
    assert check.passed, check
    assert max(check.tols.values()) < 30 * check.tol, check  # a spread, not a free pass


def test_a_float32_rmsprop_step_one_percent_off_fails(monkeypatch):
    model = MLP(256, (256, 256), 10, norm="batch", activation="tanh", reg=5e-4, seed=0)
    real = optim.RMSProp._update

    def off(self, p, g, *state, lr, scratch):
        real(self, p, g, *state, lr=lr * (1.01 if p.dtype == np.float32 else 1.0),
             scratch=scratch)

    monkeypatch.setattr(optim.RMSProp, "_update", off)
    check = check_step_precision(model, "rmsprop", *_batch(256, 256, 10), lr=0.05)
    assert {k for k, e in check.errors.items() if e >= check.tol_of(k)} == set(check.errors)


def test_another_order_of_the_batch_is_the_same_step_up_to_rounding_with_dropout():
    # Each sample keeps its dropout mask in the permuted batch: without that, the two
    # orders would train different nets and the spread would be the move itself.
    model = MLP(64, (32, 32), 5, dropout=0.5, reg=1e-3, seed=0)
    X, y = _batch(128, 64, 5)
    net = model.copy()
    start = {k: p.astype(np.float64) for k, p in net.params.items()}
    train.step(net, optim.make_optimizer("momentum", net.params), X, y, 0.05)
    moves = {k: net.params[k].astype(np.float64) - start[k] for k in start}
    twin = model.copy()
    spread = order_spread(twin, optim.make_optimizer("momentum", twin.params), X, y, 0.05,
                          moves)
    for k, move in moves.items():
        assert spread[k] < 1e-5 * np.linalg.norm(move), k


def test_the_clear_check_takes_the_first_batch_without_kinks(monkeypatch):
    kinks, seen = [2, 1, 0, 0], []

    def fake(model, optimizer, X, y, lr, steps):
        seen.append(X)
        return gradcheck.PrecisionCheck("float32", steps, 1e-4, {"W1": 0.0}, 0.0,
                                        kinks[len(seen) - 1])

    monkeypatch.setattr(gradcheck, "check_step_precision", fake)
    model = MLP(20, (8,), 4, seed=0)
    check = check_step_precision_clear(model, "sgd", ((i, None) for i in range(4)))
    assert (check.kinks, check.batches, seen) == (0, 3, [0, 1, 2])
    seen.clear()
    check = check_step_precision_clear(model, "sgd", ((i, None) for i in range(2)))
    assert (check.kinks, check.batches, seen) == (1, 2, [0, 1])  # every batch had kinks
    with pytest.raises(ValueError, match="no batch"):
        check_step_precision_clear(model, "sgd", iter(()))


def test_the_check_runs_the_trainers_step_fused_in_float32(monkeypatch):
    # The function the trainer calls, with the trainer's arguments: fused, float32 arrays.
    assert gradcheck.step is train.step
    calls = []

    def spy(model, optimizer, X, y, lr, fused=True, guard=None):
        calls.append((model.dtype.name, X.dtype.name, fused, type(optimizer).__name__))
        return train.step(model, optimizer, X, y, lr, fused=fused, guard=guard)

    monkeypatch.setattr(gradcheck, "step", spy)
    check_step_precision(MLP(20, (8,), 4, seed=0), "momentum", *_batch(8, 20, 4), steps=2)
    assert calls == [("float32", "float32", True, "Momentum"),  # the path that trains,
                     ("float64", "float64", False, "Momentum"),  # its float64 twin,
                     ("float32", "float32", True, "Momentum")] * 2  # the batch reordered


def test_the_checked_float32_step_is_bit_for_bit_the_trainers_step():
    model = MLP(20, (8,), 4, reg=1e-3, seed=0)
    X, y = _batch(8, 20, 4)
    twin = model.copy()
    optimizer = optim.make_optimizer("momentum", twin.params)
    start = {k: p.copy() for k, p in twin.params.items()}
    train.step(twin, optimizer, X, y, 0.05)
    moved = {k: twin.params[k].astype(np.float64) - start[k].astype(np.float64) for k in start}
    reference = model.copy("float64")
    ref_opt = optim.make_optimizer("momentum", reference.params)
    train.step(reference, ref_opt, X.astype(np.float64), y, 0.05, fused=False)
    ref_moved = {k: reference.params[k] - start[k].astype(np.float64) for k in start}
    check = check_step_precision(model, "momentum", X, y, lr=0.05, steps=1)
    rms = np.sqrt(np.mean(np.concatenate([m.ravel() for m in ref_moved.values()]) ** 2))
    for k in moved:
        scale = max(np.linalg.norm(ref_moved[k]), np.sqrt(moved[k].size) * rms)
        assert check.errors[k] == np.linalg.norm(moved[k] - ref_moved[k]) / scale


def test_each_step_is_judged_from_the_state_the_float32_path_reached(monkeypatch):
    # The float64 twin of step 2 starts from the float32 path's parameters and velocity
    # after step 1, not from its own step 1: rounding does not carry from step to step.
    model = MLP(20, (8,), 4, reg=1e-3, seed=0)
    X, y = _batch(8, 20, 4)
    starts = []

    def spy(net, optimizer, X, y, lr, fused=True, guard=None):
        starts.append((net.dtype.name, fused, {k: p.astype(np.float64) for k, p in
                                               net.params.items()}, optimizer.state_dict()))
        return train.step(net, optimizer, X, y, lr, fused=fused, guard=guard)

    monkeypatch.setattr(gradcheck, "step", spy)
    check_step_precision(model, "momentum", X, y, lr=0.05, steps=2)
    low, ref, order = starts[3:]  # step 2: the path that trains, its float64 twin, the order
    assert (low[:2], ref[:2], order[:2]) == (("float32", True), ("float64", False),
                                             ("float32", True))
    for k in low[2]:
        assert np.array_equal(ref[2][k], low[2][k]) and np.array_equal(order[2][k], low[2][k])
        assert np.array_equal(ref[3][f"v/{k}"], low[3][f"v/{k}"])
    assert np.any(low[3]["v/W1"] != 0) and int(ref[3]["t"]) == int(low[3]["t"]) == 1


def test_the_callers_model_is_not_touched():
    model = MLP(20, (8,), 4, dropout=0.5, seed=0)
    before = {k: p.copy() for k, p in model.params.items()}
    rng_state = model.dropout_rng.bit_generator.state
    check_step_precision(model, "adam", *_batch(8, 20, 4))
    assert all(np.array_equal(model.params[k], before[k]) for k in before)
    assert model.dropout_rng.bit_generator.state == rng_state


def test_a_float32_step_off_by_ten_tolerances_fails(monkeypatch):
    # The measure is calibrated: a float32 step whose move is off by 10 tol is caught.
    model = MLP(3072, (100,), 10, reg=5e-4, seed=0)
    X, y = _batch(256, 3072, 10)
    tol = step_tolerance(model, 256, 2)
    real = optim.Momentum.sinks

    def off(self, params, weights, lr, l2=None):
        scale = 1 + 10 * tol if next(iter(params.values())).dtype == np.float32 else 1
        return {k: (c, alpha * scale, beta)
                for k, (c, alpha, beta) in real(self, params, weights, lr, l2).items()}

    monkeypatch.setattr(optim.Momentum, "sinks", off)
    check = check_step_precision(model, "momentum", X, y, lr=1e-2)
    assert not check.passed
    assert {k for k, e in check.errors.items() if e >= check.tol} == {"W1", "b1", "W2", "b2"}


def test_a_relu_unit_on_its_kink_is_counted():
    # A pre-activation within float32 rounding of 0: the two steps take different branches.
    model = MLP(4, (3,), 2, seed=0)
    X, y = _batch(5, 4, 2)
    W, b = model.params["W1"], model.params["b1"]
    b[0] = -np.float32(X[0].astype(np.float64) @ W[:, 0].astype(np.float64))
    check = check_step_precision(model, "sgd", X, y, steps=1)
    states = []
    for dtype in ("float32", "float64"):
        net = model.copy(dtype)
        net.scores(X.astype(dtype), training=True)
        states.append(net.kink_state()[0][0, 0])
    assert check.kinks == int(states[0] != states[1])


def test_the_report_renders_and_serializes():
    check = check_step_precision(MLP(20, (8,), 4, seed=0), "sgd", *_batch(8, 20, 4))
    assert "float32 step vs float64 reference" in str(check)
    assert "PASSED" in str(check)
    d = check.to_dict()
    assert d["passed"] is True and set(d["errors"]) == set(d["tols"]) == {"W1", "b1", "W2", "b2"}
    assert all(d["tols"][k] > d["tol"] for k in d["tols"]) and d["worst"] in d["errors"]
