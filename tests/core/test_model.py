"""The MLP: gradient check over every architecture, sanity checks, training, files, inputs."""

import time

import numpy as np
import pytest

from mlp.core.gradcheck import check_model
from mlp.core.layers import ACTIVATIONS
from mlp.core.model import MLP

D, C, N = 50, 7, 8


def _data(n: int = N, d: int = D, c: int = C, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


# -- gradient check -----------------------------------------------------------------------


@pytest.mark.parametrize("hidden_sizes", [[], [20], [20, 15]], ids=str)
@pytest.mark.parametrize("loss", ["softmax", "svm"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_check_passes(activation, loss, hidden_sizes):
    model = MLP(D, hidden_sizes, C, activation=activation, loss=loss, reg=0.1,
                dtype="float64", seed=1)
    # 30 sampled coordinates per parameter keep the 36 checks fast; the full check of
    # every coordinate is test_full_gradient_check_of_two_hidden_layers.
    report = check_model(model, *_data(), num_checks=30)
    assert report.passed, str(report)
    assert report.max_rel_error < 1e-7, str(report)


def test_full_gradient_check_of_two_hidden_layers(record_property):
    model = MLP(D, [20, 15], C, activation="relu", reg=0.1, dtype="float64", seed=1)
    start = time.perf_counter()
    report = check_model(model, *_data())
    seconds = time.perf_counter() - start
    record_property("full_gradcheck_seconds", seconds)
    print(f"full gradient check of {D}-20-15-{C} on {N} samples: {seconds:.2f} s")
    assert report.passed, str(report)
    assert report.max_rel_error < 1e-7, str(report)
    assert sum(r.checked for r in report.rows if r.part == "total") == sum(
        p.size for p in model.params.values())


# -- sanity checks ------------------------------------------------------------------------


def test_initial_softmax_loss_is_log_num_classes():
    X, y = _data(n=100, c=10)
    model = MLP(D, [20], 10, init="normal", weight_scale=1e-3, reg=0.0, seed=0)
    assert abs(model.loss(X, y) - np.log(10)) < 0.05


def test_increasing_reg_increases_loss():
    X, y = _data()
    totals = [MLP(D, [20], C, reg=reg, dtype="float64", seed=0).loss(X, y)
              for reg in (0.0, 0.01, 0.1, 1.0)]
    assert np.all(np.diff(totals) > 0)


def test_sgd_overfits_twenty_samples():
    X, y = _data(n=20, d=10, c=5, seed=3)
    model = MLP(10, [50], 5, activation="relu", dtype="float64", seed=0)
    for _ in range(300):
        _, grads = model.loss_and_grads(X, y)
        for name, p in model.params.items():
            p -= 0.5 * grads[name]
    assert np.mean(model.predict(X) == y) == 1.0


@pytest.mark.parametrize("init", ["he", "xavier", "normal"])
def test_float32_and_float64_models_of_one_seed_start_from_the_same_weights(init):
    m32 = MLP(D, [20, 15], C, init=init, dtype="float32", seed=5)
    m64 = MLP(D, [20, 15], C, init=init, dtype="float64", seed=5)
    assert m32.params.keys() == m64.params.keys()
    for name, p in m32.params.items():
        assert p.dtype == np.float32
        assert m64.params[name].dtype == np.float64
        np.testing.assert_array_equal(p, m64.params[name].astype(np.float32))


def test_params_are_the_arrays_the_layers_use():
    X, _ = _data()
    model = MLP(D, [20], C, dtype="float64", seed=0)
    before = model.scores(X)
    model.params["b2"] += 1.0
    np.testing.assert_allclose(model.scores(X), before + 1.0)


def test_reg_does_not_touch_biases():
    model = MLP(D, [20], C, reg=0.5, dtype="float64", seed=0)
    assert model.weight_names() == ["W1", "W2"]
    _, grads = model.reg_loss_and_grads()
    assert not grads["b1"].any()
    assert not grads["b2"].any()


# -- files --------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "activation", "pieces"), [
    ("float32", "relu", 2), ("float64", "relu", 2),
    ("float32", "maxout", 3), ("float64", "maxout", 2),
])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, dtype, activation, pieces):
    X, _ = _data(n=30)
    model = MLP(D, [20, 15], C, activation=activation, maxout_pieces=pieces, reg=0.01,
                dtype=dtype, seed=2)
    loaded = MLP.load(model.save(tmp_path / "model.npz"))
    assert loaded.arch == model.arch
    for name, p in model.params.items():
        assert loaded.params[name].dtype == p.dtype
        np.testing.assert_array_equal(loaded.params[name], p)
    np.testing.assert_array_equal(loaded.scores(X), model.scores(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def _saved_arrays(tmp_path) -> dict[str, np.ndarray]:
    path = MLP(D, [20], C, seed=0).save(tmp_path / "good.npz")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_load_corrupt_file_raises_value_error(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match="not a readable mlp-lab model file"):
        MLP.load(path)


def test_load_truncated_file_raises_value_error(tmp_path):
    good = MLP(D, [20], C, seed=0).save(tmp_path / "good.npz").read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable mlp-lab model file"):
        MLP.load(path)


def test_load_file_missing_a_parameter_raises_value_error(tmp_path):
    arrays = _saved_arrays(tmp_path)
    del arrays["W2"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match=r"missing \['W2'\]"):
        MLP.load(tmp_path / "missing.npz")


def test_load_file_with_unexpected_parameter_raises_value_error(tmp_path):
    arrays = _saved_arrays(tmp_path)
    arrays["W9"] = np.zeros(3)
    np.savez(tmp_path / "extra.npz", **arrays)
    with pytest.raises(ValueError, match=r"unexpected \['W9'\]"):
        MLP.load(tmp_path / "extra.npz")


def test_load_file_with_wrong_shaped_parameter_raises_value_error(tmp_path):
    arrays = _saved_arrays(tmp_path)
    arrays["W1"] = np.zeros((D + 1, 20), np.float32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ValueError, match=r"W1 has shape \(51, 20\): expected \(50, 20\)"):
        MLP.load(tmp_path / "shape.npz")


def test_load_file_without_architecture_raises_value_error(tmp_path):
    arrays = _saved_arrays(tmp_path)
    del arrays["__architecture__"]
    np.savez(tmp_path / "noarch.npz", **arrays)
    with pytest.raises(ValueError, match="no '__architecture__' entry"):
        MLP.load(tmp_path / "noarch.npz")


def test_load_file_with_unreadable_architecture_raises_value_error(tmp_path):
    arrays = _saved_arrays(tmp_path)
    arrays["__architecture__"] = np.array("{not json")
    np.savez(tmp_path / "badarch.npz", **arrays)
    with pytest.raises(ValueError, match="unreadable architecture"):
        MLP.load(tmp_path / "badarch.npz")


def test_load_npy_file_raises_value_error(tmp_path):
    # A plain .npy array (np.save, not np.savez) is not a model file either.
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match="not a readable mlp-lab model file"):
        MLP.load(path)


@pytest.mark.parametrize("kwargs", [
    {"hidden_sizes": [np.int64(20)]},
    {"reg": np.float32(0.5)},
], ids=["numpy_int_hidden_size", "numpy_float32_reg"])
def test_save_load_round_trip_with_numpy_scalar_arguments(tmp_path, kwargs):
    # The constructor accepts NumPy integers and floats (validate allows np.integer and
    # np.number), so save must write them too.
    model = MLP(**{"input_dim": D, "hidden_sizes": [20], "num_classes": C, **kwargs})
    loaded = MLP.load(model.save(tmp_path / "model.npz"))
    assert loaded.arch == model.arch


# -- bad inputs ---------------------------------------------------------------------------


BAD_ARGUMENTS = [
    ({"activation": "swish"}, r"activation='swish'.*relu"),
    ({"loss": "hinge"}, r"loss='hinge'.*softmax.*svm"),
    ({"reg": -0.1}, r"reg=-0\.1.*>= 0"),
    ({"reg": float("nan")}, r"reg=nan.*>= 0"),
    ({"hidden_sizes": [20, 0]}, r"hidden_sizes=\[20, 0\].*positive integers"),
    ({"hidden_sizes": 20}, r"hidden_sizes=20.*list"),
    ({"hidden_sizes": "20"}, r"hidden_sizes='20'.*list"),
    ({"hidden_sizes": [2.5]}, r"hidden_sizes=\[2\.5\].*positive integers"),
    ({"init": "zeros"}, r"init='zeros'.*he"),
    ({"num_classes": 1}, r"num_classes=1.*>= 2"),
    ({"maxout_pieces": 1}, r"maxout_pieces=1.*>= 2"),
    ({"dtype": "int8"}, r"dtype='int8'.*float32"),
]


@pytest.mark.parametrize(("kwargs", "pattern"), BAD_ARGUMENTS,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items())
                              for kw, _ in BAD_ARGUMENTS])
