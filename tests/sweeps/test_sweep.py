"""Sweeps (`mlp-train -m`): a parent run with child runs for every launcher, failures that
do not stop the sweep, skipping finished configs and resuming killed ones."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import tool
from helpers import FAST, GRID, check_grid, parent_and_children, sweep

from mlp.tracking import keys as metrics


@pytest.mark.e2e
def test_grid_with_the_basic_launcher_then_rerun_runs_nothing_new(tmp_path: Path,
                                                                   run_env: dict):
    with_models = [*FAST, "tracking.log_model=true", *GRID]
    out = sweep(with_models, tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    check_grid(tmp_path / "mlflow.db", models=True)

    again = sweep(with_models, tmp_path, run_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipping: this config already finished") == 4
    _, parents, children = parent_and_children(tmp_path / "mlflow.db")
    assert len(parents) == 1 and len(children) == 4


@pytest.mark.e2e
def test_grid_with_joblib_shares_the_cores(tmp_path: Path, run_env: dict):
    env = {k: v for k, v in run_env.items() if not k.endswith("_NUM_THREADS")}
    out = sweep([*FAST, *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path,
                env)
    assert out.returncode == 0, out.stderr[-3000:]
    check_grid(tmp_path / "mlflow.db")
    _, _, children = parent_and_children(tmp_path / "mlflow.db")
    import os

    expected = str(max(1, (os.cpu_count() or 1) // 2))
    assert {c.data.tags["mlp.blas_threads"] for c in children} == {expected}


@pytest.mark.e2e
def test_submitit_local_jobs_are_children_of_the_parent(tmp_path: Path, run_env: dict):
    out = sweep([*FAST, "optim.lr=0.01,0.03", "hydra/launcher=submitit_local"], tmp_path,
                run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, parents, children = parent_and_children(tmp_path / "mlflow.db")
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


@pytest.mark.e2e
def test_failing_jobs_are_recorded_and_the_sweep_goes_on(tmp_path: Path, run_env: dict):
    out = sweep([*FAST, "optim.name=sgd", "optim.lr=0.01,1e6", "data.val_size=60,5000"],
                tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, parents, children = parent_and_children(tmp_path / "mlflow.db")
    assert len(children) == 4
    by_status = sorted((c.info.status, c.data.tags.get("error.type", "")) for c in children)
    assert by_status == [("FAILED", "ConfigError"), ("FAILED", "ConfigError"),
                         ("FAILED", "DivergenceError"), ("FINISHED", "")]
    assert parents[0].info.status == "FINISHED"


@pytest.mark.e2e
def test_killed_sweep_resumes_the_killed_job(tmp_path: Path, run_env: dict):
    args = [*FAST, "data.synthetic.n_train=3000", "data.val_size=300", "model.hidden_sizes=[64]",
            "trainer.epochs=25", "optim.lr=0.01"]
    proc = subprocess.Popen([tool("mlp-train"), "-m", *args], cwd=tmp_path, env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("multirun/*/*/*/checkpoints/last.npz")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    client, parents, children = parent_and_children(tmp_path / "mlflow.db")
    assert [c.info.status for c in children] == ["KILLED"]
    assert parents[0].info.status == "KILLED"
    killed = children[0].info.run_id
    done = len(client.get_metric_history(killed, metrics.ACC_VAL))
    if done >= 25:
        pytest.skip("the job finished before the signal arrived")

    out = sweep(args, tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming killed run" in out.stdout + out.stderr
    _, parents, children = parent_and_children(tmp_path / "mlflow.db")
    assert [(c.info.run_id, c.info.status) for c in children] == [(killed, "FINISHED")]
    assert [p.step for p in client.get_metric_history(killed, metrics.ACC_VAL)] == list(
        range(1, 26))
    assert parents[0].info.status == "FINISHED"


@pytest.mark.parametrize(("n_jobs", "cores", "threads"),
                         [(1, 2, 2), (2, 2, 1), (4, 2, 1), (-1, 2, 1), (-1, 8, 1),
                          (-2, 8, 1), (2, 8, 4), (-5, 8, 2)])
def test_blas_threads_share_the_cores(n_jobs: int, cores: int, threads: int):
    from mlp.sweeps.callback import blas_threads

    assert blas_threads(n_jobs, cores) == threads
