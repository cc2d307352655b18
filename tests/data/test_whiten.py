"""Whitening (`data.whiten`): PCA and ZCA fitted on the training split, their statistics
on held-out images, the state a checkpoint and a served model carry, the config keys, and
a whitened run from the config to the served model's probabilities.

Most checks use images of 48 pixels (3 channels of 4x4): the statistics of 3072 pixels at
a fraction of the cost of a 3072 x 3072 eigendecomposition (5 s on one core; the run at
the end fits 600 images, which take the SVD of the rows instead).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mlp import data as datalib
from mlp.cli import build
from mlp.cli import train as cli
from mlp.config import schema as configlib
from mlp.data import DataError, Normalizer
from mlp.tracking import plots, serving
from mlp.training import budget
from mlp.training.checkpoint import CheckpointError

configlib.register()

D = 48


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def correlated_pixels(n: int, seed: int) -> np.ndarray:
    """n uint8 images (n, D) from one Gaussian with a known covariance Q diag(lam) Q^T,
    lam from 1 to 316 (pixel std 1 to 18 around 128: no clipping), whatever the seed."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    root = Q * np.sqrt(np.logspace(0, 2.5, D))
    X = 128 + np.random.default_rng(seed).standard_normal((n, D)) @ root.T
    return np.rint(X).astype(np.uint8)


@pytest.fixture(scope="module")
def train_pixels() -> np.ndarray:
    return correlated_pixels(20_000, seed=1)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return correlated_pixels(20_000, seed=2)


def centred(norm: Normalizer, X: np.ndarray) -> np.ndarray:
    """X normalized and centred, before the projection: (N, D) float64."""
    return (X - norm.mean) / norm.scale


# -- statistics -------------------------------------------------------------------------


@pytest.mark.parametrize(("whiten", "components"), [("pca", None), ("pca", 12), ("zca", None)])
def test_held_out_images_come_out_white(train_pixels, held_out, whiten, components):
    """Unit variance and no correlation on images the fit never saw (eps far below the
    smallest eigenvalue, ~0.02 here, so it does not damp any component)."""
    norm = Normalizer(whiten=whiten, components=components, eps=1e-6).fit(train_pixels)
    Z = norm(held_out, np.float64)
    assert Z.shape == (len(held_out), components or D) == (len(held_out), norm.out_dim)
    # two estimates of 20,000 images each (the fit's, this one's): sampling spreads the
    # eigenvalues of a white covariance by about 2 sqrt(D / N) ~ 0.1 each, entries less
    cov = np.cov(Z, rowvar=False)
    np.testing.assert_allclose(np.linalg.eigvalsh(cov), 1, atol=0.2)
    np.testing.assert_allclose(cov, np.eye(norm.out_dim), atol=0.05)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=0.04)


def test_eps_damps_the_components_below_it(train_pixels):
    """On the training images, the whitened variance of a component of variance s is
    s / (s + eps): ~1 for the strong ones, ~s / eps for those far below eps; components
    come in order of decreasing variance."""
    norm = Normalizer(whiten="pca", eps=1.0).fit(train_pixels)
    x = centred(norm, train_pixels)
    s = np.linalg.eigvalsh(x.T @ x / len(x))[::-1]
    variances = norm(train_pixels, np.float64).var(axis=0)
    np.testing.assert_allclose(variances, s / (s + 1.0), rtol=1e-9)
    assert s[0] > 1 > 0.05 > s[-1]  # both regimes are there


@pytest.mark.parametrize("whiten", ["pca", "zca"])
def test_all_components_make_an_invertible_transform(train_pixels, held_out, whiten):
    norm = Normalizer(whiten=whiten).fit(train_pixels)
    Z = norm(held_out[:500], np.float64)
    back = np.linalg.solve(norm.projection.T, Z.T).T * norm.scale + norm.mean
    np.testing.assert_allclose(back, held_out[:500], atol=1e-8)


def test_zca_is_symmetric_and_moves_the_images_least(train_pixels, held_out):
    """Of all whitenings (any rotation of one), ZCA's output is the closest to its input."""
    zca = Normalizer(whiten="zca", eps=1e-6).fit(train_pixels)
    pca = Normalizer(whiten="pca", eps=1e-6).fit(train_pixels)
    P = zca.projection
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    assert np.linalg.eigvalsh(P).min() > 0
    x = centred(zca, held_out)
    Z = zca(held_out, np.float64)

    def moved(Y: np.ndarray) -> float:
        return float(np.mean(np.sum((Y - x) ** 2, axis=1)))

    rng = np.random.default_rng(3)
    rotations = [np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(5)]
    assert moved(Z) < moved(pca(held_out, np.float64))
    assert all(moved(Z) < moved(Z @ R) for R in rotations)


