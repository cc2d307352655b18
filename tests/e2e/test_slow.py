"""End-to-end on the full CIFAR-10 archive (slow: `pytest -m slow`, needs CIFAR10_ARCHIVE)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import tool
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture
def archive() -> str:
    path = os.environ.get("CIFAR10_ARCHIVE")
    if not path or not Path(path).is_file():
        pytest.skip("set CIFAR10_ARCHIVE=/path/to/cifar-10-python.tar.gz to run")
    return path


def test_cs231n_two_layer_reaches_50_percent(tmp_path: Path, run_env: dict, archive: str):
    start = time.time()
    out = subprocess.run([tool("mlp-train"), "experiment=cs231n_two_layer",
                          f"data.archive={archive}", "trainer.progress=false"],
                         cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=900)
    elapsed = time.time() - start
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("mlp-lab").experiment_id])[0]
    assert run.data.params["data.limit"] == "null"
    assert int(run.data.tags["data.n_train"]) == 45000
    print(f"acc/test={run.data.metrics['acc/test']:.4f} in {elapsed:.0f} s")
    assert run.data.metrics["acc/test"] >= 0.50
