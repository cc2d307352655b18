"""BatchNorm, LayerNorm and Dropout: gradient checks of the layers and of nets using them,
what each computes in training and evaluation mode, running statistics, files, float32."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from mlp.core import layers
from mlp.core.gradcheck import check_layer, check_model
from mlp.core.model import MLP

N, D, H = 6, 7, 5
C = 4


def _x(shape: tuple[int, ...] = (N, D), seed: int = 1, loc: float = 2.0,
       scale: float = 3.0) -> np.ndarray:
    return loc + scale * np.random.default_rng(seed).standard_normal(shape)


def _norm(kind: type[layers.BatchNorm] | type[layers.LayerNorm], dim: int = D,
          seed: int = 0) -> layers.BatchNorm | layers.LayerNorm:
    """A norm layer with random gamma and beta, so the check sees every term."""
    layer = kind(dim)
    rng = np.random.default_rng(seed)
    layer.params["gamma"][...] = rng.standard_normal(dim)
    layer.params["beta"][...] = rng.standard_normal(dim)
    return layer


def _data(n: int = 8, d: int = 20, c: int = C, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


def _assert_good(report) -> None:
    assert report.passed, str(report)
    assert report.max_rel_error < 1e-7, str(report)


def _assert_good_without_kinks(report) -> None:
    """Good, and no coordinate skipped: masks that changed between passes would flip
    ReLU branches downstream and hide as kinks."""
    _assert_good(report)
    assert report.kinks == 0, str(report)


# -- layer gradient checks ----------------------------------------------------------------


@pytest.mark.parametrize("kind", [layers.BatchNorm, layers.LayerNorm])
def test_norm_layers_pass_gradient_check(kind):
    report = check_layer(_norm(kind), _x())
    _assert_good(report)
    assert [r.name for r in report.rows] == ["x", "gamma", "beta"]


def test_batchnorm_in_evaluation_mode_passes_gradient_check():
    layer = _norm(layers.BatchNorm)
    layer.buffers["running_mean"][...] = np.linspace(-1, 1, D)
    layer.buffers["running_var"][...] = np.linspace(0.5, 2, D)
    layer.training = False
    _assert_good(check_layer(layer, _x()))


def test_dropout_with_a_frozen_mask_passes_gradient_check():
    layer = layers.Dropout(0.3, np.random.default_rng(0))
    layer.freeze()
    report = check_layer(layer, _x())
    _assert_good(report)
    assert [r.name for r in report.rows] == ["x"]


def test_dropout_without_a_frozen_mask_fails_gradient_check():
    # Every forward draws a new mask: the numeric side sees another function.
    report = check_layer(layers.Dropout(0.3, np.random.default_rng(0)), _x())
    assert not report.passed


def test_batchnorm_backward_missing_the_statistics_paths_is_caught():
    class StatsAsConstants(layers.BatchNorm):
        def backward(self, dout):
            self.batch_stats = False  # dx = dxhat / std: the mean and var paths dropped
            return super().backward(dout)

    report = check_layer(_norm(StatsAsConstants), _x())
    verdicts = {r.name: r.verdict for r in report.rows}
    assert verdicts == {"x": "wrong", "gamma": "good", "beta": "good"}


def test_layernorm_batch_equals_per_sample_loop():
    layer = _norm(layers.LayerNorm)
    x = _x()
    out = layer.forward(x)
    dout = np.random.default_rng(7).standard_normal(out.shape)
    dx = layer.backward(dout)
    grads = {k: g.copy() for k, g in layer.grads.items()}
    loop_grads = {k: np.zeros_like(g) for k, g in grads.items()}
    for i in range(N):
        np.testing.assert_allclose(layer.forward(x[i:i + 1])[0], out[i], rtol=1e-12)
        np.testing.assert_allclose(layer.backward(dout[i:i + 1])[0], dx[i], rtol=1e-10,
                                   atol=1e-12)
        for k in loop_grads:
            loop_grads[k] += layer.grads[k]
    for k in grads:
        np.testing.assert_allclose(grads[k], loop_grads[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pieces", [2, 3])
def test_piecemax_passes_gradient_check_and_makes_maxout_with_linear(pieces):
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((D, H * pieces)), rng.standard_normal(H * pieces)
    _assert_good(check_layer(layers.PieceMax(pieces), _x((N, H * pieces))))
    x = _x()
    np.testing.assert_array_equal(
        layers.Maxout(W, b, pieces).forward(x),
        layers.PieceMax(pieces).forward(layers.Linear(W, b).forward(x)))


# -- Dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_training_drops_about_p_and_keeps_the_expected_value(p):
    layer = layers.Dropout(p, np.random.default_rng(0))
    x = np.ones((1000, 500))
    out = layer.forward(x)
    assert abs(np.mean(out == 0) - p) < 0.003
    np.testing.assert_allclose(out[out != 0], 1 / (1 - p))
    assert abs(out.mean() - 1.0) < 0.005
    dout = np.full_like(x, 2.0)
    np.testing.assert_array_equal(layer.backward(dout), 2.0 * out)  # the same mask


def test_dropout_evaluation_is_the_identity():
    layer = layers.Dropout(0.5, np.random.default_rng(0))
    layer.training = False
    x = _x()
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(x), x)


def test_dropout_same_seed_same_masks_other_seed_other_masks():
    x = np.ones((50, 40))
    a, b, c = (layers.Dropout(0.5, np.random.default_rng(s)) for s in (3, 3, 4))
    for _ in range(3):
        ma, mb, mc = a.forward(x), b.forward(x), c.forward(x)
        np.testing.assert_array_equal(ma, mb)
        assert not np.array_equal(ma, mc)


def test_frozen_dropout_reuses_one_mask_until_unfrozen():
    layer = layers.Dropout(0.5, np.random.default_rng(0))
    x = np.ones((30, 20))
    layer.freeze()
    first = layer.forward(x)
    np.testing.assert_array_equal(layer.forward(2 * x), 2 * first)
    with pytest.raises(ValueError, match=r"frozen mask has shape \(30, 20\)"):
        layer.forward(np.ones((29, 20)))
    layer.freeze(False)
    assert not np.array_equal(layer.forward(x), first)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_rejects_p_outside_zero_one(p):
    with pytest.raises(ValueError, match=r"p=.*\[0, 1\)"):
        layers.Dropout(p, np.random.default_rng(0))


# -- BatchNorm and LayerNorm ---------------------------------------------------------------


def test_batchnorm_training_output_has_zero_mean_unit_variance_per_feature():
    layer = layers.BatchNorm(D)
    out = layer.forward(_x((200, D)))
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=0), 1, rtol=1e-5)


def test_batchnorm_running_statistics_follow_cs231n_momentum():
    layer = layers.BatchNorm(D, momentum=0.8)
    x = _x()
    layer.forward(x)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.2 * x.mean(axis=0))
    np.testing.assert_allclose(layer.buffers["running_var"], 0.8 + 0.2 * x.var(axis=0))


def test_batchnorm_running_statistics_converge_to_the_data():
    rng = np.random.default_rng(0)
    mu, sigma = np.linspace(-3, 3, D), np.linspace(0.5, 4, D)
    layer = layers.BatchNorm(D)
    for _ in range(60):  # 0.9^60 < 0.002: the initial values are forgotten
        layer.forward(mu + sigma * rng.standard_normal((1000, D)))
    np.testing.assert_allclose(layer.buffers["running_mean"], mu, atol=0.05 * sigma.max())
    np.testing.assert_allclose(layer.buffers["running_var"], sigma ** 2, rtol=0.05)


def test_batchnorm_evaluation_uses_the_running_statistics():
    layer = _norm(layers.BatchNorm)
    rm, rv = np.linspace(-1, 1, D), np.linspace(0.5, 2, D)
    layer.buffers["running_mean"][...], layer.buffers["running_var"][...] = rm, rv
    gamma, beta = layer.params["gamma"], layer.params["beta"]
    x = _x()

    layer.training = False
    out = layer.forward(x)
    np.testing.assert_allclose(out, gamma * (x - rm) / np.sqrt(rv + 1e-5) + beta)
    np.testing.assert_array_equal(layer.forward(x[2:3])[0], out[2])  # per sample
    np.testing.assert_array_equal(layer.buffers["running_mean"], rm)  # not updated
    # A shifted batch: evaluation passes the shift through (scaled by gamma / std) ...
    shift = gamma * 5.0 / np.sqrt(rv + 1e-5)
    np.testing.assert_allclose(layer.forward(x + 5.0) - out, np.broadcast_to(shift, x.shape))
    # ... while training normalizes it away with the batch's own mean.
    layer.training = True
    np.testing.assert_allclose(layer.forward(x + 5.0), layer.forward(x), atol=1e-12)


def test_layernorm_normalizes_each_sample_the_same_in_both_modes():
    layer = layers.LayerNorm(D)
    x = _x() * np.arange(1.0, N + 1)[:, None]  # a different scale per sample
    out = layer.forward(x)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=1), 1, rtol=1e-4)
    layer.training = False
    np.testing.assert_array_equal(layer.forward(x), out)
    assert layer.buffers == {}


# -- the model: structure and names ---------------------------------------------------------


def _kinds(model: MLP) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


@pytest.mark.parametrize(("kwargs", "kinds"), [
    ({}, ["Linear", "Activation", "Linear", "Activation", "Linear"]),
    ({"norm": "batch", "dropout": 0.5},
     ["Linear", "BatchNorm", "Activation", "Dropout"] * 2 + ["Linear"]),
    ({"norm": "layer"}, ["Linear", "LayerNorm", "Activation"] * 2 + ["Linear"]),
    ({"norm": "none", "dropout": 0.1}, ["Linear", "Activation", "Dropout"] * 2 + ["Linear"]),
    ({"activation": "maxout"}, ["Maxout", "Maxout", "Linear"]),
    ({"activation": "maxout", "norm": "batch", "dropout": 0.2},
     ["Linear", "BatchNorm", "PieceMax", "Dropout"] * 2 + ["Linear"]),
], ids=["plain", "batch+dropout", "layer", "none+dropout", "maxout", "maxout+batch+dropout"])
def test_layer_stack_is_affine_norm_activation_dropout(kwargs, kinds):
    assert _kinds(MLP(20, [12, 10], C, **kwargs)) == kinds


def test_norm_parameters_and_buffers_are_named_and_shared_with_the_layers():
    model = MLP(20, [12, 10], C, norm="batch", reg=0.1, dtype="float64")
    assert list(model.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2",
                                  "beta2", "W3", "b3"]
    assert list(model.buffers) == ["running_mean1", "running_var1", "running_mean2",
                                   "running_var2"]
    assert model.weight_names() == ["W1", "W2", "W3"]  # gamma and beta not regularized
    bn = model.layers[1]
    assert model.params["gamma1"] is bn.params["gamma"]
    assert model.buffers["running_var1"] is bn.buffers["running_var"]
    assert not MLP(20, [12], C, norm="layer").buffers


def test_maxout_norm_normalizes_the_pieces_before_the_max():
    model = MLP(20, [12], C, activation="maxout", maxout_pieces=3, norm="layer")
    assert model.params["W1"].shape == (20, 36)
    assert model.params["gamma1"].shape == (36,)


def test_norm_and_dropout_do_not_change_the_initial_weights():
    plain = MLP(20, [12, 10], C, seed=3)
    fancy = MLP(20, [12, 10], C, seed=3, norm="batch", dropout=0.4)
    for name, p in plain.params.items():
        np.testing.assert_array_equal(fancy.params[name], p)


# -- the model: gradient checks --------------------------------------------------------------


@pytest.mark.parametrize("hidden_sizes", [[12], [12, 10]], ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_gradient_check_passes_with_norm_and_dropout(norm, dropout, activation, hidden_sizes):
    model = MLP(20, hidden_sizes, C, activation=activation, norm=norm, dropout=dropout,
                reg=0.1, dtype="float64", seed=1)
    _assert_good_without_kinks(check_model(model, *_data(), num_checks=20))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_gradient_check_passes_with_maxout_norm_and_dropout(norm):
    model = MLP(20, [12, 10], C, activation="maxout", norm=norm, dropout=0.3, reg=0.1,
                dtype="float64", seed=1)
    _assert_good_without_kinks(check_model(model, *_data(), num_checks=20))


def test_gradient_check_fails_when_dropout_masks_are_not_frozen(monkeypatch):
    monkeypatch.setattr(MLP, "freeze_dropout", lambda self, frozen=True: None)
    model = MLP(20, [12], C, activation="tanh", dropout=0.3, dtype="float64", seed=1)
    report = check_model(model, *_data(), num_checks=10)
    assert not report.passed
    assert report.verdict == "wrong"


def test_full_gradient_check_of_batchnorm_and_dropout_checks_every_coordinate():
    model = MLP(20, [12, 10], C, norm="batch", dropout=0.3, reg=0.1, dtype="float64", seed=2)
    report = check_model(model, *_data())
    _assert_good_without_kinks(report)
    assert sum(r.checked for r in report.rows if r.part == "total") == sum(
        p.size for p in model.params.values())


def test_gradient_check_does_not_touch_buffers_or_dropout_rng_of_the_callers_model():
    model = MLP(20, [12], C, norm="batch", dropout=0.3, reg=0.1, seed=0)
    buffers = {k: b.copy() for k, b in model.buffers.items()}
    rng_state = model.dropout_rng.bit_generator.state
    _assert_good(check_model(model, *_data(), num_checks=5))
    for k, b in model.buffers.items():
        np.testing.assert_array_equal(b, buffers[k])
    assert model.dropout_rng.bit_generator.state == rng_state
    assert not any(layer.frozen for layer in model.layers
                   if isinstance(layer, layers.Dropout))


# -- the model: training and evaluation mode --------------------------------------------------


def test_losses_train_and_scores_evaluate():
    X, y = _data(n=40)
    model = MLP(20, [12], C, norm="batch", dropout=0.5, dtype="float64", seed=0)
    np.testing.assert_array_equal(model.scores(X), model.scores(X))  # no dropout
    assert model.loss(X, y) != model.loss(X, y)                      # new masks each pass
    assert not np.array_equal(model.scores(X, training=True), model.scores(X))
    np.testing.assert_array_equal(model.predict(X, batch_size=7), model.scores(X).argmax(1))


def test_only_training_passes_update_the_running_statistics():
    X, y = _data(n=40)
    model = MLP(20, [12], C, norm="batch", dtype="float64", seed=0)
    before = model.buffers["running_mean1"].copy()
    model.scores(X)
    model.predict(X)
    np.testing.assert_array_equal(model.buffers["running_mean1"], before)
    model.loss_and_grads(X, y)
    assert not np.array_equal(model.buffers["running_mean1"], before)


def test_without_batchnorm_and_dropout_both_modes_are_one_function():
    X, _ = _data(n=10)
    model = MLP(20, [12], C, norm="layer", dtype="float64", seed=0)
    np.testing.assert_array_equal(model.scores(X), model.scores(X, training=True))


def test_same_seed_same_dropout_masks_in_every_dtype():
    X, y = _data(n=16)

    def masks(seed: int, dtype: str) -> list[np.ndarray]:
        model = MLP(20, [12, 10], C, dropout=0.5, dtype=dtype, seed=seed)
        model.loss_and_grads(X, y)
        return [layer.mask != 0 for layer in model.layers if isinstance(layer, layers.Dropout)]

    a, b, c, d = masks(7, "float64"), masks(7, "float64"), masks(7, "float32"), masks(8, "float64")
    for ma, mb, mc, md in zip(a, b, c, d, strict=True):
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(ma, mc)
        assert not np.array_equal(ma, md)


def test_sgd_with_batchnorm_and_dropout_fits_in_evaluation_mode():
    X, y = _data(n=40, d=10, c=3, seed=3)
    model = MLP(10, [64], 3, norm="batch", dropout=0.2, dtype="float64", seed=0)
    for _ in range(300):
        _, grads = model.loss_and_grads(X, y)
        for name, p in model.params.items():
            p -= 0.1 * grads[name]
    assert np.mean(model.predict(X) == y) >= 0.95


# -- the model: copies and files ----------------------------------------------------------------


def _trained(dtype: str = "float64", **kwargs) -> MLP:
    """A net whose running statistics moved away from their initial values."""
    model = MLP(20, [12, 10], C, dtype=dtype, seed=2, **kwargs)
    for seed in range(3):
        model.loss_and_grads(*_data(n=30, seed=seed))
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_keeps_the_running_statistics(tmp_path, dtype):
    model = _trained(dtype, norm="batch", dropout=0.3)
    loaded = MLP.load(model.save(tmp_path / "bn.npz"))
    assert loaded.arch == model.arch
    assert (loaded.arch.norm, loaded.arch.dropout) == ("batch", 0.3)
    assert loaded.buffers.keys() == model.buffers.keys()
    for name, b in model.buffers.items():
        assert loaded.buffers[name].dtype == b.dtype
        np.testing.assert_array_equal(loaded.buffers[name], b)
    X, _ = _data(n=30, seed=9)
    np.testing.assert_array_equal(loaded.scores(X), model.scores(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_load_file_missing_a_running_statistic_raises_value_error(tmp_path):
    path = _trained(norm="batch").save(tmp_path / "bn.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "running_var2"}
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match=r"buffers do not match.*missing \['running_var2'\]"):
        MLP.load(tmp_path / "missing.npz")


def test_load_file_written_before_norm_and_dropout_existed(tmp_path):
    path = MLP(20, [12], C, seed=0).save(tmp_path / "old.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays["__architecture__"]))
    del arch["dropout"], arch["norm"]
    arrays["__architecture__"] = np.array(json.dumps(arch))
    np.savez(tmp_path / "old.npz", **arrays)
    loaded = MLP.load(tmp_path / "old.npz")
    assert (loaded.arch.dropout, loaded.arch.norm) == (0.0, None)


def test_copy_carries_buffers_and_dropout_rng_state():
    model = _trained(norm="batch", dropout=0.5)
    clone = model.copy("float32")
    for name, b in model.buffers.items():
        np.testing.assert_allclose(clone.buffers[name], b, rtol=1e-6)
    X, y = _data(n=30, seed=5)
    model.loss_and_grads(X, y)
    clone.loss_and_grads(X, y)
    for mine, theirs in zip(model.layers, clone.layers, strict=True):
        if isinstance(mine, layers.Dropout):
            np.testing.assert_array_equal(mine.mask != 0, theirs.mask != 0)


def test_set_params_sets_buffers_only_when_given():
    model, other = _trained(norm="batch"), MLP(20, [12, 10], C, norm="batch", dtype="float64")
    other.set_params(model.params)
    np.testing.assert_array_equal(other.buffers["running_var1"], 1.0)
    other.set_params(model.params, model.buffers)
    np.testing.assert_array_equal(other.buffers["running_var1"], model.buffers["running_var1"])
    with pytest.raises(ValueError, match=r"missing \['running_mean2'\]"):
        other.set_params(model.params,
                         {k: b for k, b in model.buffers.items() if k != "running_mean2"})


# -- float32: the optimized path ----------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("activation", ["relu", "maxout"])
def test_float32_forward_backward_equals_float64(norm, activation):
    X, y = _data(n=64, seed=4)
    m32 = MLP(20, [16, 12], C, activation=activation, norm=norm, dropout=0.3, reg=0.01,
              dtype="float32", seed=2)
    m64 = m32.copy("float64")  # same weights, buffers and dropout masks
    loss32, grads32 = m32.loss_and_grads(X, y)
    loss64, grads64 = m64.loss_and_grads(X, y)
    assert abs(loss32 - loss64) < 1e-5 * abs(loss64)
    scale = max(np.abs(g).max() for g in grads64.values())
    for name, g in grads32.items():
        assert g.dtype == np.float32, name
        # b before a norm has gradient 0 (the norm removes it): compare on one scale
        np.testing.assert_allclose(g, grads64[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    for layer in m32.layers:  # no float64 anywhere in the float32 pass
        for attr in ("xhat", "std", "mask", "x", "out"):
            value = getattr(layer, attr, None)
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float32, (layer, attr)
    assert all(b.dtype == np.float32 for b in m32.buffers.values())
    s32, s64 = m32.scores(X), m64.scores(X)
    assert s32.dtype == np.float32
    np.testing.assert_allclose(s32, s64, rtol=1e-4, atol=1e-5 * np.abs(s64).max())


# -- bad arguments --------------------------------------------------------------------------


BAD_ARGUMENTS = [
    ({"dropout": 1.0}, r"dropout=1\.0.*\[0, 1\)"),
    ({"dropout": -0.1}, r"dropout=-0\.1.*\[0, 1\)"),
    ({"dropout": float("nan")}, r"dropout=nan.*\[0, 1\)"),
    ({"dropout": "0.5"}, r"dropout='0\.5'.*\[0, 1\)"),
    ({"dropout": True}, r"dropout=True.*\[0, 1\)"),
    ({"norm": "group"}, r"norm='group'.*None, 'none', 'batch', 'layer'"),
    ({"norm": "Batch"}, r"norm='Batch'.*'batch'"),
    ({"norm": 1}, r"norm=1.*'batch'"),
]


@pytest.mark.parametrize(("kwargs", "pattern"), BAD_ARGUMENTS,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items())
                              for kw, _ in BAD_ARGUMENTS])
def test_bad_dropout_or_norm_raises_value_error_naming_it(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MLP(20, [12], C, **kwargs)


def test_norm_none_and_none_string_are_one_architecture():
    a, b = MLP(20, [12], C, norm="none"), MLP(20, [12], C, norm=None)
    assert a.arch == b.arch
    assert a.arch.norm is None
    assert asdict(MLP.from_architecture(a.arch).arch) == asdict(a.arch)
