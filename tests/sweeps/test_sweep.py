"""Sweeps (`mlp-train -m`): a parent run with child runs for every launcher, failures that
do not stop the sweep but fail it at its end (exit 1, a FAILED parent, a closing line),
skipping finished configs and resuming killed ones into the same run, from their own
checkpoint, each job in its own checkpoint folder."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tool
from helpers import FAST, GRID, check_grid, mlp_train, parent_and_children, sweep

from mlp.sweeps.callback import OUTCOME_TAG, PARENT_FILE
from mlp.tracking import glance
from mlp.tracking import keys as metrics
from mlp.tracking import spool as spoollib


def last_line(out: subprocess.CompletedProcess) -> str:
    return (out.stdout if out.returncode == 0 else out.stderr).strip().splitlines()[-1]


def check_failed_parent(db: Path, outcome: str) -> None:
    """The parent is FAILED and its tag and description say the same."""
    _, [parent], _ = parent_and_children(db)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[OUTCOME_TAG] == outcome
    assert glance.headline(parent.data.tags["mlflow.note.content"]).startswith(
        f"<b>Outcome: {outcome}</b>")


@pytest.mark.e2e
def test_grid_with_the_basic_launcher_then_rerun_runs_nothing_new(tmp_path: Path,
                                                                   run_env: dict):
    with_models = [*FAST, "tracking.log_model=true", *GRID]
    out = sweep(with_models, tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert last_line(out) == "mlp-lab: 4 of 4 children finished"
    check_grid(tmp_path / "mlflow.db", models=True)

    again = sweep(with_models, tmp_path, run_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipping: this config already finished") == 4
    _, parents, children = parent_and_children(tmp_path / "mlflow.db")
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags[OUTCOME_TAG] == "4 of 4 finished"


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
    out = sweep([*FAST, "optim.name=sgd", "optim.lr=0.01,1e6", "model.activation=relu,tanh"],
                tmp_path, run_env)
    assert out.returncode == 1, out.stderr[-3000:]
    _, _, children = parent_and_children(tmp_path / "mlflow.db")
    assert len(children) == 4
    by_status = sorted((c.info.status, c.data.tags.get("error.type", "")) for c in children)
    assert by_status == [("FAILED", "DivergenceError"), ("FAILED", "DivergenceError"),
                         ("FINISHED", ""), ("FINISHED", "")]
    assert last_line(out).startswith("mlp-lab: 2 of 4 children failed: ")
    check_failed_parent(tmp_path / "mlflow.db", "2 of 4 failed")


@pytest.mark.e2e
def test_a_diverging_child_in_another_process_fails_the_sweep(tmp_path: Path, run_env: dict):
    # joblib: the parent learns how its children ended from the store, not from memory.
    out = sweep([*FAST, "optim.lr=0.01,1e6", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                tmp_path, run_env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert last_line(out).startswith(
        "mlp-lab: 1 of 2 children failed: lr=1e6: training diverged at step ")
    check_failed_parent(tmp_path / "mlflow.db", "1 of 2 failed")


@pytest.mark.e2e
def test_a_sweep_whose_every_child_fails_at_data_time_exits_1(tmp_path: Path, run_env: dict):
    # A broken archive: every check before launch accepts it (an existing file), only
    # reading it refuses it.
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tar archive" * 64)
    args = [a for a in FAST if not a.startswith(("data=", "data.synthetic"))]
    out = sweep([*args, "data=cifar10", f"data.archive={broken}", "optim.lr=0.01,0.03"],
                tmp_path, run_env)
    assert out.returncode == 1, out.stderr[-3000:]
    line = last_line(out)
    assert line.startswith("mlp-lab: 2 of 2 children failed: lr=1e-2: ")
    assert "; lr=3e-2: " in line and "broken.tar.gz" in line
    check_failed_parent(tmp_path / "mlflow.db", "2 of 2 failed")


@pytest.mark.e2e
def test_each_job_has_its_own_folder_under_trainer_checkpoint_dir(tmp_path: Path,
                                                                  run_env: dict):
    shared = tmp_path / "checkpoints"
    out = sweep([*FAST, "optim.lr=0.01,0.03", f"trainer.checkpoint_dir={shared}"], tmp_path,
                run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, _, children = parent_and_children(tmp_path / "mlflow.db")
    paths = {c.data.tags["checkpoint"]: c.data.tags["mlp.config_hash"] for c in children}
    assert len(paths) == 2
    for path, config_hash in paths.items():
        assert path == str(shared / config_hash / "last.npz") and Path(path).is_file()
    assert sorted(p.name for p in shared.iterdir()) == sorted(paths.values())


def _finished_child_marked_killed(tmp_path: Path, run_env: dict, args: list[str]):
    """A one-job sweep that finished, then its child marked KILLED as the reaper does when
    the run's end could not reach the store; returns (client, parent file, child)."""
    out = sweep(args, tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    client, _, [child] = parent_and_children(tmp_path / "mlflow.db")
    client.set_terminated(child.info.run_id, status="KILLED")
    [parent_file] = tmp_path.glob(f"multirun/*/*/{PARENT_FILE}")
    return client, json.loads(parent_file.read_text()), child


@pytest.mark.e2e
def test_a_finished_child_whose_end_was_spooled_is_not_trained_again(tmp_path: Path,
                                                                     run_env: dict):
    args = [*FAST, "optim.lr=0.01"]
    _, parent, child = _finished_child_marked_killed(tmp_path, run_env, args)
    checkpoint = Path(child.data.tags["checkpoint"])
    written = checkpoint.stat().st_mtime_ns
    spoollib.Spool(spoollib.beside(checkpoint)).append([spoollib.status_record(
        parent["uri"], child.info.run_id, "FINISHED", child.info.end_time)])

    again = sweep(args, tmp_path, run_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping: this config already finished" in again.stdout + again.stderr
    _, _, children = parent_and_children(tmp_path / "mlflow.db")
    assert [(c.info.run_id, c.info.status) for c in children] == [
        (child.info.run_id, "FINISHED")]
    assert checkpoint.stat().st_mtime_ns == written
    assert not spoollib.beside(checkpoint).exists()


@pytest.mark.e2e
def test_a_killed_child_refuses_another_runs_checkpoint(tmp_path: Path, run_env: dict):
    args = [*FAST, "optim.lr=0.01"]
    client, _, child = _finished_child_marked_killed(tmp_path, run_env, args)
    other = tmp_path / "other"
    alone = mlp_train([*FAST, "optim.lr=0.02", f"trainer.checkpoint_dir={other}"], tmp_path,
                      run_env)
    assert alone.returncode == 0, alone.stderr[-3000:]
    with np.load(other / "last.npz") as f:
        other_run = json.loads(str(f["meta"]))["extra"]["run_id"]

    again = sweep([*args, f"trainer.resume={other / 'last.npz'}"], tmp_path, run_env)
    assert again.returncode == 1, again.stderr[-3000:]
    line = last_line(again)
    assert line.startswith(f"mlp-lab: 1 of 1 children failed: {child.info.run_name}: "
                           "trainer.resume: checkpoint ")
    assert f"written by run {other_run}, not by run {child.info.run_id}" in line
    assert client.get_run(child.info.run_id).info.status == "KILLED"
    assert client.get_run(other_run).info.status == "FINISHED"


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
    assert f"resuming killed run {killed}" in out.stdout + out.stderr
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
