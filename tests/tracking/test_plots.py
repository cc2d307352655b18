"""Figures of a run: exact confusion counts and per-class accuracies, and every figure renders."""

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from mlp.tracking import plots

CLASSES = ("plane", "car", "bird", "cat")


def _png(fig: Figure) -> bytes:
    """The figure rendered as PNG bytes: a draw that fails anywhere fails here."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    data = buf.getvalue()
    assert data.startswith(b"\x89PNG")
    return data


def _history(epochs: int) -> dict[str, list[float]]:
    t = np.arange(1, epochs + 1)
    return {"train_loss": list(2.0 / t), "val_loss": list(2.0 / t + 0.1 * t),
            "train_acc": list(1 - 0.8 / t), "val_acc": list(0.5 - 0.3 / t - 0.01 * (t - 3) ** 2)}


def _predictions(n: int = 200, c: int = len(CLASSES), seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, c, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, c, n))
    return y_true, y_pred


def test_confusion_matrix_counts_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 1, 0, 1, 1, 0, 2, 2, 1])
    cm = plots.confusion_matrix(y_true, y_pred, 4)
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0],
                                       [0, 2, 0, 0],
                                       [1, 1, 2, 0],
                                       [0, 0, 0, 0]])
    assert cm.dtype == np.int64


def test_confusion_matrix_rejects_out_of_range_and_mismatched_labels():
    with pytest.raises(ValueError, match="y_pred"):
        plots.confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="y_true"):
        plots.confusion_matrix(np.array([-1, 1]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        plots.confusion_matrix(np.array([0, 1, 2]), np.array([0, 1]), 3)


def test_per_class_accuracy_by_hand_with_an_empty_class():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 1, 0, 1, 1, 0, 2, 2, 1])
    acc = plots.per_class_accuracy(y_true, y_pred, 4)
    np.testing.assert_allclose(acc[:3], [2 / 3, 1.0, 0.5])
    assert np.isnan(acc[3])


def test_curves_figure_has_loss_and_accuracy_panels_with_gap_and_best_epoch():
    fig = plots.curves_figure(_history(8))
    _png(fig)
    ax_loss, ax_acc = fig.axes
    assert ax_loss.get_title() == "Loss (train vs val)"
    assert ax_acc.get_title() == "Accuracy (train vs val)"
    assert ax_loss.get_legend_handles_labels()[1] == ["train loss", "val loss", "gap"]
    labels = ax_acc.get_legend_handles_labels()[1]
    assert labels[:3] == ["train acc", "val acc", "gap"]
    history = _history(8)
    best = int(np.argmax(history["val_acc"])) + 1
    assert labels[3] == f"best val {max(history['val_acc']):.3f} (epoch {best})"
    gap = 100 * (history["train_acc"][-1] - history["val_acc"][-1])
    assert f"gap {gap:.1f} pts" in [t.get_text() for t in ax_acc.texts]


def test_curves_figure_with_a_single_epoch():
    fig = plots.curves_figure(_history(1))
    _png(fig)
    assert len(fig.axes) == 2
    assert "(epoch 1)" in fig.axes[1].get_legend_handles_labels()[1][-1]


def test_confusion_and_per_class_figures_render():
    y_true, y_pred = _predictions()
    accuracy = np.mean(y_true == y_pred)
    fig = plots.confusion_figure(y_true, y_pred, CLASSES)
    _png(fig)
    assert f"accuracy {accuracy:.3f}" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(CLASSES)
    fig = plots.per_class_figure(y_true, y_pred, CLASSES)
    _png(fig)
    assert fig.axes[0].get_legend_handles_labels()[1] == [f"overall {accuracy:.3f}"]


def test_confusion_and_per_class_figures_with_a_class_without_samples():
    y_true, y_pred = np.array([0, 1, 1, 2]), np.array([0, 1, 3, 2])
    _png(plots.confusion_figure(y_true, y_pred, CLASSES))
    fig = plots.per_class_figure(y_true, y_pred, CLASSES)
    _png(fig)
    assert "no samples" in [t.get_text() for t in fig.axes[0].texts]


@pytest.mark.parametrize(("units", "shown"), [(7, 7), (30, 12)])
def test_weights_figure_shows_up_to_max_units(units, shown):
    W = np.random.default_rng(0).standard_normal((3072, units)).astype(np.float32)
    fig = plots.weights_figure(W, max_units=12)
    _png(fig)
    # One image: the units row by row on a grid of ceil(sqrt(shown)) columns.
    (image,) = [im for ax in fig.axes for im in ax.images]
    cols = int(np.ceil(np.sqrt(shown)))
    rows = int(np.ceil(shown / cols))
    side = 32 + plots.UNIT_GAP
    assert image.get_array().shape == (rows * side - plots.UNIT_GAP,
                                       cols * side - plots.UNIT_GAP, 3)
    assert fig.get_suptitle() == f"First-layer weights ({shown} of {units} units)"


def test_weights_figure_images_are_rescaled_rgb_of_the_planes():
    # Unit 0: planes R=1, G=0, B=-1 -> rescaled to [0, 1]: channels 1, 0.5, 0 everywhere.
    W = np.zeros((3072, 2))
    W[:1024, 0], W[2048:, 0] = 1.0, -1.0
    W[:, 1] = 5.0  # constant unit: no division by zero
    grid = np.asarray(plots.weights_figure(W).axes[0].images[0].get_array())
    red, constant = grid[:32, :32], grid[:32, 32 + plots.UNIT_GAP:]
    assert grid.shape == (32, 2 * 32 + plots.UNIT_GAP, 3)
    np.testing.assert_allclose(red[..., 0], 1.0)
    np.testing.assert_allclose(red[..., 1], 0.5)
    np.testing.assert_allclose(red[..., 2], 0.0)
    np.testing.assert_allclose(grid[:, 32:32 + plots.UNIT_GAP], 1.0)  # white between units
    assert constant.shape == (32, 32, 3) and np.all(np.isfinite(constant))


@pytest.mark.parametrize("shape", [(784, 10), (3072,), (3, 32, 32)])
def test_weights_figure_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match="3072"):
        plots.weights_figure(np.zeros(shape))


def test_weights_figure_rejects_max_units_below_one():
    with pytest.raises(ValueError, match="max_units"):
        plots.weights_figure(np.zeros((3072, 4)), max_units=0)


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


def _diverging(epochs: int) -> dict[str, list[float]]:
    """Losses in the thousands, a NaN epoch, accuracies at chance: the widest tick labels
    a run's curves can get."""
    h = _history(epochs)
    h["train_loss"] = [1234.5 * (i + 1) for i in range(epochs)]
    h["val_loss"] = [float("nan")] + [2345.6 * (i + 1) for i in range(1, epochs)]
    h["train_acc"] = [0.1] * epochs
    return h


