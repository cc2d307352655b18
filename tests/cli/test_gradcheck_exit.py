"""`mlp-gradcheck` exits 3 when the training step in float32 fails its check, even with
the float64 gradient check passed, and records the failure in its run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient

from mlp.cli import build, exits
from mlp.cli import gradcheck as cli
from mlp.core.gradcheck import PrecisionCheck

FAILED = PrecisionCheck("float32", 2, 1e-4, {"W1": 3e-4, "b1": 1e-6}, 1e-7, 0,
                        tols={"W1": 2e-4, "b1": 2e-4})


def test_a_failed_float32_step_exits_3_and_is_recorded(tmp_path: Path, monkeypatch,
                                                        capsys: pytest.CaptureFixture):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "run_step_precision", lambda cfg: FAILED)
    monkeypatch.setattr(sys, "argv", ["mlp-gradcheck", "data=synthetic",
                                      "model.hidden_sizes=[6]", "gradcheck.max_width=4",
                                      "gradcheck.num_checks=3"])
    try:
        with pytest.raises(SystemExit) as exited:
            cli.gradcheck_main()
    finally:
        GlobalHydra.instance().clear()
    assert exited.value.code == exits.EXIT_GRADCHECK == 3
    assert "training step in float32: " in capsys.readouterr().out and not FAILED.passed
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("mlp-lab").experiment_id])
    assert run.data.tags["gradcheck.passed"] == "true"  # the float64 check passed
    assert run.data.tags["gradcheck.step_float32"].startswith("failed W1 3.00e-04 (tol 2.00e-04")
