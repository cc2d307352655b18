"""What a run could not send to its tracking store, kept on disk and sent later.

When the tracking store stops answering in the middle of a run (a server that died, a
network that dropped), training goes on: the run's recorder appends what it could not
send to a spool file beside the checkpoint, `<checkpoint_dir>/tracking-spool.jsonl`, and
sends it, oldest first, as soon as the store answers again, at the end of the run, when
the run is resumed, or with the command

    mlp-sync <spool file or a directory holding spool files> [--tracking-uri URI]

The file is JSON lines (no pickles), one record per line, each naming the store (`uri`)
and the run (`run_id`), framed with the CRC-32 of its payload (the record as compact JSON
with sorted keys), so that a line torn by a crash or damaged on disk is recognized:

    {"crc":<crc32>,"record":{"key":"acc/val","kind":"metric","step":3,"timestamp":<ms>,...}}
    {"crc":<crc32>,"record":{"key":"mlp.heartbeat","kind":"tag","value":"1764632500",...}}
    {"crc":<crc32>,"record":{"key":"optim.lr","kind":"param","value":"0.001",...}}
    {"crc":<crc32>,"record":{"end_time":<ms>,"kind":"status","status":"FINISHED",...}}
    {"crc":<crc32>,"record":{"dir":"<folder>","kind":"files","paths":["plots/curves.png"],...}}

A run's files (figures, config files, the gradient check's table, the parameters) have
no place in a line: a `files` record names a folder beside the spool
(`tracking-spool-files/`, the owner's only) that holds them, laid out by their paths in
the run's artifacts, and `paths`, the files it must hold. Sending it uploads the folder
(`log_artifacts`) and removes it. A `model` record names a folder that holds a servable
model's data and input example, and its `name`: sending it logs the model
(`recorder.log_servable`). A folder that is gone is reported, and what it held is
missing from the run (its receipt says so).

Lines without a frame (a bare record, as the previous version wrote them) are read too. A
damaged line is reported (`Damaged`: the file and the line number), skipped and dropped
from the file; the records after it are sent. Each append is on disk (flush + fsync)
before it returns, and a failed one (a full disk: `SpoolError`) is cut off again, so the
file never holds half a record that a later append would glue to its own.

No secret is kept: the file and a directory the spool creates are its owner's only (0600,
0700), and a record's `uri` is the store's URI without credentials
(`secrets.without_credentials`: `http://user@host`, no password, no token). At send time
the credentials come back from the store named by `--tracking-uri`, or from the
environment: MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD /
MLFLOW_TRACKING_TOKEN, PGPASSWORD for PostgreSQL, or this process's tracking URI
(MLFLOW_TRACKING_URI, or the run's) when it names the same store with its credentials.

Records are sent in file order (metrics and tags batched with `log_batch`, a status with
`set_terminated`, files with `log_artifacts`); what was sent leaves the file, which is
removed once empty. Sending is idempotent: a metric point the run already holds in the
store (same key, step, timestamp and value: a spool sent twice, a batch whose answer was
lost) is not sent again; tags and statuses are set, not added, a param logged again with
its value is no change, and a file uploaded again replaces itself.
Appends and sends hold a lock beside the file (`<spool>.lock`), so a run and `mlp-sync`
can share it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from mlp.tracking import secrets, store

log = logging.getLogger("mlp")

SPOOL_NAME = "tracking-spool.jsonl"
FILES_NAME = "tracking-spool-files"  # the folder of the files records, beside the spool
BATCH_METRICS, BATCH_TAGS = 1000, 100  # MLflow's limits for one log_batch (params: 100)
# The fields every record has, and those of each kind.
FIELDS = {"metric": {"key", "value", "step", "timestamp"}, "tag": {"key", "value"},
          "param": {"key", "value"}, "status": {"status", "end_time"},
          "files": {"dir", "paths"}, "model": {"dir", "name"}}
KEPT_KINDS = ("files", "model")  # records whose content is a folder beside the spool
COMMON = {"uri", "run_id", "kind"}


class SpoolError(RuntimeError):
    """The spool file cannot be written (a full disk, no permission): the records that
    were to be kept are not on disk. The message names the file and the cause."""


@dataclass(frozen=True)
class Damaged:
    """A line of a spool file that holds no whole record (torn by a crash, or changed on
    disk): `line` counts from 1."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: damaged spool record skipped ({self.reason})"