def _flat(epochs: int) -> dict[str, list[float]]:
    """A run that learned everything at once (a small synthetic set): accuracies 1.0 and
    losses near 0 at every epoch, where a tick formatter reaches for an offset."""
    return {"train_loss": [1e-4] * epochs, "val_loss": [2e-4] * epochs,
            "train_acc": [1.0] * epochs, "val_acc": [1.0] * epochs}


@pytest.mark.parametrize("figure", [
    pytest.param(lambda: plots.curves_figure(_history(1)), id="curves-1-epoch"),
    pytest.param(lambda: plots.curves_figure(_flat(3)), id="curves-flat"),
    pytest.param(lambda: plots.glance_figure(_flat(3)), id="glance-flat"),
    pytest.param(lambda: plots.curves_figure(_history(150)), id="curves-150-epochs"),
    pytest.param(lambda: plots.curves_figure(_diverging(12)), id="curves-diverging"),
    pytest.param(lambda: plots.glance_figure(_history(1)), id="glance-1-epoch"),
    pytest.param(lambda: plots.glance_figure(_history(150)), id="glance-150-epochs"),
    pytest.param(lambda: plots.confusion_figure(*_predictions(500, 10), CIFAR_CLASSES),
                 id="confusion-cifar"),
    pytest.param(lambda: plots.per_class_figure(*_predictions(500, 10), CIFAR_CLASSES),
                 id="per-class-cifar"),
    pytest.param(lambda: plots.weights_figure(
        np.random.default_rng(0).standard_normal((3072, 100))), id="weights-100"),
    pytest.param(lambda: plots.weights_figure(
        np.random.default_rng(0).standard_normal((3072, 3))), id="weights-3"),
])
def test_every_run_figure_fits_its_fixed_margins(figure):
    """The figures have fixed margins (no layout engine, for speed): what a run can draw
    on them (its ticks, labels, titles, the confusion matrix's colorbar) stays inside the
    figure, and the margins are not much wider than needed."""
    fig = figure()
    room = plots.room_left(fig)
    assert all(r >= 0 for r in room), f"cut off (left, bottom, right, top): {room}"
    assert all(r < 0.6 for r in room), f"margins much wider than needed: {room}"
    offsets = [ax.yaxis.get_offset_text().get_text() for ax in fig.axes]
    assert offsets == [""] * len(fig.axes), f"an offset over the axes: {offsets}"