def test_bad_constructor_argument_raises_value_error_naming_it(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MLP(**{"input_dim": D, "hidden_sizes": [20], "num_classes": C, **kwargs})


def test_unknown_dtype_name_raises_value_error_naming_it():
    with pytest.raises(ValueError, match=r"dtype='float17'.*float32"):
        MLP(D, [20], C, dtype="float17")


def test_x_of_wrong_width_raises_value_error():
    model = MLP(D, [20], C)
    X, y = _data(d=D - 1)
    for call in (lambda: model.predict(X), lambda: model.loss_and_grads(X, y)):
        with pytest.raises(ValueError, match=r"X has shape \(8, 49\): expected \(N, 50\)"):
            call()


@pytest.mark.parametrize("bad", [7, -1])
# The range is checked in one pass, the labels viewed as unsigned of their own width.
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8])
def test_labels_out_of_range_raise_value_error(bad, dtype):
    model = MLP(D, [20], C)
    X, y = _data()
    y = y.astype(dtype)
    y[3] = bad
    with pytest.raises(ValueError, match=r"y has labels in .*expected labels in \[0, 6\]"):
        model.loss_and_grads(X, y)


@pytest.mark.parametrize("y", [np.zeros(N), np.zeros(N, dtype=bool), np.zeros(N - 1, int)],
                         ids=["float", "bool", "short"])
def test_non_integer_or_misshaped_labels_raise_value_error(y):
    model = MLP(D, [20], C)
    X, _ = _data()
    with pytest.raises(ValueError, match=r"y has shape .*integer class ids"):
        model.loss(X, y)
