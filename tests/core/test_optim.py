"""Tests of mlp.optim: update rules on a convex quadratic, exact first steps, in-place
updates without per-step allocations, state round trips through .npz, schedules, errors."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from mlp.core import elementwise
from mlp.core.optim import (
    OPTIMIZERS,
    SCHEDULES,
    Adam,
    Momentum,
    Nesterov,
    Optimizer,
    RMSProp,
    Schedule,
    make_optimizer,
)

# Learning rates that suit each rule on the quadratic below (eigenvalues of A in [1, 5]).
LRS = {"sgd": 0.1, "momentum": 0.02, "nesterov": 0.02, "rmsprop": 0.02, "adam": 0.05}


class Quadratic:
    """f(p) = 0.5 p^T A p - b^T p with A SPD (eigenvalues 1..5), params {"x": (4,), "y": (2,)}."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
        self.A = q @ np.diag(np.linspace(1.0, 5.0, 6)) @ q.T
        self.b = rng.standard_normal(6)
        self.p_star = np.linalg.solve(self.A, self.b)
        self.p0 = rng.standard_normal(6)

    def params(self, dtype: type) -> dict[str, np.ndarray]:
        return {"x": self.p0[:4].astype(dtype), "y": self.p0[4:].astype(dtype)}

    def value(self, params: dict[str, np.ndarray]) -> float:
        p = np.concatenate([params["x"], params["y"]]).astype(np.float64)
        return 0.5 * p @ self.A @ p - self.b @ p

    def grads(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = params["x"].dtype
        p = np.concatenate([params["x"], params["y"]])
        g = self.A.astype(dtype) @ p - self.b.astype(dtype)
        return {"x": g[:4], "y": g[4:]}


def run(opt: Optimizer, quad: Quadratic, params: dict[str, np.ndarray], steps: int) -> None:
    for _ in range(steps):
        opt.step(params, quad.grads(params), LRS[opt.name])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_minimizes_convex_quadratic(name: str, dtype: type) -> None:
    quad = Quadratic()
    params = quad.params(dtype)
    opt = make_optimizer(name, params)
    f_star = quad.value({"x": quad.p_star[:4], "y": quad.p_star[4:]})
    gap0 = quad.value(params) - f_star
    run(opt, quad, params, 200)
    assert quad.value(params) - f_star < 1e-3 * gap0
    assert all(p.dtype == dtype for p in params.values())
    assert all(s.dtype == dtype for k, s in opt.state_dict().items() if k != "t")


def test_sgd_first_step() -> None:
    p, g = np.array([1.0, -2.0]), np.array([0.5, -4.0])
    make_optimizer("sgd", {"p": p}).step({"p": p}, {"p": g}, 0.1)
    np.testing.assert_allclose(p, [0.95, -1.6])


def test_momentum_two_steps() -> None:
    p, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, -4.0]), np.array([1.0, 1.0])
    opt = make_optimizer("momentum", {"p": p}, momentum=0.9)
    opt.step({"p": p}, {"p": g1}, 0.1)
    np.testing.assert_allclose(p, [0.95, -1.6])  # v = -lr g1
    opt.step({"p": p}, {"p": g2}, 0.1)
    v2 = 0.9 * np.array([-0.05, 0.4]) - 0.1 * g2
    np.testing.assert_allclose(p, np.array([0.95, -1.6]) + v2)
    np.testing.assert_allclose(opt.state_dict()["v/p"], v2)


def test_nesterov_matches_notes_formula() -> None:
    rng = np.random.default_rng(1)
    p, mu, lr = rng.standard_normal(5), 0.9, 0.05
    p_ref, v_ref = p.copy(), np.zeros(5)
    opt = Nesterov({"p": p}, momentum=mu)
    for _ in range(3):
        g = rng.standard_normal(5)
        opt.step({"p": p}, {"p": g}, lr)
        v_prev = v_ref
        v_ref = mu * v_ref - lr * g
        p_ref += -mu * v_prev + (1 + mu) * v_ref
    np.testing.assert_allclose(p, p_ref, rtol=1e-12)


