"""A sweep through a real SLURM cluster (`hydra/launcher=submitit_slurm`): the jobs are SLURM
array tasks, each logs its child run into one shared store, the parent ends with the report.
Marked `slurm` (not in the default run): `pytest -m slurm`; as root the fixture starts a
one-node cluster with engines/slurm-up.sh when none runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import FAST, GRID, check_grid, sweep

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
