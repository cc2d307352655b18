"""The gradient check itself: rel_error, verdicts, sampling, kinks, reports, and that it
fails when a backward pass is wrong."""

import json

import numpy as np
import pytest

from mlp.core import gates, gradcheck, layers, optim
from mlp.core.gradcheck import (
    GradcheckReport,
    ParamCheck,
    check_model,
    check_training_step,
    numeric_gradient,
    rel_error,
    verdict,
)
from mlp.core.model import MLP

D, C, N = 12, 4, 6


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)), rng.integers(0, C, N)


def _model(**kwargs) -> MLP:
    return MLP(**{"input_dim": D, "hidden_sizes": [8], "num_classes": C, "reg": 0.1,
                  "dtype": "float64", "seed": 0, **kwargs})


# -- rel_error and verdicts ---------------------------------------------------------------


def test_rel_error_of_equal_values_is_zero():
    a = np.array([1.5, -2.0, 1e-30])
    assert rel_error(a, a).max() == 0.0


def test_rel_error_of_two_zeros_is_zero():
    assert rel_error(0.0, 0.0) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)).max() == 0.0


def test_rel_error_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(10), rng.standard_normal(10)
    np.testing.assert_array_equal(rel_error(a, b), rel_error(b, a))


def test_rel_error_values():
    assert rel_error(1.0, -1.0) == 1.0
    assert rel_error(3.0, 1.0) == pytest.approx(0.5)
    assert rel_error(1.0, 1.0 + 2e-8) == pytest.approx(1e-8)


def test_rel_error_floor_bounds_the_denominator():
    assert rel_error(1e-12, 2e-12) == pytest.approx(1 / 3)
    assert rel_error(1e-12, 2e-12, floor=1e-6) == pytest.approx(1e-6)
    assert rel_error(1.0, 2.0, floor=1e-6) == pytest.approx(1 / 3)


@pytest.mark.parametrize(("error", "band"), [
    (0.0, "good"), (9.9e-8, "good"),
    (1e-7, "ok"), (9.9e-5, "ok"),
    (1e-4, "suspicious"), (9.9e-3, "suspicious"),
    (1e-2, "wrong"), (0.5, "wrong"), (np.inf, "wrong"), (np.nan, "wrong"),
])
def test_verdict_bands(error, band):
    assert verdict(error) == band


def test_resolution_floor_grows_with_scale_and_shrinks_with_precision():
    h = gradcheck.DEFAULT_H
    assert gradcheck.resolution_floor(np.longdouble, 10.0, h) == pytest.approx(
        10 * gradcheck.resolution_floor(np.longdouble, 1.0, h))
    assert gradcheck.resolution_floor(np.longdouble, 1.0, h) <= gradcheck.resolution_floor(
        np.float64, 1.0, h)


# -- numeric_gradient ---------------------------------------------------------------------


def test_numeric_gradient_of_sum_of_cubes():
    x = np.random.default_rng(0).standard_normal((3, 4))
    before = x.copy()
    grad, kinks = numeric_gradient(lambda: np.sum(x ** 3), x, h=1e-5)
    np.testing.assert_allclose(grad, 3 * before.reshape(-1) ** 2, rtol=1e-8, atol=1e-10)
    assert grad.shape == (12,)
    assert not kinks.any()
    np.testing.assert_array_equal(x, before)  # perturbed in place, then restored


def test_numeric_gradient_in_extended_precision_is_finer():
    x = np.random.default_rng(0).standard_normal(5).astype(np.longdouble)
    grad, _ = numeric_gradient(lambda: np.sum(np.exp(x)), x, h=gradcheck.DEFAULT_H)
    assert grad.dtype == np.longdouble
    assert rel_error(grad, np.exp(x)).max() < 1e-10


def test_numeric_gradient_of_vector_function_and_selected_coords():
    x = np.arange(1.0, 7.0)
    grad, _ = numeric_gradient(lambda: np.array([np.sum(x ** 2), np.sum(3 * x)]), x,
                               coords=[0, 4], h=1e-5)
    np.testing.assert_allclose(grad, [[2.0, 3.0], [10.0, 3.0]], rtol=1e-9)


def test_numeric_gradient_rejects_float32():
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="float64 or longdouble"):
        numeric_gradient(lambda: np.sum(x), x)


def test_numeric_gradient_rejects_non_contiguous_array():
    x = np.zeros((3, 4)).T
    with pytest.raises(ValueError, match="contiguous"):
        numeric_gradient(lambda: np.sum(x), x)