def test_truncated_zca_is_pca_rotated_back(train_pixels):
    zca = Normalizer(whiten="zca", components=10).fit(train_pixels)
    pca = Normalizer(whiten="pca", components=10).fit(train_pixels)
    U = pca.projection / np.linalg.norm(pca.projection, axis=0)
    np.testing.assert_allclose(zca.projection, pca.projection @ U.T, atol=1e-12)
    assert np.linalg.matrix_rank(zca.projection) == 10
    np.testing.assert_allclose(pca.image_weights(np.eye(10)), U)


def test_the_fit_reads_the_split_in_chunks(train_pixels, monkeypatch):
    whole = Normalizer(whiten="zca").fit(train_pixels[:300])
    monkeypatch.setattr(datalib.normalize, "_FIT_ROWS", 7)
    chunked = Normalizer(whiten="zca").fit(train_pixels[:300])
    np.testing.assert_allclose(chunked.projection, whole.projection, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("whiten", "components"), [("pca", 10), ("zca", 10), ("zca", None)])
def test_fewer_images_than_pixels_take_the_svd_and_give_the_same_projection(
        train_pixels, monkeypatch, whiten, components):
    few = train_pixels[:30]  # 30 images of 48 pixels: a singular covariance
    svd = Normalizer(whiten=whiten, components=components).fit(few)
    monkeypatch.setattr(Normalizer, "_eig_of_rows", Normalizer._eig_of_cov)
    eigh = Normalizer(whiten=whiten, components=components).fit(few)
    signs = np.sign(np.sum(svd.projection * eigh.projection, axis=0)) if whiten == "pca" else 1
    np.testing.assert_allclose(svd.projection, eigh.projection * signs, rtol=1e-8,
                               atol=1e-10 * np.abs(eigh.projection).max())


# -- batches in the training dtype -----------------------------------------------------------


def test_float32_batches_match_float64_and_reuse_one_cast(train_pixels, held_out):
    norm = Normalizer(whiten="pca", components=20).fit(train_pixels)
    exact = norm(held_out[:64], np.float64)
    fast = norm(held_out[:64])
    assert fast.dtype == np.float32 and fast.shape == (64, 20)
    np.testing.assert_allclose(fast, exact, rtol=1e-4, atol=1e-4)
    buffer = np.empty((64, 20), np.float32)
    assert norm(held_out[:64], out=buffer) is buffer
    np.testing.assert_array_equal(buffer, fast)
    assert set(norm._cast) == {np.dtype(np.float32), np.dtype(np.float64)}
    assert norm._cast[np.dtype(np.float64)] is norm.projection  # float64: no copy


def test_the_default_normalizer_is_unchanged(train_pixels):
    """No whitening: the same state keys as before whitening existed (old checkpoints and
    served models load) and the same numbers."""
    norm = Normalizer().fit(train_pixels)
    assert set(norm.state_dict()) == {"mode", "mean", "scale"}
    assert norm.projection is None and norm.out_dim == D
    f32 = np.float32
    expected = (train_pixels - norm.mean.astype(f32)) * (1.0 / norm.scale).astype(f32)
    np.testing.assert_array_equal(norm(train_pixels), expected)


# -- state --------------------------------------------------------------------------------


@pytest.mark.parametrize("whiten", ["pca", "zca"])
def test_state_round_trips_through_npz(train_pixels, held_out, tmp_path, whiten):
    norm = Normalizer("mean_image", whiten=whiten, components=16).fit(train_pixels)
    np.savez(tmp_path / "n.npz", **norm.state_dict())
    restored = Normalizer()
    with np.load(tmp_path / "n.npz", allow_pickle=False) as f:
        restored.load_state_dict({k: f[k] for k in f.files})
    assert (restored.mode, restored.whiten, restored.out_dim) == ("mean_image", whiten,
                                                                  norm.out_dim)
    np.testing.assert_array_equal(restored.projection, norm.projection)
    np.testing.assert_array_equal(restored(held_out[:50]), norm(held_out[:50]))
    restored.load_state_dict(Normalizer().fit(train_pixels).state_dict())
    assert restored.whiten == "none" and restored.projection is None


def _mutations(state: dict) -> dict[str, tuple[dict, str]]:
    P = state["projection"]
    return {
        "no projection": ({k: v for k, v in state.items() if k != "projection"}, "go together"),
        "unknown whitening": ({**state, "whiten": np.array("zaa")}, "data.whiten.name='zaa'"),
        "wrong rows": ({**state, "projection": P[:-1]}, r"\(47, 16\)"),
        "too many columns": ({**state, "projection": np.zeros((D, D + 1))}, r"\(48, 49\)"),
        "NaN": ({**state, "projection": np.where(np.eye(D, 16) > 0, np.nan, P)}, "finite"),
        "truncated zca": ({**state, "whiten": np.array("zca")}, "48 for zca"),
    }


