"""What the jobs of a sweep in one process share (`mlp.cli.build`): the splits, the fitted
normalizer's state and the gradient check, only when everything they are made from
agrees; each job still gets its own normalizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from mlp.cli import build
from mlp.config import schema as configlib

configlib.register()

SMALL = ["data=synthetic", "data.synthetic.n_train=200", "data.synthetic.n_test=50",
         "data.val_size=40", "model.hidden_sizes=[8]", "gradcheck.max_width=4",
         "gradcheck.num_checks=3", "trainer.progress=false"]


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        return compose(config_name="config",
                       overrides=[*SMALL, f"data.root={tmp_path}", *overrides])


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(build, "_last_splits", None)
    monkeypatch.setattr(build, "_last_fit", None)
    monkeypatch.setattr(build, "_checks", {})


def test_jobs_that_read_the_same_data_share_the_splits(tmp_path: Path):
    splits = build.load_data(_cfg(tmp_path, "optim.lr=0.01"))
    assert build.load_data(_cfg(tmp_path, "optim.lr=0.1", "data.normalize=none")) is splits
    other = build.load_data(_cfg(tmp_path, "data.val_size=50"))
    assert other is not splits and len(other.y_val) == 50


def test_each_job_gets_its_own_normalizer_fitted_once(tmp_path: Path, monkeypatch):
    cfg = _cfg(tmp_path)
    splits = build.load_data(cfg)
    first = build.fit_normalizer(cfg, splits)
    fits, real_fit = [], type(first).fit
    monkeypatch.setattr(type(first), "fit", lambda self, X: fits.append(X) or real_fit(self, X))
    second = build.fit_normalizer(cfg, splits)
    assert fits == [] and second is not first
    np.testing.assert_array_equal(second.mean, first.mean)
    second.mean[:] = 0  # a resumed job loads its own state: the other job's is untouched
    assert np.any(first.mean != 0)
    build.fit_normalizer(_cfg(tmp_path, "data.normalize=mean_image"), splits)
    assert len(fits) == 1  # other preprocessing: fitted


def test_the_gradient_check_is_shared_when_everything_it_reads_agrees(tmp_path: Path):
    report = build.run_gradcheck(_cfg(tmp_path, "optim.lr=0.01"))
    assert report.passed
    assert build.run_gradcheck(_cfg(tmp_path, "optim.lr=0.3")) is report  # own step rate
    for differs in ("model.reg=0.1", "optim.momentum=0.5", "seed=1", "gradcheck.samples=4"):
        assert build.run_gradcheck(_cfg(tmp_path, "optim.lr=0.01", differs)) is not report
