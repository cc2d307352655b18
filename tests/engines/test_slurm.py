"""A sweep through a real SLURM cluster (`hydra/launcher=submitit_slurm`): the jobs are SLURM
array tasks, each logs its child run (with its job id, node and log files) into one shared
store, the parent ends with the report; a job too big for the partition is refused before
submission, and cancelling the sweep (Ctrl-C, SIGTERM) cancels its jobs.
Marked `slurm` (not in the default run): `pytest -m slurm`; as root the fixture starts a
one-node cluster with engines/slurm-up.sh when none runs."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import tool
from helpers import FAST, GRID, check_grid, parent_and_children, sweep

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# What a real cluster needs too (README.md, "Team scale"): the partition, a time limit, the
# CPUs of one job; memory is not enforced by this one-node cluster's CR_Core.
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
         "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1"]


def test_a_2x2_sweep_runs_as_slurm_jobs_into_one_store(tmp_path: Path, run_env: dict):
    out = sweep([*FAST, *GRID, *SLURM], tmp_path, run_env, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    check_grid(tmp_path / "mlflow.db")

    # The jobs were SLURM array tasks <job>_<0..3>: submitit's sbatch script asked for the
    # partition, and each task left its log and result in the sweep's .submitit folder.
    [submitit] = tmp_path.glob("multirun/*/*/.submitit")
    [script] = submitit.glob(".submission_file_*.sh")
    text = script.read_text()
    assert "#SBATCH --partition=debug" in text and "#SBATCH --array=0-3" in text
    tasks = sorted(p.name for p in submitit.iterdir() if p.is_dir() and "_" in p.name)
    job_id = tasks[0].split("_")[0]
    assert job_id.isdigit() and tasks == [f"{job_id}_{i}" for i in range(4)]
    for task in tasks:
        assert (submitit / task / f"{task}_0_result.pkl").exists(), task
    queue = subprocess.run(["squeue", "--noheader", f"--jobs={job_id}"], capture_output=True,
                           text=True, timeout=30)
    assert queue.stdout.strip() == "", f"job {job_id} still queued: {queue.stdout}"
    _, parents, children = parent_and_children(tmp_path / "mlflow.db")
    for child in children:
        tags = child.data.tags
        task = f"{tags['slurm.array_job_id']}_{tags['slurm.array_task_id']}"
        assert task in tasks and tags["slurm.partition"] == "debug" and tags["slurm.node"]
        assert tags["slurm.stdout"] == str(submitit / task / f"{task}_0_log.out")
    assert parents[0].data.tags["slurm.array_job_id"] == job_id
    assert f"SLURM job {job_id}: " in out.stderr + out.stdout


def _queued() -> str:
    return subprocess.run(["squeue", "--noheader"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_a_job_too_big_for_the_partition_is_refused_before_submission(
        tmp_path: Path, run_env: dict):
    big = [s for s in SLURM if "cpus_per_task" not in s] + ["hydra.launcher.cpus_per_task=64"]
    out = sweep([*FAST, *GRID, *big], tmp_path, run_env, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert ("hydra.launcher.cpus_per_task=64 is not allowed: expected at most "
            in out.stderr), out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [] and _queued() == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cancelling_a_sweep_cancels_its_jobs(tmp_path: Path, run_env: dict, signum: int):
    long = [*FAST, "trainer.epochs=500", "data.synthetic.n_train=2000"]
    proc = subprocess.Popen([tool("mlp-train"), "-m", *long, *GRID, *SLURM], cwd=tmp_path,
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    db = tmp_path / "mlflow.db"
    deadline = time.monotonic() + 180
    running = []
    while len(running) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1)
        # The parent's file is written once the store exists (reading a store while it is
        # being created races in MLflow's migrations); two jobs fit the node at once.
        if list(tmp_path.glob("multirun/*/*/mlflow_parent.json")):
            running = [c for c in parent_and_children(db)[2] if c.info.status == "RUNNING"]
    assert len(running) >= 2, "no job started training in 180 s"
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    deadline = time.monotonic() + 60
    while _queued() and time.monotonic() < deadline:
        time.sleep(1)
    assert _queued() == "", "jobs outlived their sweep"
    _, parents, children = parent_and_children(db)
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags["slurm.cancelled"] == "the sweep was interrupted"
    assert children and {c.info.status for c in children} == {"KILLED"}, [
        (c.info.run_name, c.info.status) for c in children]
