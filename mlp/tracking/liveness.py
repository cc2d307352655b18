"""Which RUNNING runs are still alive: a heartbeat per epoch, and reaping the dead.

A process killed with SIGKILL (or by the out-of-memory killer, or a lost machine) cannot
end its run, which then stays RUNNING forever. So every run says who runs it: tags
`mlp.host`, `mlp.pid` and `mlp.pid_start` (the process's start time in clock ticks since
boot, from /proc, so that a pid reused by another process is not taken for the run's) at
start, and `mlp.heartbeat` (Unix time in seconds) at every epoch.

`reap_dead_runs`, called when a run starts in the store (`mlp-train` after connecting),
ends as KILLED every RUNNING run that carries these tags and whose process is gone:

- on this host, when no process has that pid and start time;
- on another host, when its last sign of life (heartbeat, else start) is older than
  `stale_after` seconds (default STALE_AFTER, a day: longer than any epoch).

It sets `mlp.killed_reason` saying why. Runs without the tags (sweep parents, runs of
older versions) are left alone: nothing tells whether they are alive.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunTag, ViewType

from mlp.tracking import store

log = logging.getLogger("mlp")

HOST_TAG = "mlp.host"  # also among tracking.environment_tags, with the same value
PID_TAG, PID_START_TAG = "mlp.pid", "mlp.pid_start"
HEARTBEAT_TAG = "mlp.heartbeat"
REASON_TAG = "mlp.killed_reason"
STALE_AFTER = 24 * 3600.0


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of
    /proc/<pid>/stat), or None when there is no such process or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """The tags that name this process, set when a run starts (or resumes)."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    start = process_start(os.getpid())
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def heartbeat(now: float | None = None) -> dict[str, str]:
    """The heartbeat tag, sent with each epoch's metrics."""
    return {HEARTBEAT_TAG: f"{time.time() if now is None else now:.0f}"}


def is_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` (with that /proc start time, when known) runs on this host."""
    found = process_start(pid)
    if found is not None:
        return start is None or found == start
    if Path("/proc/self/stat").exists():
        return False  # /proc works but has no such pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def why_dead(tags: Mapping[str, str], start_time_ms: int, now: float,
             stale_after: float = STALE_AFTER, host: str | None = None) -> str | None:
    """Why a RUNNING run with these tags is dead, or None when it may be alive (or has no
    process tags). start_time_ms: the run's start (MLflow's milliseconds)."""
    if PID_TAG not in tags:
        return None
    host = socket.gethostname() if host is None else host
    pid = int(tags[PID_TAG])
    if tags.get(HOST_TAG) == host:
        if is_alive(pid, tags.get(PID_START_TAG)):
            return None
        return f"process {pid} on {host} is gone"
    last = float(tags.get(HEARTBEAT_TAG, start_time_ms / 1000))
    if now - last > stale_after:
        return (f"no heartbeat from process {pid} on {tags.get(HOST_TAG, '?')} for "
                f"{(now - last) / 3600:.1f} h (bound {stale_after / 3600:g} h)")
    return None


def reap_dead_runs(client: MlflowClient, stale_after: float = STALE_AFTER,
                   now: float | None = None) -> list[tuple[str, str]]:
    """End as KILLED every RUNNING run of the client's store (all experiments) whose
    process is gone, with the reason as tag `mlp.killed_reason`; returns [(run id,
    reason)]."""
    now = time.time() if now is None else now
    reaped: list[tuple[str, str]] = []
    try:
        experiments = [e.experiment_id
                       for e in client.search_experiments(ViewType.ACTIVE_ONLY)]
        running = client.search_runs(experiments, max_results=1000,
                                     filter_string="attributes.status = 'RUNNING'"
                                     ) if experiments else []
        for run in running:
            reason = why_dead(run.data.tags, run.info.start_time, now, stale_after)
            if reason is None:
                continue
            client.log_batch(run.info.run_id, tags=[RunTag(REASON_TAG, reason)])
            client.set_terminated(run.info.run_id, status="KILLED")
            log.warning("run %s was RUNNING but %s: marked KILLED", run.info.run_id, reason)
            reaped.append((run.info.run_id, reason))
    except store.STORE_ERRORS as e:
        # housekeeping: a store that fails here is the run's problem to report, not ours
        log.warning("could not look for dead runs: %s: %s", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
    return reaped