def beside(checkpoint: Path | None) -> Path | None:
    """The spool path of a run whose checkpoint is `checkpoint` (None: no spool)."""
    return None if checkpoint is None else Path(checkpoint).parent / SPOOL_NAME


def metric_records(uri: str, run_id: str, points: Iterable[Metric]) -> list[dict]:
    """The records of metric points of run `run_id` in the store `uri` (kept without its
    credentials)."""
    uri = secrets.without_credentials(uri)
    return [{"uri": uri, "run_id": run_id, "kind": "metric", "key": p.key,
             "value": float(p.value), "step": int(p.step), "timestamp": int(p.timestamp)}
            for p in points]


def tag_records(uri: str, run_id: str, tags: Mapping[str, str], kind: str = "tag"
                ) -> list[dict]:
    """The records of tags (or with kind="param", params) of run `run_id` in the store
    `uri` (without its credentials)."""
    uri = secrets.without_credentials(uri)
    return [{"uri": uri, "run_id": run_id, "kind": kind, "key": k, "value": str(v)}
            for k, v in tags.items()]


def status_record(uri: str, run_id: str, status: str, end_time: int) -> dict:
    """The record of run `run_id`'s final status in the store `uri` (without credentials)."""
    return {"uri": secrets.without_credentials(uri), "run_id": run_id, "kind": "status",
            "status": status, "end_time": end_time}


def frame(record: Mapping) -> str:
    """One line of the file: `record` as compact JSON with sorted keys, and its CRC-32."""
    payload = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return f'{{"crc":{zlib.crc32(payload.encode())},"record":{payload}}}\n'


