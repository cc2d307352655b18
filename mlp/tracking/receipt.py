"""A run's receipt: whether the store holds everything the run produced, or what is missing
and where it is kept.

A run counts what it hands to its sink (`Sink.produced`: each distinct metric point, per
key; each tag key), the files it logs as artifacts (`RunRecorder.log_files`: figures,
config files, the gradient check's table and report, the parameters) and its servable
model (`RunRecorder.log_model`), and, at its end (`RunRecorder.finish`), reads the store
back (one `get_metric_history` per key, one `list_artifacts` per folder of files, one
search of the run's logged models) and sets two tags:

- `mlp.record.expected`: what the store must hold, JSON `{"points": {key: n}, "tags":
  [key, ...], "files": [path, ...], "models": [name, ...]}` (`Expected`), so that
  `mlp-sync` and later runs can check again;
- `mlp.record`: `complete`, or `incomplete: <n> points, <m> tags, <k> files, <j> models
  in <spool file>` (points the store lacks, tags it lacks or holds an older value of,
  files it lacks, models it holds none READY of: what is still in the spool, or beside it
  for files and models). A receipt of an earlier version, without files or models, reads
  as before.

Both are set whenever the store answers `set-tag`, whatever `log-batch` does; when it does
not answer at all, they go to the run's spool, with the counts of what the spool holds of
the run, and arrive with it. `mlp-sync`, and the next `mlp-train` against the store
(`repair_incomplete`, `repair`), send the spool of an incomplete run that is on this
machine, check again and set `complete` once the store holds everything.

A point is one MLflow stores once: same key, step, timestamp and value (the SQL store keeps
one of two identical points). A run continued after a resume expects what the store held
when it was reopened (`stored_points`) plus what it produced. `system/*` metrics are not
counted: MLflow samples them from its own thread by wall time.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from mlp.tracking import spool as spoollib
from mlp.tracking import store
from mlp.tracking.keys import RECORD_EXPECTED_TAG, RECORD_TAG

log = logging.getLogger("mlp")

COMPLETE = "complete"
INCOMPLETE = "incomplete"
_INCOMPLETE = re.compile(r"incomplete: \d+ points, \d+ tags(?:, \d+ files)?(?:, \d+ models)? "
                         r"in (?P<spool>.+)")


@dataclass(frozen=True)
class Expected:
    """What the store must hold of a run: metric points per key, tag keys, the paths of
    its files among the run's artifacts, and the names of its servable models."""

    points: Mapping[str, int] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def to_tag(self) -> str:
        return json.dumps({"points": dict(sorted(self.points.items())),
                           "tags": sorted(self.tags), "files": sorted(self.files),
                           "models": sorted(self.models)}, separators=(",", ":"))

    @classmethod
    def from_tag(cls, text: str) -> Expected:
        data = json.loads(text)
        return cls({k: int(n) for k, n in data["points"].items()}, tuple(data["tags"]),
                   tuple(data.get("files", ())), tuple(data.get("models", ())))


@dataclass(frozen=True)
class Receipt:
    """The outcome of a check: `points`, `tags`, `files` and `models` missing from the
    store (what the spool at `spool` holds of the run when the store did not answer:
    `answered` False)."""

    points: int
    tags: int
    spool: Path | None
    answered: bool = True
    files: int = 0
    models: int = 0

    @property
    def complete(self) -> bool:
        return (self.answered and self.points == 0 and self.tags == 0 and self.files == 0
                and self.models == 0)

    def tag(self) -> str:
        """The value of `mlp.record`."""
        if self.complete:
            return COMPLETE
        where = self.spool if self.spool is not None else "no spool (lost)"
        return (f"{INCOMPLETE}: {self.points} points, {self.tags} tags, {self.files} files, "
                f"{self.models} models in {where}")

    def sync_command(self) -> str | None:
        """The command that sends what is kept (None without a spool)."""
        return None if self.spool is None else f"mlp-sync {self.spool.parent}"