def test_rmsprop_first_step() -> None:
    p, g = np.array([1.0, -2.0]), np.array([0.5, -4.0])
    RMSProp({"p": p}, decay_rate=0.99, eps=1e-8).step({"p": p}, {"p": g}, 1e-3)
    # cache = 0.01 g^2, so the step is lr g / (0.1 |g|) = 10 lr sign(g).
    np.testing.assert_allclose(p, [1.0 - 1e-2, -2.0 + 1e-2], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_first_step_is_lr_times_sign(dtype: type) -> None:
    p0 = np.array([1.0, -2.0, 0.5], dtype=dtype)
    p, g = p0.copy(), np.array([3.0, -1e-3, 20.0], dtype=dtype)
    opt = Adam({"p": p})
    opt.step({"p": p}, {"p": g}, 1e-2)
    np.testing.assert_allclose(p, p0 - 1e-2 * np.sign(g), rtol=1e-5)
    assert int(opt.state_dict()["t"]) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_updates_in_place_without_per_step_allocations(name: str) -> None:
    rng = np.random.default_rng(2)
    params = {"W": rng.standard_normal((300, 100)), "b": np.zeros(100)}
    model_view = {"W": params["W"], "b": params["b"]}  # what the model holds
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    opt = make_optimizer(name, params)
    before = params["W"].copy()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        opt.step(params, grads, np.float64(1e-2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start < params["W"].nbytes // 10
    for key in params:
        assert params[key] is model_view[key]
        assert np.shares_memory(params[key], model_view[key])
    assert not np.array_equal(model_view["W"], before)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_l2_in_the_update_equals_l2_in_the_gradient(name: str, dtype: type,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # small chunks, so a parameter spans several of them and one ends mid-chunk
    monkeypatch.setattr(elementwise, "CHUNK", 64)
    rng = np.random.default_rng(4)
    start = {"W": rng.standard_normal((30, 7)).astype(dtype), "b": np.zeros(7, dtype)}
    fused = {k: v.copy() for k, v in start.items()}
    plain = {k: v.copy() for k, v in start.items()}
    opt_fused, opt_plain = make_optimizer(name, fused), make_optimizer(name, plain)
    c = 2 * 0.05
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()}
        kept = {k: g.copy() for k, g in grads.items()}
        expected_term = c / 2 * float(np.vdot(plain["W"], plain["W"]))
        total = {"W": grads["W"] + c * plain["W"], "b": grads["b"]}
        opt_plain.step(plain, total, 1e-2)
        term = opt_fused.step(fused, grads, 1e-2, l2={"W": c})
        assert term == pytest.approx(expected_term, rel=1e-6 if dtype == np.float32 else 1e-12)
        for k in grads:  # the caller's gradients are left as they were
            np.testing.assert_array_equal(grads[k], kept[k])
    for k in start:  # same arithmetic, element by element: bit for bit
        np.testing.assert_array_equal(fused[k], plain[k])
    assert opt_plain.step(plain, total, 1e-2) == 0.0  # no l2: no term


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_roundtrip_through_npz_continues_exactly(name: str, tmp_path) -> None:
    quad = Quadratic(seed=3)
    params = quad.params(np.float32)
    opt = make_optimizer(name, params)
    run(opt, quad, params, 7)
    path = tmp_path / "optim.npz"
    np.savez(path, **opt.state_dict())
    with np.load(path, allow_pickle=False) as data:
        state = dict(data)
    resumed_params = {k: v.copy() for k, v in params.items()}
    resumed = make_optimizer(name, resumed_params)
    resumed.load_state_dict(state)
    run(opt, quad, params, 10)
    run(resumed, quad, resumed_params, 10)
    for key in params:
        np.testing.assert_array_equal(resumed_params[key], params[key])
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)


def test_state_dict_is_a_copy_with_expected_keys() -> None:
    params = {"W1": np.ones((3, 2), np.float32), "b1": np.zeros(2, np.float32)}
    opt = Adam(params)
    state = opt.state_dict()
    assert set(state) == {"m/W1", "m/b1", "v/W1", "v/b1", "t"}
    assert state["t"].shape == () and state["t"].dtype == np.int64
    state["m/W1"][...] = 7.0
    assert not opt.state_dict()["m/W1"].any()
    assert set(Momentum(params).state_dict()) == {"v/W1", "v/b1", "t"}
    assert set(make_optimizer("sgd", params).state_dict()) == {"t"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("v/W1"), "missing"),
        (lambda s: s.pop("t"), "missing"),
        (lambda s: s.update({"v/W9": np.zeros(2)}), "unexpected"),
        (lambda s: s.update({"v/W1": np.zeros((2, 3))}), "shape"),
        (lambda s: s.update({"t": np.array([1, 2])}), "'t'"),
        (lambda s: s.update({"t": np.array(1.5)}), "'t'"),
        (lambda s: s.update({"t": np.array(-1)}), "'t'"),
    ],
)
def test_load_bad_state_raises_and_changes_nothing(change, match: str) -> None:
    params = {"W1": np.ones((3, 2)), "b1": np.ones(2)}
    opt = Momentum(params)
    opt.step(params, {"W1": np.ones((3, 2)), "b1": np.ones(2)}, 0.1)
    good = opt.state_dict()
    bad = {k: np.full_like(v, 9) for k, v in good.items()}
    change(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, good[key])


def test_step_with_other_params_raises() -> None:
    opt = make_optimizer("adam", {"W1": np.ones(2)})
    with pytest.raises(ValueError, match="W1"):
        opt.step({"W2": np.ones(2)}, {"W2": np.ones(2)}, 0.1)


def test_make_optimizer_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"optim\.name='adagrad' is not allowed: expected one of"):
        make_optimizer("adagrad", {})