def unframe(line: str) -> dict:
    """The record of one line, framed or bare (the previous version's lines); ValueError
    saying what is wrong when the line holds no whole record."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ValueError(f"not JSON, torn or damaged: {e}") from None
    if isinstance(obj, dict) and obj.keys() == {"crc", "record"}:
        payload = json.dumps(obj["record"], sort_keys=True, separators=(",", ":"))
        if zlib.crc32(payload.encode()) != obj["crc"]:
            raise ValueError("checksum mismatch: the record was changed on disk")
        obj = obj["record"]
    if not isinstance(obj, dict) or obj.get("kind") not in FIELDS:
        raise ValueError("not a spool record")
    missing = (COMMON | FIELDS[obj["kind"]]) - obj.keys()
    if missing:
        raise ValueError(f"a {obj['kind']} record without {', '.join(sorted(missing))}")
    return obj


@dataclass
class Sent:
    """What one `Spool.send` stored, by kind, and the runs it touched; the metric points it
    found already stored (not sent again) and the damaged lines it skipped."""

    metric: int = 0
    tag: int = 0
    param: int = 0
    status: int = 0
    files: int = 0
    models: int = 0
    runs: set[str] = field(default_factory=set)
    already: int = 0
    damaged: list[Damaged] = field(default_factory=list)

    def __str__(self) -> str:
        params = f", {self.param} params" if self.param else ""
        params += f", {self.files} files" if self.files else ""
        params += f", {self.models} models" if self.models else ""
        text = (f"{self.metric} metric points, {self.tag} tags{params} and {self.status} "
                f"final statuses of {len(self.runs)} run(s)")
        if self.already:
            text += f" ({self.already} metric points were already stored: not sent again)"
        return text


class Spool:
    """The spool file at `path` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, records: list[dict]) -> None:
        """Add records at the end of the file, on disk (fsync) before returning. Raises
        SpoolError when they cannot be written (the file is left as it was)."""
        if not records:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with store.file_lock(self.path):
                self._append(records)
        except OSError as e:
            raise SpoolError(_cannot(f"keep {len(records)} tracking records in", self.path,
                                     e)) from e

    def _append(self, records: list[dict]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            status = os.fstat(fd)
            if stat.S_ISREG(status.st_mode) and status.st_mode & 0o077:
                os.fchmod(fd, 0o600)  # a file of the previous version, readable by others
            size = status.st_size
            # A crash in the middle of a line leaves it without its newline: end it, or
            # this append's first record would be glued to it and lost with it.
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            data = ("\n" if torn else "") + "".join(map(frame, records))
            try:
                view = memoryview(data.encode())
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def keep_folder(self, uri: str, run_id: str, staged: Path, kind: str,
                    **fields: Any) -> Path:
        """Keep the folder `staged` of run `run_id` (a `kind` of KEPT_KINDS: files laid
        out by their artifact `paths`, or a `model` with its `name`): it moves beside the
        spool and a record with `fields` names it; returns where it went. SpoolError when
        it cannot be kept."""
        folder = self.path.parent / FILES_NAME / f"{run_id}-{uuid.uuid4().hex[:8]}"
        try:
            folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.move(staged, folder)
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise SpoolError(_cannot(f"keep the {kind} of run {run_id} beside", self.path,
                                     e)) from e
        self.append([{"uri": secrets.without_credentials(uri), "run_id": run_id,
                      "kind": kind, "dir": str(folder), **fields}])
        return folder

    def kept(self, run_id: str) -> tuple[list[str], list[str]]:
        """What the file keeps beside it for run `run_id`: the artifact paths of its
        `files` records and the names of its `model` records."""
        records = [r for r in self.read() if r["run_id"] == run_id]
        return ([p for r in records if r["kind"] == "files" for p in r["paths"]],
                [r["name"] for r in records if r["kind"] == "model"])

    def scan(self) -> tuple[list[dict], list[Damaged]]:
        """The records in order, and the damaged lines skipped (([], []) without a file)."""
        if not self.path.is_file():
            return [], []
        records, damaged = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(unframe(line))
                except ValueError as e:
                    damaged.append(Damaged(self.path, number, str(e)))
        return records, damaged

    def read(self) -> list[dict]:
        """The records, in order, damaged lines skipped ([] when there is no file)."""
        return self.scan()[0]

    def pending(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def send(self, uri: str | None = None, known: Sequence[str] = (),
             files: bool = True) -> Sent:
        """Send every record to its store, oldest first: to `uri` when given, else to the
        recorded store with the credentials this process has for it (`credentialed`: one
        of the `known` URIs, e.g. the run's own, or $MLFLOW_TRACKING_URI).
        Damaged lines are reported (a warning each), skipped and dropped from the file;
        metric points the store already holds are not sent again. Without `files` the
        files records stay in the file, in their order, for a later send: a running
        run's sink sends its points this way, so that an artifact store that refuses
        uploads does not hold them back (the run's end, a resume and mlp-sync send all).

        On the first call that fails, the records not yet stored stay in the file and the
        error (one of store.STORE_ERRORS) propagates; the Sent counts so far are in its
        `sent` attribute. SpoolError when the file cannot be rewritten."""
        sent = Sent()
        clients: dict[str, MlflowClient] = {}
        stored: dict[tuple[str, str], Counter] = {}
        with store.file_lock(self.path):
            records, sent.damaged = self.scan()
            for damaged in sent.damaged:
                log.warning("%s", damaged)
            done, skipped = 0, []
            try:
                while done < len(records):
                    first = records[done]
                    if first["kind"] in KEPT_KINDS and not files:
                        skipped.append(first)
                        done += 1
                        continue
                    target = uri or credentialed(first["uri"], known)
                    if target not in clients:
                        clients[target] = store.open_client(target)
                    run = (target, first["run_id"])
                    if run not in stored:
                        stored[run] = _stored_points(clients[target], records, run[1])
                    done = _send_one_call(clients[target], records, done, sent, stored[run])
            except store.STORE_ERRORS as e:
                e.sent = sent  # type: ignore[attr-defined]
                raise
            finally:
                self._keep(skipped + records[done:])
        return sent

    def _keep(self, records: list[dict]) -> None:
        """Replace the file by `records` atomically (remove it when there are none), in the
        current framing and without credentials in their URIs."""
        if not records:
            self.path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".spool-")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(frame(r | {"uri": secrets.without_credentials(r["uri"])})
                             for r in records)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SpoolError(_cannot(f"rewrite ({len(records)} records left in)", self.path,
                                     e)) from e


def credentialed(recorded: str, known: Sequence[str] = ()) -> str:
    """The URI to send to for a store recorded as `recorded` (a URI without credentials):
    the first URI this process was given that names the same store, with its credentials
    (`known`: e.g. the run's own `tracking.uri`; then $MLFLOW_TRACKING_URI); else
    `recorded` itself, and MLflow finds the login in MLFLOW_TRACKING_USERNAME / _PASSWORD /
    _TOKEN (PostgreSQL in PGPASSWORD)."""
    bare = secrets.without_credentials(recorded)
    for current in [*known, os.environ.get(store.URI_VAR, "")]:
        if current and secrets.without_credentials(current) == bare:
            return current
    return recorded


def _stored_points(client: MlflowClient, records: list[dict], run_id: str) -> Counter:
    """The points (key, step, timestamp, value) the store already holds of the metric keys
    spooled for `run_id`, with their counts."""
    keys = {r["key"] for r in records if r["kind"] == "metric" and r["run_id"] == run_id}
    return Counter(_point(m.key, m.step, m.timestamp, m.value) for key in sorted(keys)
                   for m in client.get_metric_history(run_id, key))


def _point(key: str, step: int, timestamp: int, value: float) -> tuple:
    # repr: a NaN point equals itself (NaN != NaN), and a float is its own exact repr.
    return key, int(step), int(timestamp), repr(float(value))


def _send_one_call(client: MlflowClient, records: list[dict], start: int, sent: Sent,
                   stored: Counter) -> int:
    """Store records[start], batched with the metric and tag records of the same run and
    store that follow it, in one MLflow call, leaving out (and using up in `stored`) the
    points the store already holds; return the index after the last one sent."""
    first = records[start]
    run_id, target = first["run_id"], first["uri"]
    if first["kind"] == "status":
        client.set_terminated(run_id, status=first["status"], end_time=first["end_time"])
        sent.status += 1
        sent.runs.add(run_id)
        return start + 1
    if first["kind"] in KEPT_KINDS:
        _send_folder(client, first, sent)
        return start + 1
    metrics: list[Metric] = []
    tags: list[RunTag] = []
    params: list[Param] = []
    end = start
    while end < len(records):
        r = records[end]
        if (r["kind"] in ("status", *KEPT_KINDS) or r["run_id"] != run_id or r["uri"] != target
                or len(metrics) == BATCH_METRICS or len(tags) == BATCH_TAGS
                or len(params) == BATCH_TAGS):
            break
        if r["kind"] == "tag":
            tags.append(RunTag(r["key"], r["value"]))
        elif r["kind"] == "param":
            params.append(Param(r["key"], r["value"]))
        elif stored[point := _point(r["key"], r["step"], r["timestamp"], r["value"])] > 0:
            stored[point] -= 1
            sent.already += 1
        else:
            metrics.append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
        end += 1
    if metrics or tags or params:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    sent.metric += len(metrics)
    sent.tag += len(tags)
    sent.param += len(params)
    sent.runs.add(run_id)
    return end


def _send_folder(client: MlflowClient, record: dict, sent: Sent) -> None:
    """Send the folder of a `files` record (uploaded to its run) or a `model` record (the
    model logged), then remove it; a folder that is gone is reported (what it held stays
    missing from the run, and its receipt says so)."""
    folder, run_id = Path(record["dir"]), record["run_id"]
    what = ", ".join(record["paths"]) if record["kind"] == "files" else record["name"]
    if not folder.is_dir():
        log.warning("run %s: the folder %s it kept is gone: %s stay missing", run_id, folder,
                    what)
        return
    if record["kind"] == "files":
        client.log_artifacts(run_id, str(folder))
        sent.files += len(record["paths"])
    else:
        from mlp.tracking.recorder import log_kept_model  # it writes the spool: imports it

        log_kept_model(client, run_id, folder, record["name"])
        sent.models += 1
    shutil.rmtree(folder, ignore_errors=True)
    sent.runs.add(run_id)


def _cannot(what: str, path: Path, error: OSError) -> str:
    """The message of a SpoolError: what failed on which file, and why."""
    cause = errno.errorcode.get(error.errno or 0, type(error).__name__)
    hint = " (the disk is full: free space there)" if error.errno == errno.ENOSPC else ""
    return f"cannot {what} the tracking spool {path}: {error.strerror or error} [{cause}]{hint}"


def send_pending(path: Path | None, known: Sequence[str] = ()) -> Sent | None:
    """Send the spool at `path` if an earlier process left one (e.g. before a resume), with
    the credentials of the `known` URIs (`credentialed`); when its store does not answer,
    warn and keep the file. Returns what was sent."""
    if path is None or not Spool(path).pending():
        return None
    try:
        sent = Spool(path).send(known=known)
    except store.STORE_ERRORS as e:
        log.warning("could not send %s yet (%s: %s); it stays for mlp-sync", path,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("sent %s kept in %s", sent, path)
    return sent


def find(paths: Iterable[str | Path]) -> list[Path]:
    """The spool files named, or found under the directories named (recursively; not in
    the folders of kept files, which may hold a copy of one as a run's file)."""
    found: list[Path] = []
    for p in map(Path, paths):
        found += sorted(f for f in p.rglob(SPOOL_NAME)
                        if FILES_NAME not in f.relative_to(p).parts) if p.is_dir() else [p]
    return found