def test_sparse_sampling_checks_exactly_num_checks_distinct_coordinates(monkeypatch):
    calls = []
    real = gradcheck.numeric_gradient

    def spy(f, x, coords=None, *args, **kwargs):
        calls.append((x.size, np.asarray(coords)))
        return real(f, x, coords, *args, **kwargs)

    monkeypatch.setattr(gradcheck, "numeric_gradient", spy)
    model = _model()
    report = check_model(model, *_data(), num_checks=5)
    assert len(calls) == len(model.params)
    for size, coords in calls:
        assert len(coords) == min(5, size)
        assert len(np.unique(coords)) == len(coords)
        assert coords.min() >= 0
        assert coords.max() < size
    sizes = {name: p.size for name, p in model.params.items()}
    assert all(r.checked == min(5, sizes[r.name]) for r in report.rows)


# -- reports ------------------------------------------------------------------------------


def test_check_model_reports_data_reg_and_total_for_every_parameter():
    model = _model()
    report = check_model(model, *_data())
    assert {(r.name, r.part) for r in report.rows} == {
        (name, part) for name in model.params for part in ("data", "reg", "total")}
    assert report.passed, str(report)
    assert set(report.max_by_param("reg")) == set(model.params)


def test_check_model_does_not_touch_the_callers_model():
    model = _model(dtype="float32")
    before = {k: p.copy() for k, p in model.params.items()}
    report = check_model(model, *_data(), num_checks=10)
    assert report.passed, str(report)
    for k, p in model.params.items():
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p, before[k])


def test_report_table_rows_have_every_column():
    report = check_model(_model(), *_data(), num_checks=4)
    rows = report.table()
    assert len(rows) == len(report.rows)
    for row in rows:
        assert set(row) == {"name", "part", "shape", "checked", "kinks", "max_rel_error",
                            "mean_rel_error", "verdict"}
    assert rows[0]["shape"] == f"{D}x8"
    assert rows[0]["verdict"] == "good"


def test_report_to_dict_is_json_serializable():
    report = check_model(_model(), *_data(), num_checks=4)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True
    assert data["verdict"] == "good"
    assert len(data["rows"]) == len(report.rows)
    assert data["h"] == gradcheck.DEFAULT_H


def test_report_renders_as_text():
    report = check_model(_model(), *_data(), num_checks=4)
    text = str(report)
    for name in ("W1", "b1", "W2", "b2", "data", "reg", "total", "PASSED"):
        assert name in text


def test_empty_report_does_not_pass():
    assert not GradcheckReport().passed


def _row(name: str, error: float) -> ParamCheck:
    return ParamCheck(name=name, part="data", shape=(2,), checked=2, kinks=0,
                      max_rel_error=error, mean_rel_error=error)


@pytest.mark.parametrize("position", [0, 1])
def test_report_with_a_nan_row_fails(position):
    rows = [_row("W1", 1e-9), _row("b1", 1e-9)]
    rows[position] = _row(rows[position].name, float("nan"))
    report = GradcheckReport(rows=rows)
    assert not report.passed
    assert report.verdict == "wrong"


# -- fault injection: the check can fail --------------------------------------------------


def test_wrong_linear_weight_gradient_is_caught(monkeypatch):
    real = layers.Linear.backward

    def backward(self, dout):
        dx = real(self, dout)
        self.grads["W"] *= 1.1
        return dx

    monkeypatch.setattr(layers.Linear, "backward", backward)
    report = check_model(_model(), *_data())
    assert not report.passed
    assert report.verdict == "wrong"
    by_row = {(r.name, r.part): r.verdict for r in report.rows}
    assert by_row["W1", "data"] == by_row["W2", "data"] == "wrong"
    assert by_row["b1", "data"] == by_row["b2", "data"] == "good"
    assert by_row["W1", "reg"] == "good"


def test_small_relative_error_of_1e_5_still_fails(monkeypatch):
    real = layers.Linear.backward

    def backward(self, dout):
        dx = real(self, dout)
        self.grads["b"] *= 1 + 1e-5
        return dx

    monkeypatch.setattr(layers.Linear, "backward", backward)
    report = check_model(_model(), *_data())
    assert not report.passed
    assert report.verdict in ("ok", "suspicious")


def test_activation_backward_dropping_a_factor_is_caught(monkeypatch):
    # sigma' = sigma (1 - sigma); drop the (1 - sigma)
    monkeypatch.setattr(gates.Sigmoid, "local_grad", lambda self, x, out: out)
    report = check_model(_model(activation="sigmoid"), *_data())
    assert not report.passed
    assert report.verdict == "wrong"
    assert report.max_by_param("data")["W2"] < 1e-7  # only layers below the gate are hit
    assert report.max_by_param("data")["W1"] > 1e-2