def stored_points(client: MlflowClient, run_id: str) -> Counter:
    """Points per metric key the store holds of the run (`system/*` left out)."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return Counter({k: len(client.get_metric_history(run_id, k)) for k in keys})


def stored_files(client: MlflowClient, run_id: str, paths: Sequence[str]) -> set[str]:
    """Those of the artifact `paths` the store holds of the run (one `list_artifacts` per
    folder)."""
    folders = {posixpath.dirname(p) for p in paths}
    return {info.path for folder in sorted(folders)
            for info in client.list_artifacts(run_id, folder or None) if not info.is_dir}


def stored_models(client: MlflowClient, run: Any, names: Sequence[str]) -> set[str]:
    """Those of the model `names` the store holds READY from `run` (a Run)."""
    if not names:
        return set()
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'")
    return {m.name for m in found if str(m.status).endswith("READY")}


def check(client: MlflowClient, run_id: str, expected: Expected,
          spool: Path | None) -> Receipt:
    """Compare the store with `expected`: a tag counts as missing when the store lacks it
    or the spool still holds a value of it, a file when the store lacks it. Raises
    store.STORE_ERRORS."""
    run = client.get_run(run_id)
    stored = {k: len(client.get_metric_history(run_id, k)) if k in run.data.metrics else 0
              for k in expected.points}
    spooled = {r["key"] for r in (spoollib.Spool(spool).read() if spool else ())
               if r["kind"] == "tag" and r["run_id"] == run_id}
    points = sum(max(0, n - stored[k]) for k, n in expected.points.items())
    tags = sum(k not in run.data.tags or k in spooled for k in expected.tags)
    files = len(set(expected.files) - stored_files(client, run_id, expected.files))
    models = len(set(expected.models) - stored_models(client, run, expected.models))
    return Receipt(points, tags, spool, files=files, models=models)


def settle(client: MlflowClient, run_id: str, expected: Expected,
           spool: Path | None) -> Receipt:
    """At a run's end: check the store and tag the run with the receipt (see the module
    docstring). When the store does not answer, the receipt counts what the spool holds of
    the run and goes to the spool itself."""
    try:
        receipt = check(client, run_id, expected, spool)
        client.set_tag(run_id, RECORD_EXPECTED_TAG, expected.to_tag())
        client.set_tag(run_id, RECORD_TAG, receipt.tag())
        return receipt
    except store.STORE_ERRORS as e:
        log.warning("the store did not answer the run's receipt (%s): %s", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
    if spool is None:
        return Receipt(sum(expected.points.values()), len(expected.tags), None, answered=False,
                       files=len(expected.files), models=len(expected.models))
    kinds = Counter(r["kind"] for r in spoollib.Spool(spool).read() if r["run_id"] == run_id)
    files, models = spoollib.Spool(spool).kept(run_id)
    receipt = Receipt(kinds["metric"], kinds["tag"], spool, answered=False, files=len(files),
                      models=len(models))
    spoollib.Spool(spool).append(spoollib.tag_records(client.tracking_uri, run_id, {
        RECORD_EXPECTED_TAG: expected.to_tag(), RECORD_TAG: receipt.tag()}))
    return receipt


def recheck(client: MlflowClient, run_id: str) -> Receipt | None:
    """Check a run again against its `mlp.record.expected` (after its spool was sent) and
    set `mlp.record`; None when the run has no receipt (it predates them). The spool named
    by its current `mlp.record`, if any, is where what is still missing is kept."""
    tags = client.get_run(run_id).data.tags
    if RECORD_EXPECTED_TAG not in tags:
        return None
    spool = spool_of(tags.get(RECORD_TAG, ""))
    spool = spool if spool is not None and spool.is_file() else None
    receipt = check(client, run_id, Expected.from_tag(tags[RECORD_EXPECTED_TAG]), spool)
    if tags.get(RECORD_TAG) != receipt.tag():
        client.set_tag(run_id, RECORD_TAG, receipt.tag())
    return receipt


def spool_of(record: str) -> Path | None:
    """The spool file an `incomplete: ...` receipt names (None for any other value)."""
    found = _INCOMPLETE.fullmatch(record)
    return Path(found["spool"]) if found else None


def is_incomplete(record: str | None) -> bool:
    """Whether a run's `mlp.record` says its record is incomplete (a run without a receipt,
    None, is not known to be)."""
    return record not in (None, COMPLETE)


def repair(client: MlflowClient, run_id: str, known: Sequence[str] = ()) -> Receipt | None:
    """Send the spool an incomplete run names, when it is on this machine (with the
    credentials of the `known` URIs), then check the run again (`recheck`)."""
    spool = spool_of(client.get_run(run_id).data.tags.get(RECORD_TAG, ""))
    spoollib.send_pending(spool, known=known)
    return recheck(client, run_id)


def repair_incomplete(client: MlflowClient, experiment_id: str,
                      known: Sequence[str] = ()) -> list[tuple[str, Receipt | None]]:
    """`repair` every run of the experiment tagged incomplete whose spool is on this
    machine; returns (run id, its receipt now) of each. A store that fails leaves them for
    later (a warning)."""
    try:
        runs = client.search_runs([experiment_id],
                                  filter_string=f"tags.`{RECORD_TAG}` LIKE '{INCOMPLETE}%'")
        repaired = []
        for run in runs:
            spool = spool_of(run.data.tags[RECORD_TAG])
            if spool is not None and spool.is_file():
                repaired.append((run.info.run_id, repair(client, run.info.run_id, known)))
                log.info("run %s: sent its spool %s; record %s", run.info.run_id, spool,
                         repaired[-1][1].tag() if repaired[-1][1] else "unknown")
        return repaired
    except store.STORE_ERRORS as e:
        log.warning("could not send the spools of incomplete runs yet (%s)", type(e).__name__)
        return []
