"""mlp/sweeps/slurm.py without a cluster: a job's request against a partition's nodes,
SLURM's time format, and the watch that reports and cancels a sweep's jobs (fed with
canned `sinfo`/`squeue` output)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from mlp.errors import ConfigError
from mlp.sweeps import slurm

SINFO = "debug*|up|2|24105|(null)|infinite\ngpu|up|32+|192000|gpu:a100:4(S:0-1)|2-00:00:00\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("infinite", None), ("UNLIMITED", None), ("30", 30), ("30:30", 30.5), ("2:00:00", 120),
    ("1-00:00:00", 1440), ("1-2", 1560), ("1-02:30", 1590),
])
def test_minutes(text, expected):
    assert slurm.minutes(text) == expected


def test_parse_sinfo_default_and_named_partitions():
    debug = slurm.parse_sinfo(SINFO, None)
    assert debug == slurm.Partition("debug", True, 2, 24105, 0, None)
    gpu = slurm.parse_sinfo(SINFO, "gpu")
    assert (gpu.cpus, gpu.mem_mb, gpu.gpus, gpu.max_time_min) == (32, 192000, 4, 2880)


def test_an_unknown_partition_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"hydra.launcher.partition='gpus'.*debug, gpu"):
        slurm.parse_sinfo(SINFO, "gpus")


@pytest.mark.parametrize(("asked", "key", "allowed"), [
    ({"cpus_per_task": 4}, "hydra.launcher.cpus_per_task=4", "at most 2 "),
    ({"cpus_per_task": 2, "tasks_per_node": 2}, "cpus_per_task=2", "at most 1 "),
    ({"mem_gb": 64}, "hydra.launcher.mem_gb=64", "at most 23 "),
    ({"gpus_per_node": 1}, "hydra.launcher.gpus_per_node=1", "at most 0 "),
])
def test_a_job_too_big_for_the_partition_is_refused(asked, key, allowed):
    with pytest.raises(ConfigError, match=rf"{key} is not allowed: expected {allowed}"):
        slurm.check_request({"timeout_min": 10, **asked}, slurm.parse_sinfo(SINFO, None))


def test_a_job_that_fits_passes_and_time_limits_hold():
    gpu = slurm.parse_sinfo(SINFO, "gpu")
    slurm.check_request({"cpus_per_task": 8, "mem_gb": 64, "gpus_per_node": 4,
                         "timeout_min": 2880}, gpu)
    with pytest.raises(ConfigError, match=r"timeout_min=2881 .*at most 2880"):
        slurm.check_request({"timeout_min": 2881}, gpu)


def test_a_down_partition_is_refused():
    down = slurm.parse_sinfo("debug*|down|2|1000|(null)|infinite\n", None)
    with pytest.raises(ConfigError, match="a partition that is up"):
        slurm.check_request({}, down)


def test_squeue_lines_of_other_sweeps_are_not_ours(tmp_path: Path):
    mine, other = tmp_path / "a" / ".submitit", tmp_path / "b" / ".submitit"
    out = (f"12_[2-3]|PENDING|Resources|{mine}/.submission_file_x.sh\n"
           f"12_0|RUNNING|None|{mine}/.submission_file_x.sh\n"
           f"13_0|RUNNING|None|{other}/.submission_file_y.sh\n")
    jobs = slurm.parse_squeue(out, mine)
    assert [j.id for j in jobs] == ["12_[2-3]", "12_0"] and {j.array_id for j in jobs} == {"12"}
    assert slurm.summary(jobs) == "2 pending (Resources), 1 running"
    assert slurm.summary([]) == "none queued"


@pytest.mark.parametrize(("job_id", "tasks"), [("12_3", 1), ("12", 1), ("12_[2-3]", 2),
                                               ("12_[0-9%2]", 10), ("12_[1,4-6]", 4)])
def test_a_pending_array_range_counts_its_tasks(job_id: str, tasks: int):
    assert slurm.Job(job_id, "PENDING", "Priority").tasks == tasks


class FakeCluster:
    """`squeue` answers from `queue` (lines for the watched folder); `scancel` empties it."""

    def __init__(self, folder: Path, queue: list[tuple[str, str, str]]) -> None:
        self.folder, self.queue, self.calls = folder, queue, []

    def __call__(self, argv, **_) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        if argv[0] == "scancel":
            self.queue = []
        lines = "".join(f"{i}|{s}|{r}|{self.folder}/.submission_file_x.sh\n"
                        for i, s, r in self.queue)
        return subprocess.CompletedProcess(argv, 0, lines, "")


def _wait(watch: slurm.JobWatch, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while watch.cancelled is None and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.stop()


def test_a_job_that_can_never_start_is_cancelled_at_once(tmp_path: Path):
    cluster = FakeCluster(tmp_path, [("7_[0-3]", "PENDING", "PartitionConfig")])
    watch = slurm.JobWatch(tmp_path, 0.1, 600, run=cluster).start()
    _wait(watch)
    assert ["scancel", "7"] in cluster.calls
    assert "PartitionConfig" in watch.cancelled


def test_jobs_pending_too_long_are_cancelled_and_running_ones_are_not(tmp_path: Path):
    cluster = FakeCluster(tmp_path, [("8_0", "RUNNING", "None"), ("8_1", "PENDING", "Resources")])
    watch = slurm.JobWatch(tmp_path, 0.1, 0.3, run=cluster, grace_s=1).start()
    time.sleep(0.8)
    assert watch.cancelled is None and not any(c[0] == "scancel" for c in cluster.calls)
    cluster.queue = [("8_1", "PENDING", "Resources")]
    _wait(watch)
    assert watch.cancelled.startswith("pending for more than 0.3 s")
    assert ["scancel", "8"] in cluster.calls


def test_cancel_reaches_every_array_seen(tmp_path: Path, caplog):
    caplog.set_level("INFO", logger="mlp.slurm")
    cluster = FakeCluster(tmp_path, [("9_0", "RUNNING", "None"), ("10_0", "RUNNING", "None")])
    watch = slurm.JobWatch(tmp_path, 0.1, 600, run=cluster).start()
    time.sleep(0.3)
    watch.cancel("the sweep was interrupted")
    watch.stop()
    # running jobs get SIGINT first (they end their runs), then the cancel of all
    assert (cluster.calls.index(["scancel", "--signal=INT", "10", "9"])
            < cluster.calls.index(["scancel", "10", "9"]))
    assert "SLURM job 10 9: 2 running" in caplog.text


def test_a_run_knows_its_slurm_job():
    from mlp.tracking import cluster

    env = {"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3",
           "SLURMD_NODENAME": "node7", "SLURM_JOB_PARTITION": "debug", "HOME": "/root"}
    assert cluster.slurm_tags(env) == {
        "slurm.job_id": "15", "slurm.array_job_id": "12", "slurm.array_task_id": "3",
        "slurm.node": "node7", "slurm.partition": "debug"}
    assert cluster.slurm_tags({"HOME": "/root"}) == {}
