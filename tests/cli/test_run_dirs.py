"""Every run its own output folder: runs started together never share a folder, and so
never take another run's config files or checkpoint."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import tool
from helpers import FAST, runs_of
from mlflow import MlflowClient


@pytest.mark.e2e
def test_runs_started_together_have_their_own_folders(tmp_path: Path, run_env: dict):
    # The store exists first: concurrent first use of a fresh SQLite store races in MLflow.
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("mlp-lab")
    procs = [subprocess.Popen([tool("mlp-train"), *FAST, "trainer.epochs=1", f"seed={seed}"],
                              cwd=tmp_path, env=run_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs[0][-3000:]

    folders = sorted(p for p in tmp_path.glob("outputs/*/*") if p.is_dir())
    assert len(folders) == 4
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 4
    for run in runs:
        checkpoint = Path(run.data.tags["checkpoint"])
        folder = checkpoint.parent.parent
        assert folder in folders and checkpoint == folder / "checkpoints" / "last.npz"
        with np.load(checkpoint) as f:
            assert json.loads(str(f["meta"]))["extra"]["run_id"] == run.info.run_id
        config = (folder / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={run.data.params['seed']}" in config
    assert len({r.data.tags["checkpoint"] for r in runs}) == 4