@pytest.mark.parametrize("case", ["no projection", "unknown whitening", "wrong rows",
                                  "too many columns", "NaN", "truncated zca"])
def test_a_bad_state_is_refused(train_pixels, case):
    state = Normalizer(whiten="pca", components=16).fit(train_pixels).state_dict()
    bad, message = _mutations(state)[case]
    with pytest.raises(DataError, match=message):
        Normalizer().load_state_dict(bad)


def test_misuse_names_the_key():
    with pytest.raises(DataError, match=r"data\.whiten\.name"):
        Normalizer(whiten="zaa")
    with pytest.raises(DataError, match=r"data\.whiten\.eps"):
        Normalizer(whiten="zca", eps=0)
    with pytest.raises(DataError, match=r"data\.whiten\.components=49"):
        Normalizer(whiten="pca", components=49).fit(np.zeros((5, D), np.uint8))


# -- the config keys ----------------------------------------------------------------------


def test_the_keys_default_to_no_whitening_and_act_only_with_one():
    cfg = _compose([])
    assert (cfg.data.whiten.name, cfg.data.whiten.components, cfg.data.whiten.eps) == (
        Normalizer().whiten, Normalizer().components, Normalizer().eps)
    flat = configlib.flatten(OmegaConf.to_container(cfg))
    warned = configlib.inactive_overrides(flat, ["data.whiten.components", "data.whiten.eps"])
    assert len(warned) == 2 and "data.whiten.name" in warned[0]
    flat["data.whiten.name"] = "pca"
    assert configlib.inactive_overrides(flat, ["data.whiten.components"]) == []


