"""Losses: softmax cross-entropy and the multiclass SVM, by hand and by finite differences."""

import warnings

import numpy as np
import pytest

from mlp.core import losses
from mlp.core.gradcheck import numeric_gradient, rel_error


@pytest.mark.parametrize("value", [0.0, 3.7, -250.0])
def test_softmax_loss_at_uniform_scores_is_log_num_classes(value):
    scores = np.full((4, 10), value)
    y = np.array([0, 3, 9, 5])
    loss, dscores = losses.softmax_loss(scores, y)
    assert loss == pytest.approx(np.log(10), abs=1e-12)
    expected = np.full((4, 10), 0.1)
    expected[np.arange(4), y] -= 1
    np.testing.assert_allclose(dscores, expected / 4, atol=1e-15)


def test_softmax_loss_hand_computed_example():
    # softmax([1, 2, 3]) = [0.09003057, 0.24472847, 0.66524096]
    scores = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    loss, dscores = losses.softmax_loss(scores, np.array([2, 0]))
    assert loss == pytest.approx((0.40760596 + 2.40760596) / 2, abs=1e-8)
    np.testing.assert_allclose(dscores, [[0.09003057 / 2, 0.24472847 / 2, -0.33475904 / 2],
                                         [-0.90996943 / 2, 0.24472847 / 2, 0.66524096 / 2]],
                               atol=1e-8)


def test_svm_loss_hand_computed_lecture_example():
    # cs231n lecture 3: cat, car, frog images; losses 2.9, 0, 12.9
    scores = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    loss, dscores = losses.svm_loss(scores, np.array([0, 1, 2]))
    assert loss == pytest.approx((2.9 + 0.0 + 12.9) / 3, abs=1e-12)
    np.testing.assert_allclose(dscores, np.array([[-1, 1, 0], [0, 0, 0], [1, 1, -2]]) / 3,
                               atol=1e-15)


@pytest.mark.parametrize(("other", "loss", "grad"), [
    (-1.5, 0.0, 0.0),   # margin beyond 1: no loss
    (-1.0, 0.0, 0.0),   # exactly the margin: max(0, 0) is inactive
    (-0.5, 0.5, 1.0),   # inside the margin
    (0.0, 1.0, 1.0),    # tie with the correct class costs the full margin
    (2.0, 3.0, 1.0),
])
def test_svm_margin_is_one(other, loss, grad):
    value, dscores = losses.svm_loss(np.array([[0.0, other]]), np.array([0]))
    assert value == loss
    np.testing.assert_array_equal(dscores, [[-grad, grad]])


def test_svm_loss_of_equal_scores_is_num_classes_minus_one():
    loss, _ = losses.svm_loss(np.zeros((3, 5)), np.array([0, 1, 4]))
    assert loss == 4.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["softmax", "svm"])
def test_losses_are_stable_for_scores_around_1e4(name, dtype):
    scores = (1e4 * np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])).astype(dtype)
    y = np.array([0, 0])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise",
                                                 divide="raise", under="ignore"):
        warnings.simplefilter("error")
        loss, dscores = losses.LOSSES[name](scores, y)
    assert dscores.dtype == dtype
    assert np.isfinite(loss)
    assert np.all(np.isfinite(dscores))
    expected = {"softmax": 2e4 / 2, "svm": (1e4 + 1 + 2e4 + 1 + 0 + 0) / 2}[name]
    assert loss == pytest.approx(expected, rel=1e-6)


def test_softmax_dscores_at_1e4_is_softmax_minus_onehot():
    scores = 1e4 * np.array([[1.0, 2.0, 3.0]])
    _, dscores = losses.softmax_loss(scores, np.array([0]))
    np.testing.assert_allclose(dscores, [[-1.0, 0.0, 1.0]], atol=1e-15)


@pytest.mark.parametrize("name", ["softmax", "svm"])
def test_dscores_match_numeric_gradient(name):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((6, 5)).astype(np.longdouble)
    y = rng.integers(0, 5, 6)
    loss_fn, kink_fn = losses.LOSSES[name], losses.KINK_STATES[name]
    _, dscores = loss_fn(scores.astype(np.float64), y)
    kink_state = None if kink_fn is None else (lambda: [kink_fn(scores, y)])
    numeric, kinks = numeric_gradient(lambda: loss_fn(scores, y)[0], scores,
                                      kink_state=kink_state)
    assert not kinks.any()
    assert rel_error(dscores.reshape(-1), numeric, floor=1e-8).max() < 1e-7


def test_svm_kink_state_marks_active_margins():
    scores = np.array([[0.0, -1.0, -0.5, 3.0]])
    active = losses.svm_kink_state(scores, np.array([0]))
    np.testing.assert_array_equal(active, [[False, False, True, True]])