def test_wrong_reg_gradient_is_caught_in_the_reg_part_only(monkeypatch):
    real = MLP.reg_loss_and_grads

    def reg_loss_and_grads(self):
        loss, grads = real(self)
        return loss, {k: 0.5 * g for k, g in grads.items()}

    monkeypatch.setattr(MLP, "reg_loss_and_grads", reg_loss_and_grads)
    report = check_model(_model(), *_data())
    assert not report.passed
    assert report.max_by_param("reg")["W1"] > 1e-2
    assert max(report.max_by_param("data").values()) < 1e-7
    assert max(report.max_by_param("total").values()) < 1e-7


def test_nan_gradient_fails_the_check(monkeypatch):
    real = layers.Linear.backward

    def backward(self, dout):
        dx = real(self, dout)
        self.grads["b"][0] = np.nan
        return dx

    monkeypatch.setattr(layers.Linear, "backward", backward)
    report = check_model(_model(), *_data())
    assert not report.passed
    assert report.verdict == "wrong"


# -- kinks --------------------------------------------------------------------------------


def test_relu_kinks_are_counted_and_excluded():
    # Sample 0 is the zero vector and b1 = 0: its every ReLU pre-activation is exactly 0,
    # so each +-h step of b1 crosses the kink; the check must flag and skip those.
    X, y = _data()
    X[0] = 0.0
    model = _model(activation="relu")
    report = check_model(model, X, y)
    rows = {(r.name, r.part): r for r in report.rows}
    assert rows["b1", "data"].kinks == rows["b1", "total"].kinks == 8
    assert rows["b1", "reg"].kinks == 0
    assert report.kinks >= 16
    assert report.passed, str(report)


def test_hinge_kinks_are_counted_and_excluded():
    # A linear SVM; sample 0 is the zero vector with label 0 and b = [1, 0, 0, 0], so its
    # scores are b and its margins s_j - s_0 + 1 are exactly 0, on the hinge: every step of
    # b crosses it, while W (which sample 0 does not see) is checked normally.
    X, y = _data()
    X[0], y[0] = 0.0, 0
    model = _model(hidden_sizes=[], loss="svm")
    model.params["b1"][...] = [1.0, 0.0, 0.0, 0.0]
    report = check_model(model, X, y)
    rows = {(r.name, r.part): r for r in report.rows}
    assert rows["b1", "data"].kinks == C
    assert rows["W1", "data"].kinks == 0
    assert report.passed, str(report)


def test_a_part_with_only_kinks_does_not_pass():
    from mlp.core.gradcheck import GradcheckReport, ParamCheck

    rows = [ParamCheck("W1", "data", (2,), 2, 2, 0.0, 0.0),
            ParamCheck("W1", "reg", (2,), 2, 0, 1e-12, 1e-12)]
    assert not GradcheckReport(rows=rows).passed
    rows[0] = ParamCheck("W1", "data", (2,), 2, 1, 1e-12, 1e-12)
    assert GradcheckReport(rows=rows).passed


