"""A sweep on a SLURM cluster (`hydra/launcher=submitit_slurm`): what each job asks for,
checked against what the partition offers before anything is submitted, and the jobs
watched while the sweep waits for them.

`check_request` refuses (ConfigError, exit 2) a job that no node of the partition could
ever run, since SLURM would keep it PENDING forever (Reason=PartitionConfig) and submitit
would wait without a word. `JobWatch` then says what the submitted jobs are doing (pending
with the reason, running, done) at a bounded interval, cancels them (`scancel`) when they
wait longer than allowed or can never start, and cancels them when the sweep is
interrupted, so that no job outlives its sweep.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlp.errors import ConfigError

log = logging.getLogger("mlp.slurm")

LAUNCHER_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
GRACE_S = 20.0  # for running jobs to end their runs after a SIGINT
# Reasons for which a pending job will never start whatever the wait: cancel at once.
HOPELESS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "PartitionDown",
            "BadConstraints", "InvalidAccount", "InvalidQOS", "ReqNodeNotAvail")
_TIMEOUT_S = 30.0

Run = Callable[..., subprocess.CompletedProcess]


def is_slurm(launcher: Mapping[str, Any]) -> bool:
    """Whether a composed `hydra.launcher` submits to SLURM."""
    return str(launcher.get("_target_", "")) == LAUNCHER_TARGET


@dataclass(frozen=True)
class Partition:
    """What one job can get in a partition: its largest node's CPUs, memory (MB) and GPUs,
    and the time limit (minutes; None when unlimited)."""

    name: str
    up: bool
    cpus: int
    mem_mb: int
    gpus: int
    max_time_min: float | None


def minutes(limit: str) -> float | None:
    """SLURM's time format ('infinite', 'UNLIMITED', 'M', 'M:S', 'H:M:S', 'D-H', 'D-H:M',
    'D-H:M:S') in minutes; None when unlimited."""
    if limit.lower() in ("infinite", "unlimited"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = [*parts, 0, 0][:3]
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 1:
        return float(parts[0])
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60


def _gpus(gres: str) -> int:
    """GPUs in a node's generic resources ('gpu:2', 'gpu:a100:4(S:0-1)', '(null)')."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)*?:(\d+)", gres))


def parse_sinfo(text: str, name: str | None) -> Partition:
    """The partition `name` (the default one, marked '*', when None) from the output of
    `sinfo --noheader --format=%P|%a|%c|%m|%G|%l` (a line per kind of node)."""
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    known = sorted({r[0].rstrip("*") for r in rows})
    if name is None:
        defaults = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        if not defaults:
            raise ConfigError("hydra.launcher.partition", None,
                              f"a partition name: this cluster has no default ({', '.join(known)})")
        name = defaults[0]
    mine = [r for r in rows if r[0].rstrip("*") == name]
    if not mine:
        raise ConfigError("hydra.launcher.partition", name,
                          f"one of this cluster's partitions: {', '.join(known) or 'none'}")
    return Partition(
        name=name, up=all(r[1] == "up" for r in mine),
        cpus=max(int(r[2].rstrip("+")) for r in mine),
        mem_mb=max(int(r[3].rstrip("+")) for r in mine),
        gpus=max(_gpus(r[4]) for r in mine), max_time_min=minutes(mine[0][5]))


