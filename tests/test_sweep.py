"""Sweeps (`mlp-train -m`): a parent run with child runs for every launcher, failures that
do not stop the sweep, skipping finished configs and resuming killed ones."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import tool
from mlflow import MlflowClient

from mlp.tracking import keys as metrics

FAST = ["data=synthetic", "data.synthetic.n_train=300", "data.synthetic.n_test=100",
        "data.val_size=60", "model.hidden_sizes=[16]", "trainer.epochs=2",
        "trainer.batch_size=50", "trainer.train_eval_size=100", "trainer.progress=false",
        "gradcheck.enabled=false", "tracking.plots=false", "tracking.log_model=false"]
GRID = ["optim.lr=0.01,0.03", "model.reg=0,0.001"]


def sweep(args: list[str], cwd: Path, env: dict, timeout: float = 300
          ) -> subprocess.CompletedProcess:
    return subprocess.run([tool("mlp-train"), "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parent_and_children(db: Path) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("mlp-lab")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlp.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def check_grid(db: Path, models: bool = False) -> None:
    """The sweep contract: the parent summarizes (shared config as params, swept keys as
    tags, the best child's metrics under the children's keys, a description, the figures
    at the top level, the best model registered as @champion); children are named by their
    swept values and tagged with the sweep."""
    client, parents, children = parent_and_children(db)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted((c.data.params["optim.lr"], c.data.params["model.reg"]) for c in children) == [
        ("0.01", "0.0"), ("0.01", "0.001"), ("0.03", "0.0"), ("0.03", "0.001")]
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.info.run_name for c in children) == [
        "reg=0 lr=1e-2", "reg=0 lr=3e-2", "reg=1e-3 lr=1e-2", "reg=1e-3 lr=3e-2"]
    name = parent.data.tags["mlp.sweep.name"]
    assert {c.data.tags["mlp.sweep.name"] for c in children} == {name}

    tags, params = parent.data.tags, parent.data.params
    assert tags["mlp.swept"] == "model.reg optim.lr"
    assert tags["mlp.swept.optim.lr"] == "0.01,0.03" and tags["mlp.swept.model.reg"] == "0,0.001"
    assert "optim.lr" not in params and "model.reg" not in params
    assert params["model.hidden_sizes"] == "[16]" and params["trainer.epochs"] == "2"
    assert params == {k: v for k, v in children[0].data.params.items()
                      if k not in ("optim.lr", "model.reg")}

    from mlp.sweeps import report

    table = report.build_report(client, "mlp-lab", parent.info.run_id)
    assert len(table.rows) == 4
    accs = [row["val_acc"] for row in table.rows]
    assert accs == sorted(accs, reverse=True)
    assert set(table.swept) == {"optim.lr", "model.reg"}
    best = client.get_run(tags["mlp.sweep.best_run_id"])
    assert best.info.run_id == table.best["run_id"]
    for key in (metrics.ACC_BEST_VAL, metrics.ACC_TEST, metrics.ACC_GAP, metrics.LOSS_VAL):
        assert parent.data.metrics[key] == best.data.metrics[key], key
    assert f"Best: **{best.info.run_name}**" in tags["mlflow.note.content"]
    assert "`optim.lr` in 0.01,0.03" in tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "val_acc_heatmap.png", "top_curves.png"} <= artifacts
    if models:
        registered = tags["mlp.sweep.registered_model"]
        model_name = registered.split("@")[0]
        version = client.get_model_version_by_alias(model_name, "champion")
        assert version.run_id == best.info.run_id


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