@pytest.mark.parametrize(("override", "allowed"), [
    ("data.whiten.name=zaa", "one of ['none', 'pca', 'zca']"),
    ("data.whiten.components=0", "null (all 3072) or an integer in [1, 3072]"),
    ("data.whiten.components=3073", "an integer in [1, 3072]"),
    ("data.whiten.eps=0", "a finite number > 0"),
])
def test_a_bad_value_exits_2_naming_the_key(override, allowed, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mlp-train", "data=synthetic", override])
    with pytest.raises(SystemExit) as exit_:
        cli.train_main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert override.partition("=")[0] in err and allowed in err, err
    with pytest.raises(ValueError, match=override.partition("=")[0].replace(".", r"\.")):
        configlib.validate(_compose([override]))


def test_the_memory_estimate_follows_the_whitening():
    plain = budget.estimate([100], batch_size=200, n_train=500, n_val=100, n_test=100)
    pca = budget.estimate([100], batch_size=200, n_train=500, n_val=100, n_test=100,
                          whiten="pca", components=32)
    zca = budget.estimate([100], batch_size=200, n_train=500, n_val=100, n_test=100,
                          whiten="zca")
    assert plain.parts["whitening"] == 0
    assert pca.parts["parameters and gradients"] < plain.parts["parameters and gradients"]
    assert zca.parts["parameters and gradients"] == plain.parts["parameters and gradients"]
    assert 5 * 3072**2 * 8 < pca.parts["whitening"] < zca.parts["whitening"]


# -- the pipeline: fitted on the training split, checkpointed, resumed ----------------------------


def small_splits(val_seed: int = 2) -> datalib.Splits:
    """Splits of D-pixel images (what `build.build_trainer` takes); val and test from
    `val_seed`."""
    labels = np.random.default_rng(4).integers(0, 10, 2000)
    return datalib.Splits(correlated_pixels(1000, 1), labels[:1000],
                          correlated_pixels(500, val_seed), labels[1000:1500],
                          correlated_pixels(500, val_seed + 10), labels[1500:],
                          datalib.CLASSES, {})


SMALL = ["data=synthetic", "model.hidden_sizes=[8]", "trainer.epochs=1",
         "trainer.batch_size=100", "trainer.train_eval_size=100", "trainer.progress=false"]


def test_the_run_fits_the_whitening_on_the_training_split_only(tmp_path):
    cfg = _compose([*SMALL, "data.whiten.name=zca"])
    one = build.build_trainer(cfg, small_splits(val_seed=2), tmp_path)
    other = build.build_trainer(cfg, small_splits(val_seed=7), tmp_path)
    np.testing.assert_array_equal(one.normalizer.projection, other.normalizer.projection)
    np.testing.assert_array_equal(one.normalizer.mean, other.normalizer.mean)
    train = small_splits()
    reordered = replace(train, X_train=train.X_train[::-1].copy())  # same rows: same fit
    again = build.build_trainer(cfg, reordered, tmp_path).normalizer.projection
    np.testing.assert_allclose(again, one.normalizer.projection, atol=1e-10)
    other = replace(train, X_train=np.roll(train.X_train, 1, axis=1))  # other rows: not
    moved = build.build_trainer(cfg, other, tmp_path).normalizer.projection
    assert not np.allclose(moved, one.normalizer.projection, atol=1e-3)


def test_a_checkpoint_carries_the_whitening_and_is_checked_on_resume(tmp_path):
    splits = small_splits()
    pca = [*SMALL, "data.whiten.name=pca", "data.whiten.components=16",
           f"trainer.checkpoint_dir={tmp_path}"]
    first = build.build_trainer(_compose(pca), splits, tmp_path)
    assert first.model.arch.input_dim == 16
    path = first.fit().checkpoint
    resumed = build.build_trainer(_compose(pca), splits, tmp_path)
    resumed.normalizer.projection = resumed.normalizer.projection * 2  # the file's must win
    resumed.load_checkpoint(path)
    np.testing.assert_array_equal(resumed.normalizer.projection, first.normalizer.projection)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    bad = {**arrays, "norm/projection": np.full_like(arrays["norm/projection"], np.inf)}
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(CheckpointError, match="norm/projection holds NaN or infinite"):
        resumed.load_checkpoint(tmp_path / "bad.npz")
    wider = build.build_trainer(_compose([*pca, "model.hidden_sizes=[8]",
                                        "data.whiten.components=20"]), splits, tmp_path)
    with pytest.raises(CheckpointError, match="arch"):
        wider.load_checkpoint(path)


def test_a_zca_checkpoint_resumes_neither_a_pca_nor_an_unwhitened_run(tmp_path):
    """All components: the same architecture, the whitening alone differs."""
    splits = small_splits()
    zca = [*SMALL, "data.whiten.name=zca", f"trainer.checkpoint_dir={tmp_path}"]
    path = build.build_trainer(_compose(zca), splits, tmp_path).fit().checkpoint
    pca = build.build_trainer(_compose([*zca, "data.whiten.name=pca"]), splits, tmp_path)
    with pytest.raises(CheckpointError, match=r"norm/whiten is .*'zca'.*this run has 'pca'"):
        pca.load_checkpoint(path)
    unwhitened = build.build_trainer(_compose(SMALL), splits, tmp_path)
    with pytest.raises(CheckpointError, match=r"norm entries .*unexpected \['projection', "
                                              r"'whiten'\]"):
        unwhitened.load_checkpoint(path)


# -- a whitened run, from the config to the served model -------------------------------------


@pytest.mark.parametrize("views", [["data.augment.test_flip=false"],
                                   ["data.augment.test_flip=true", "data.augment.test_shift=2"]])
def test_a_pca_run_trains_checks_its_gradients_and_serves_what_it_evaluated(tmp_path, views):
    cfg = _compose(["data=synthetic", "data.whiten.name=pca", "data.whiten.components=32",
                    *views,
                    "model.hidden_sizes=[16]", "trainer.epochs=3", "trainer.batch_size=50",
                    "trainer.train_eval_size=100", "trainer.progress=false", "optim.lr=0.02",
                    "gradcheck.max_width=8", "gradcheck.num_checks=10"])
    configlib.validate(cfg)
    splits = build.load_data(cfg)
    trainer = build.build_trainer(cfg, splits, tmp_path)
    assert trainer.normalizer.out_dim == trainer.model.arch.input_dim == 32
    assert trainer._bufs[0].shape == (50, 32)
    result = trainer.fit()
    assert result.test_acc > 0.3  # 10 classes: chance is 0.1
    report = build.run_gradcheck(cfg)
    assert report.passed
    assert {r.shape for r in report.rows if r.name == "W1"} == {(32, 8)}
    plots.weights_figure(trainer.normalizer.image_weights(trainer.model.params["W1"]))

    served = serving._load_pyfunc(str(serving.save(
        tmp_path / "model", trainer.model, trainer.normalizer, splits.classes,
        trainer.test_scoring)))
    assert served.scoring.views == (10 if "data.augment.test_shift=2" in views else 1)
    probs = served.predict(splits.X_test)
    assert probs.shape == (len(splits.y_test), 10)
    np.testing.assert_array_equal(probs.argmax(axis=1), result.test_pred)
    loss = -np.mean(np.log(probs[np.arange(len(probs)), splits.y_test]))
    assert loss == pytest.approx(result.test_loss, rel=1e-5)
    with pytest.raises(ValueError, match=r"expected \(N, 3072\) pixel values"):
        served.predict(np.zeros((2, 32)))
