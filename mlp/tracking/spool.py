"""What a run could not send to its tracking store, kept on disk and sent later.

When the tracking store stops answering in the middle of a run (a server that died, a
network that dropped), training goes on: the run's recorder appends what it could not
send to a spool file beside the checkpoint, `<checkpoint_dir>/tracking-spool.jsonl`, and
sends it, oldest first, as soon as the store answers again, at the end of the run, when
the run is resumed, or with the command

    mlp-sync <spool file or a directory holding spool files> [--tracking-uri URI]

The file is JSON lines (no pickles), one record per line, each naming the store (`uri`)
and the run (`run_id`):

    {"kind": "metric", "key": "acc/val", "value": 0.41, "step": 3, "timestamp": <ms>, ...}
    {"kind": "tag", "key": "mlp.heartbeat", "value": "1764632500", ...}
    {"kind": "status", "status": "FINISHED", "end_time": <ms>, ...}

Records are sent in file order (metrics and tags batched with `log_batch`, a status with
`set_terminated`); what was sent leaves the file, which is removed once empty. Appends and
sends hold a lock beside the file (`<spool>.lock`), so a run and `mlp-sync` can share it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from mlp.tracking import store

log = logging.getLogger("mlp")

SPOOL_NAME = "tracking-spool.jsonl"
BATCH_METRICS, BATCH_TAGS = 1000, 100  # MLflow's limits for one log_batch


def beside(checkpoint: Path | None) -> Path | None:
    """The spool path of a run whose checkpoint is `checkpoint` (None: no spool)."""
    return None if checkpoint is None else Path(checkpoint).parent / SPOOL_NAME


def metric_records(uri: str, run_id: str, points: Iterable[Metric]) -> list[dict]:
    return [{"uri": uri, "run_id": run_id, "kind": "metric", "key": p.key,
             "value": float(p.value), "step": int(p.step), "timestamp": int(p.timestamp)}
            for p in points]


def tag_records(uri: str, run_id: str, tags: Mapping[str, str]) -> list[dict]:
    return [{"uri": uri, "run_id": run_id, "kind": "tag", "key": k, "value": str(v)}
            for k, v in tags.items()]


def status_record(uri: str, run_id: str, status: str, end_time: int) -> dict:
    return {"uri": uri, "run_id": run_id, "kind": "status", "status": status,
            "end_time": end_time}


@dataclass
class Sent:
    """What one `Spool.send` stored, by kind, and the runs it touched."""

    metric: int = 0
    tag: int = 0
    status: int = 0
    runs: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return (f"{self.metric} metric points, {self.tag} tags and {self.status} final "
                f"statuses of {len(self.runs)} run(s)")


class Spool:
    """The spool file at `path` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, records: list[dict]) -> None:
        """Add records at the end of the file, on disk (fsync) before returning."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with store.file_lock(self.path), open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        """The records, in order ([] when there is no file)."""
        if not self.path.is_file():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def pending(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def send(self, uri: str | None = None) -> Sent:
        """Send every record to its store (`uri` overrides the recorded one), oldest first.

        On the first call that fails, the records not yet stored stay in the file and the
        error (one of store.STORE_ERRORS) propagates; the Sent counts so far are in its
        `sent` attribute."""
        sent = Sent()
        clients: dict[str, MlflowClient] = {}
        with store.file_lock(self.path):
            records = self.read()
            done = 0
            try:
                while done < len(records):
                    first = records[done]
                    target = uri or first["uri"]
                    if target not in clients:
                        clients[target] = store.open_client(target)
                    done = _send_one_call(clients[target], records, done, sent)
            except store.STORE_ERRORS as e:
                e.sent = sent  # type: ignore[attr-defined]
                raise
            finally:
                self._keep(records[done:])
        return sent

    def _keep(self, records: list[dict]) -> None:
        """Replace the file by `records` atomically (remove it when there are none)."""
        if not records:
            self.path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".spool-")
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _send_one_call(client: MlflowClient, records: list[dict], start: int, sent: Sent) -> int:
    """Store records[start], batched with the metric and tag records of the same run and
    store that follow it, in one MLflow call; return the index after the last one sent."""
    first = records[start]
    run_id, target = first["run_id"], first["uri"]
    if first["kind"] == "status":
        client.set_terminated(run_id, status=first["status"], end_time=first["end_time"])
        sent.status += 1
        sent.runs.add(run_id)
        return start + 1
    metrics: list[Metric] = []
    tags: list[RunTag] = []
    end = start
    while end < len(records):
        r = records[end]
        if (r["kind"] == "status" or r["run_id"] != run_id or r["uri"] != target
                or len(metrics) == BATCH_METRICS or len(tags) == BATCH_TAGS):
            break
        if r["kind"] == "metric":
            metrics.append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
        else:
            tags.append(RunTag(r["key"], r["value"]))
        end += 1
    client.log_batch(run_id, metrics=metrics, tags=tags)
    sent.metric += len(metrics)
    sent.tag += len(tags)
    sent.runs.add(run_id)
    return end


def send_pending(path: Path | None) -> Sent | None:
    """Send the spool at `path` if an earlier process left one (e.g. before a resume);
    when its store does not answer, warn and keep the file. Returns what was sent."""
    if path is None or not Spool(path).pending():
        return None
    try:
        sent = Spool(path).send()
    except store.STORE_ERRORS as e:
        log.warning("could not send %s yet (%s: %s); it stays for mlp-sync", path,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("sent %s kept in %s", sent, path)
    return sent


def find(paths: Iterable[str | Path]) -> list[Path]:
    """The spool files named, or found under the directories named (recursively)."""
    found: list[Path] = []
    for p in map(Path, paths):
        found += sorted(p.rglob(SPOOL_NAME)) if p.is_dir() else [p]
    return found