# -- the training step: the path that trains ----------------------------------------------


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("kwargs", [
    {"activation": "relu"}, {"activation": "tanh", "norm": "batch", "dropout": 0.3},
    {"activation": "maxout", "norm": "layer"}, {"hidden_sizes": [8, 5], "loss": "svm"},
], ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_training_step_check_passes_for_every_optimizer(name, kwargs):
    report = check_training_step(_model(**kwargs), name, *_data(), num_checks=6)
    assert report.passed, str(report)
    parts = {(r.name, r.part) for r in report.rows}
    assert parts == {(n, p) for n in _model(**kwargs).params for p in ("data", "total")} | {
        ("l2", "loss"), ("fused", "step")}


def test_training_step_check_takes_an_optimizer_factory_and_leaves_the_model_alone():
    model = _model()
    before = {k: v.copy() for k, v in model.params.items()}
    built = []

    def factory(params):
        built.append(optim.make_optimizer("adam", params, beta1=0.5))
        return built[-1]

    report = check_training_step(model, factory, *_data())
    assert report.passed, str(report)
    assert built[0].t == 0 and not any(v.any() for v in built[0].state.values())
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert sum(r.checked for r in report.rows if r.part == "total") == sum(
        p.size for p in model.params.values())


def test_wrong_fused_l2_gradient_fails_the_training_step_check(monkeypatch):
    # The mutation the per-run check exists for: the optimizer adds c/2 W instead of c W.
    real = optim.Optimizer._with_l2

    def half_l2(c, squares, rule, *arrays, scratch):
        real(c / 2, squares, rule, *arrays, scratch=scratch)

    monkeypatch.setattr(optim.Optimizer, "_with_l2", staticmethod(half_l2))
    report = check_training_step(_model(), "momentum", *_data())
    assert not report.passed
    assert report.max_by_param("total")["W1"] > 1e-2
    assert max(report.max_by_param("data").values()) < 1e-7  # the backward pass is right
    assert check_model(_model(), *_data()).passed  # the public API does not see it


def test_wrong_l2_loss_term_fails_the_training_step_check(monkeypatch):
    real = optim.Optimizer._pass
    monkeypatch.setattr(optim.Optimizer, "_pass", lambda *a, **kw: 0.5 * real(*a, **kw))
    report = check_training_step(_model(), "sgd", *_data())
    assert not report.passed
    assert [r.max_rel_error > 0.1 for r in report.rows if r.part == "loss"] == [True]


def test_wrong_activation_backward_in_the_fast_path_fails_the_training_step_check(
        monkeypatch):
    # Wrong only where the layer writes into its reused arrays, the way training runs it.
    real = layers.Activation.backward

    def backward(self, dout):
        dx = real(self, dout)
        if self.reuse_buffers:
            dx *= 1.01
        return dx

    monkeypatch.setattr(layers.Activation, "backward", backward)
    report = check_training_step(_model(activation="tanh"), "sgd", *_data())
    assert not report.passed
    assert report.max_by_param("data")["W1"] > 1e-4
    assert report.max_by_param("data")["W2"] < 1e-7


def test_training_step_check_uses_the_trainers_pass(monkeypatch):
    # The gradients checked are the reference path's: the zero-copy backward pass and the
    # optimizer's pass; then the step as it trains (`train.step`, fused: the weights'
    # gradients accumulated by the GEMMs) is compared with that path, two steps each.
    calls = []
    real_backprop, real_pass = MLP.backprop, optim.Optimizer._pass

    def backprop(self, X, y, into=None):
        calls.append("backprop" + (" into the optimizer" if into else ""))
        return real_backprop(self, X, y, into)

    def fused(self, *args, **kwargs):
        calls.append("optimizer pass")
        return real_pass(self, *args, **kwargs)

    monkeypatch.setattr(MLP, "backprop", backprop)
    monkeypatch.setattr(optim.Optimizer, "_pass", fused)
    report = check_training_step(_model(), "momentum", *_data(), num_checks=2)
    step = ["backprop into the optimizer", "optimizer pass"] * 2
    assert calls == ["backprop", "optimizer pass", *step, *["backprop", "optimizer pass"] * 2]
    assert [r.part for r in report.rows].count("step") == 1


def test_a_fused_step_that_differs_from_the_reference_fails_the_check(monkeypatch):
    real = optim.Momentum.sinks

    def off_by_a_little(self, params, weights, lr, l2=None):
        return {k: (c, alpha * (1 + 1e-6), beta)
                for k, (c, alpha, beta) in real(self, params, weights, lr, l2).items()}

    monkeypatch.setattr(optim.Momentum, "sinks", off_by_a_little)
    report = check_training_step(_model(), "momentum", *_data(), num_checks=2)
    assert not report.passed
    assert {r.name for r in report.rows if r.max_rel_error >= report.tol} == {"fused"}


# -- the public API, checked the cs231n way ----------------------------------------------


def test_kept_gradients_survive_the_perturbed_evaluations():
    # cs231n's procedure: compute the analytic gradients, keep them, then evaluate the loss
    # function (which computes gradients too) at perturbed parameters and compare.
    model = _model(hidden_sizes=[8, 6], dtype="float64")
    X, y = _data()
    _, grads = model.loss_and_grads(X, y)
    kept = {k: g.copy() for k, g in grads.items()}
    _, data_grads = model.data_loss_and_grads(X, y)
    worst = 0.0
    for name, p in model.params.items():
        numeric, _ = numeric_gradient(lambda: model.loss_and_grads(X, y)[0], p, h=1e-5)
        worst = max(worst, rel_error(grads[name].reshape(-1), numeric).max())
        np.testing.assert_array_equal(grads[name], kept[name])
    assert worst < 1e-7
    assert all(not np.shares_memory(grads[k], data_grads[k]) for k in grads)
