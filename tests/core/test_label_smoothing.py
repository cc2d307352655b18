"""Label smoothing: s = 0 is the plain softmax loss bit for bit, the smoothed loss against a
hand computation and finite differences, the SVM refusal, the saved architecture and the
loss the trainer reports."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mlp.cli import train as cli
from mlp.config import schema as configlib
from mlp.core import losses
from mlp.core.gradcheck import check_training_step, numeric_gradient, rel_error
from mlp.core.model import MLP


def _softmax_loss_before_smoothing(scores, y):
    """softmax_loss as it was before label smoothing, verbatim: the reference for s = 0."""
    n = scores.shape[0]
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = np.mean(np.log(sums[:, 0]) - shifted[rows, y])
    dscores = exp
    dscores /= sums
    dscores[rows, y] -= 1
    dscores /= n
    return loss, dscores


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_smoothing_is_the_plain_softmax_loss_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    scores = (3 * rng.standard_normal((50, 10))).astype(dtype)
    y = rng.integers(0, 10, 50)
    want_loss, want_d = _softmax_loss_before_smoothing(scores.copy(), y)
    for loss, dscores in (losses.softmax_loss(scores.copy(), y),
                          losses.softmax_loss(scores.copy(), y, label_smoothing=0.0),
                          MLP(4, [], 10, label_smoothing=0.0).loss_fn(scores.copy(), y)):
        assert loss == want_loss and loss.dtype == dtype
        np.testing.assert_array_equal(dscores, want_d)
        assert dscores.dtype == dtype


def test_smoothed_loss_hand_computed_example():
    # softmax([1, 2, 3]) = [0.09003057, 0.24472847, 0.66524096]; s = 0.3, C = 3: the
    # target of class 2 is 0.7 + 0.1 = 0.8, the others 0.1
    scores = np.array([[1.0, 2.0, 3.0]])
    probs = np.array([0.09003057, 0.24472847, 0.66524096])
    target = np.array([0.1, 0.1, 0.8])
    loss, dscores = losses.softmax_loss(scores, np.array([2]), label_smoothing=0.3)
    assert loss == pytest.approx(-np.sum(target * np.log(probs)), abs=1e-7)
    np.testing.assert_allclose(dscores, [probs - target], atol=1e-8)


def test_smoothed_loss_is_smallest_at_the_smoothed_target():
    # the loss is the cross-entropy H(q, p): minimal (= entropy of q) where p = q
    s, C = 0.2, 5
    q = np.full(C, s / C)
    q[1] += 1 - s
    loss, dscores = losses.softmax_loss(np.log(q)[None, :], np.array([1]), label_smoothing=s)
    assert loss == pytest.approx(-np.sum(q * np.log(q)), abs=1e-12)
    np.testing.assert_allclose(dscores, 0, atol=1e-15)


@pytest.mark.parametrize("s", [0.1, 0.9])
def test_smoothed_loss_gradient_passes_the_centered_difference_check(s):
    # as test_losses: the analytic gradient in float64, the differences in extended precision
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((6, 7)).astype(np.longdouble)
    y = rng.integers(0, 7, 6)
    _, dscores = losses.softmax_loss(scores.astype(np.float64), y, label_smoothing=s)
    numeric, _ = numeric_gradient(
        lambda: losses.softmax_loss(scores, y, label_smoothing=s)[0], scores)
    assert rel_error(dscores.reshape(-1), numeric, floor=1e-8).max() < 1e-7


@pytest.mark.parametrize("kwargs", [{}, {"norm": "batch", "dropout": 0.3}])
def test_a_smoothed_model_passes_the_training_step_check(kwargs):
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((6, 12)), rng.integers(0, 4, 6)
    model = MLP(12, [8], 4, reg=0.1, dtype="float64", seed=0, label_smoothing=0.1, **kwargs)
    report = check_training_step(model, "momentum", X, y, num_checks=10)
    assert report.passed and report.max_rel_error < 1e-7, str(report)


def test_smoothing_is_refused_with_the_svm_loss_and_out_of_range():
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1 .*0 with loss='svm'"):
        MLP(4, [], 3, loss="svm", label_smoothing=0.1)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing=.*\[0, 1\)"):
            MLP(4, [], 3, label_smoothing=bad)
    MLP(4, [], 3, loss="svm", label_smoothing=0.0)


def test_a_saved_model_reloads_its_smoothed_loss(tmp_path):
    model = MLP(6, [5], 3, label_smoothing=0.2, seed=3)
    loaded = MLP.load(model.save(tmp_path / "m.npz"))
    assert loaded.arch == model.arch and loaded.arch.label_smoothing == 0.2
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 6)), np.array([0, 1, 2, 0])
    assert loaded.loss(X, y) == model.loss(X, y)
    assert model.loss(X, y) != MLP(6, [5], 3, seed=3).loss(X, y)


def test_the_evaluation_loss_is_plain_cross_entropy():
    # the trainer reports eval_loss_fn, so that runs of any smoothing compare
    rng = np.random.default_rng(0)
    scores, y = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    smoothed = MLP(3, [], 4, label_smoothing=0.3)
    assert smoothed.eval_loss_fn(scores, y)[0] == losses.softmax_loss(scores, y)[0]
    assert smoothed.loss_fn(scores, y)[0] != losses.softmax_loss(scores, y)[0]


def test_mlp_train_refuses_smoothing_with_the_svm_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mlp-train", "model.loss=svm", "model.label_smoothing=0.1"])
    with pytest.raises(SystemExit) as exit_:
        cli.train_main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.label_smoothing=0.1 is not allowed: expected 0 with model.loss='svm'" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_smoothing_acts_only_with_the_softmax_loss():
    flat = configlib.schema_keys()
    assert configlib.applies("model.label_smoothing", flat)
    assert not configlib.applies("model.label_smoothing", flat | {"model.loss": "svm"})
