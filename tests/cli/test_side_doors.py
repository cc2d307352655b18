"""The installed `mlp-train` refuses a config whatever set it, before anything exists:
exit 2, one message naming key, value and what is allowed, and nothing in the directory
it ran in (no outputs/, multirun/, mlflow.db)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import mlp_train

pytestmark = pytest.mark.e2e

REFUSED = [  # (command line, what stderr must say)
    (["data.augment.flip=2"], "data.augment.flip=2 is not allowed: expected true or false"),
    (["~model.reg"], "~model.reg is not allowed: expected a value for model.reg"),
    (["+hydra.launcher.n_job=2"],
     "hydra.launcher.n_job is not a setting of hydra/launcher=basic: expected one of"),
    (["-m", "optim.lr=interval(-1,1)"],
     "optim.lr=interval(-1,1) is not allowed: expected values a grid can list"),
    (["-m", "hydra/sweeper=mlp_optuna", "optim.lr=interval(-1,1)"],
     "optim.lr=-1.0 is not allowed: expected a finite number > 0"),
    (["-m", "hydra.sweeper.params.model.activaton=relu,tanh"],
     "hydra.sweeper.params.model.activaton is not a configuration key; did you mean "
     "model.activation?"),
    (["-m", "optim.momentum=0.9,5"], "optim.momentum=5.0 is not allowed: expected"),
    (["-m", "data.limit=3000", "trainer.epochs=2", "model.activation=relu,tanh"],
     "data.val_size=5000 is not allowed: expected fewer images than data.limit=3000"),
    (["data.archive=/nonexistent"],
     "data.archive='/nonexistent' is not allowed: expected null or an existing file"),
    (["trainer.resume=/nonexistent.npz"],
     "trainer.resume='/nonexistent.npz' is not allowed: expected null or an existing"),
]


@pytest.mark.parametrize(("args", "says"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_anything_exists(args: list[str], says: str, tmp_path: Path,
                                        run_env: dict):
    out = mlp_train(args, tmp_path, run_env)
    assert out.returncode == 2, out.stderr
    assert f"mlp-lab: invalid configuration: {says}" in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_preset_from_a_config_dir_is_refused_too(tmp_path: Path, run_env: dict):
    presets = tmp_path / "conf" / "experiment"
    presets.mkdir(parents=True)
    (presets / "mine.yaml").write_text("# @package _global_\ndata:\n  augment:\n    flip: 2\n")
    work = tmp_path / "work"
    work.mkdir()
    out = mlp_train(["--config-dir", str(tmp_path / "conf"), "experiment=mine"], work, run_env)
    assert out.returncode == 2
    assert "data.augment.flip=2 is not allowed: expected true or false" in out.stderr
    assert list(work.iterdir()) == []


def test_mlp_gradcheck_is_checked_the_same_way(tmp_path: Path, run_env: dict):
    out = mlp_train(["gradcheck.enabled=1"], tmp_path, run_env, command="mlp-gradcheck")
    assert out.returncode == 2
    assert "gradcheck.enabled=1 is not allowed: expected true or false" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_data_problem_is_refused_before_anything_exists(tmp_path: Path, run_env: dict):
    """A run whose data cannot be had (here an archive that is not the one its md5 names)
    exits 2 before Hydra makes its folder or the store its file."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"not the archive")
    work = tmp_path / "work"
    work.mkdir()
    env = {**run_env, "MLP_LAB_DATA": str(tmp_path / "data")}
    out = mlp_train([f"data.archive={archive}", "data.md5=" + "0" * 32], work, env)
    assert out.returncode == 2, out.stderr
    assert re.search(r"mlp-lab: data problem: .*cifar-10-python.tar.gz: md5 is [0-9a-f]{32}, "
                     r"expected 0{32} \(data.md5\)", out.stderr), out.stderr
    assert "Traceback" not in out.stderr
    assert list(work.iterdir()) == []