def partition(name: str | None, run: Run = subprocess.run) -> Partition:
    """What the cluster's `sinfo` says of partition `name` (the default when None)."""
    try:
        out = run(["sinfo", "--noheader", "--format=%P|%a|%c|%m|%G|%l"], capture_output=True,
                  text=True, timeout=_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError("hydra/launcher", "submitit_slurm",
                          f"a reachable SLURM cluster (sinfo failed: {e})") from e
    return parse_sinfo(out, name)


def check_request(launcher: Mapping[str, Any], part: Partition) -> None:
    """Refuse a job that no node of `part` can run, naming the key and the largest value
    that fits. `launcher` is the composed `hydra.launcher` of submitit_slurm."""
    where = f"partition {part.name}"
    if not part.up:
        raise ConfigError("hydra.launcher.partition", part.name, "a partition that is up")
    tasks = int(launcher.get("tasks_per_node") or 1)
    cpus = int(launcher.get("cpus_per_task") or 1)
    if cpus * tasks > part.cpus:
        raise ConfigError("hydra.launcher.cpus_per_task", cpus,
                          f"at most {part.cpus // tasks} (a node of {where} has {part.cpus} "
                          f"CPUs, for {tasks} task(s) per node)")
    mem_gb = launcher.get("mem_gb")
    if mem_gb is not None and mem_gb * 1024 > part.mem_mb:
        raise ConfigError("hydra.launcher.mem_gb", mem_gb,
                          f"at most {part.mem_mb // 1024} (a node of {where} has "
                          f"{part.mem_mb} MB)")
    gpus = launcher.get("gpus_per_node")
    if gpus and gpus > part.gpus:
        raise ConfigError("hydra.launcher.gpus_per_node", gpus,
                          f"at most {part.gpus} (the GPUs of a node of {where})")
    limit, asked = part.max_time_min, launcher.get("timeout_min")
    if limit is not None and asked is not None and asked > limit:
        raise ConfigError("hydra.launcher.timeout_min", asked,
                          f"at most {limit:g} (the time limit of {where})")


@dataclass(frozen=True)
class Job:
    """One line of `squeue`: an array task (`12_3`) or a pending array (`12_[0-3]`)."""

    id: str
    state: str
    reason: str

    @property
    def array_id(self) -> str:
        return self.id.split("_")[0]

    @property
    def tasks(self) -> int:
        """How many array tasks the line stands for: 1, or the size of a pending range
        such as `12_[0-3]`, `12_[1,4-6]` or `12_[0-9%2]` (`%2`: at most 2 at a time)."""
        _, _, spec = self.id.partition("_[")
        if not spec:
            return 1
        total = 0
        for part in spec.rstrip("]").split("%")[0].split(","):
            first, _, last = part.partition("-")
            total += int(last or first) - int(first) + 1
        return total


def parse_squeue(text: str, folder: Path) -> list[Job]:
    """The jobs whose batch script lies in `folder` (a sweep's submitit folder), from the
    output of `squeue --noheader --format=%i|%T|%r|%o`."""
    jobs = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and Path(parts[3]).parent == folder:
            jobs.append(Job(parts[0], parts[1], parts[2]))
    return jobs


def summary(jobs: list[Job]) -> str:
    """'4 pending (PartitionConfig)', '1 running, 3 pending (Resources)', 'none queued':
    array tasks counted one by one, a pending range by its size."""
    if not jobs:
        return "none queued"
    counts: Counter = Counter()
    for j in jobs:
        counts[j.state.lower(), j.reason if j.state == "PENDING" else ""] += j.tasks
    return ", ".join(f"{n} {state}" + (f" ({reason})" if reason and reason != "None" else "")
                     for (state, reason), n in sorted(counts.items()))


@dataclass
class JobWatch:
    """Watches the SLURM jobs of one sweep (those whose batch script lies in `folder`, the
    sweep's submitit folder) on a thread: a log line when what they do changes (and at
    least every `every_s` seconds), and `scancel` of all of them when one can never start,
    when they have waited `max_pending_s` without any running (then `on_cancel()`: whoever
    waits for the jobs must stop waiting), or on `cancel()`. The config's `cluster.*`
    sets the two times."""

    folder: Path
    every_s: float
    max_pending_s: float
    on_cancel: Callable[[], None] | None = None
    grace_s: float = GRACE_S
    run: Run = subprocess.run
    array_ids: set[str] = field(default_factory=set)
    cancelled: str | None = None  # why the watch cancelled the jobs
    done: bool = False  # the sweep saw every job end: nothing to cancel any more
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> JobWatch:
        self._thread = threading.Thread(target=self._loop, name="slurm-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_TIMEOUT_S)

    def poll(self) -> list[Job]:
        """The sweep's jobs in the queue now (an empty list when squeue fails)."""
        try:
            out = self.run(["squeue", "--noheader", "--format=%i|%T|%r|%o"],
                           capture_output=True, text=True, timeout=_TIMEOUT_S, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("squeue failed: %s", e)
            return []
        jobs = parse_squeue(out, self.folder)
        self.array_ids |= {j.array_id for j in jobs}
        return jobs

    def cancel(self, why: str) -> None:
        """Cancel every job of the sweep seen so far (and any queued now): SIGINT first to
        the running ones, which end their runs as an interrupted run does (KILLED, with a
        checkpoint; submitit's jobs ignore the SIGTERM of a plain scancel), for up to
        `grace_s` seconds, then scancel of all."""
        jobs = self.poll()
        if not self.array_ids:
            return
        self.cancelled = self.cancelled or why
        ids = sorted(self.array_ids)
        log.error("cancelling SLURM job(s) %s: %s", " ".join(ids), why)
        try:
            if any(j.state == "RUNNING" for j in jobs):
                self.run(["scancel", "--signal=INT", *ids], capture_output=True, text=True,
                         timeout=_TIMEOUT_S)
                deadline = time.monotonic() + self.grace_s
                while (time.monotonic() < deadline
                       and any(j.state == "RUNNING" for j in self.poll())):
                    time.sleep(0.5)
            self.run(["scancel", *ids], capture_output=True, text=True, timeout=_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("scancel %s failed: %s", " ".join(ids), e)

    def _loop(self) -> None:
        last, said_at, pending_since = "", 0.0, None
        tick = min(2.0, self.every_s)
        while not self._stop.wait(tick):
            jobs = self.poll()
            now = time.monotonic()
            text = summary(jobs)
            if jobs and (text != last or now - said_at >= self.every_s):
                ids = " ".join(sorted({j.array_id for j in jobs}))
                log.info("SLURM job %s: %s", ids, text)
                last, said_at = text, now
            hopeless = [j for j in jobs if j.state == "PENDING" and j.reason in HOPELESS]
            if hopeless:
                self._give_up(f"job {hopeless[0].id} can never start on this cluster "
                              f"(Reason={hopeless[0].reason}): ask for less")
                return
            waiting = bool(jobs) and all(j.state == "PENDING" for j in jobs)
            pending_since = (pending_since or now) if waiting else None
            if pending_since is not None and now - pending_since > self.max_pending_s:
                self._give_up(f"pending for more than {self.max_pending_s:g} s "
                              f"({text}); the cluster is busy or the jobs ask too much")
                return

    def _give_up(self, why: str) -> None:
        self.cancel(why)
        if self.on_cancel is not None:
            self.on_cancel()