@pytest.mark.parametrize(
    ("key", "value"),
    [("momentum", 1.0), ("momentum", -0.1), ("decay_rate", 1.0), ("beta1", 1.0),
     ("beta2", -0.5), ("beta2", math.nan), ("eps", 0.0), ("eps", -1e-8), ("eps", math.inf)],
)
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_make_optimizer_bad_hyperparameter_names_key(name: str, key: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"optim\.{key}="):
        make_optimizer(name, {"W1": np.ones(2)}, **{key: value})


def test_schedule_constant() -> None:
    sched = Schedule("constant", lr=0.1, steps_per_epoch=7, epochs=3)
    assert {sched(s) for s in range(sched.total_steps + 1)} == {0.1}


def test_schedule_step_changes_at_epoch_boundaries() -> None:
    sched = Schedule("step", lr=1.0, steps_per_epoch=10, epochs=30, step_size=10, gamma=0.1)
    assert sched(0) == sched(99) == 1.0
    assert sched(100) == sched(199) == pytest.approx(0.1)
    assert sched(200) == sched(299) == pytest.approx(0.01)


def test_schedule_exponential_per_epoch() -> None:
    sched = Schedule("exponential", lr=0.5, steps_per_epoch=4, epochs=10, decay=0.9)
    for epoch in range(10):
        values = [sched(epoch * 4 + i) for i in range(4)]
        assert values == [pytest.approx(0.5 * 0.9**epoch)] * 4


def test_schedule_cosine_from_lr_to_min_lr() -> None:
    sched = Schedule("cosine", lr=0.1, steps_per_epoch=5, epochs=4, min_lr=0.001)
    values = [sched(s) for s in range(sched.total_steps + 3)]
    assert values[0] == 0.1
    assert values[10] == pytest.approx(0.0505)  # halfway: the mean of lr and min_lr
    assert values[20:] == [pytest.approx(0.001)] * 3  # reached at the end, then kept
    assert all(a >= b for a, b in itertools.pairwise(values))


# onecycle's rise is a half cosine from lr / div_factor: tests/core/test_onecycle.py
@pytest.mark.parametrize("name", [name for name in SCHEDULES if name != "onecycle"])
def test_warmup_ramps_linearly_then_hands_over_at_lr(name: str) -> None:
    sched = Schedule(name, lr=0.2, steps_per_epoch=5, epochs=6, warmup_epochs=2, step_size=1,
                     gamma=0.5, decay=0.5)
    assert sched.warmup_steps == 10
    np.testing.assert_allclose([sched(s) for s in range(10)], 0.2 * np.arange(1, 11) / 10)
    assert sched(10) == 0.2
    decay_only = Schedule(name, lr=0.2, steps_per_epoch=5, epochs=4, step_size=1, gamma=0.5,
                          decay=0.5)
    assert [sched(10 + s) for s in range(21)] == [decay_only(s) for s in range(21)]


def test_fractional_warmup_epochs() -> None:
    sched = Schedule("constant", lr=1.0, steps_per_epoch=4, epochs=2, warmup_epochs=0.5)
    assert [sched(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "linear"}, "optim.schedule.name"),
        ({"lr": 0.0}, "optim.lr"),
        ({"lr": -1.0}, "optim.lr"),
        ({"steps_per_epoch": 0}, "optim.schedule.steps_per_epoch"),
        ({"steps_per_epoch": 2.5}, "optim.schedule.steps_per_epoch"),
        ({"epochs": 0}, "optim.schedule.epochs"),
        ({"warmup_epochs": -1.0}, "optim.schedule.warmup_epochs"),
        ({"warmup_epochs": 3.0}, "optim.schedule.warmup_epochs"),
        ({"warmup_epochs": math.inf}, "optim.schedule.warmup_epochs"),
        ({"warmup_epochs": 2.96}, "optim.schedule.warmup_epochs"),  # rounds to all 30 steps
        ({"step_size": 0}, "optim.schedule.step_size"),
        ({"gamma": 0.0}, "optim.schedule.gamma"),
        ({"gamma": 1.5}, "optim.schedule.gamma"),
        ({"decay": 0.0}, "optim.schedule.decay"),
        ({"decay": 1.01}, "optim.schedule.decay"),
        ({"min_lr": -0.1}, "optim.schedule.min_lr"),
        ({"min_lr": 0.1}, "optim.schedule.min_lr"),
    ],
)
def test_schedule_bad_values_name_key(kwargs: dict, key: str) -> None:
    args = {"name": "cosine", "lr": 0.1, "steps_per_epoch": 10, "epochs": 3} | kwargs
    with pytest.raises(ValueError, match=rf"^{key}=.* is not allowed: expected "):
        Schedule(**args)


def test_schedule_negative_step_raises() -> None:
    with pytest.raises(ValueError, match="step"):
        Schedule("constant", lr=0.1, steps_per_epoch=1, epochs=1)(-1)
