"""`mlp-reproduce <run id>`: run a recorded run again and say whether every number matches.

The run's `config/resolved.yaml` artifact is the source of truth: every leaf of it is
passed to `mlp-train` as an override (so defaults changed since do not leak in), except
where the reproduction must differ from the original without changing the computation:
its own checkpoint directory and Hydra output directory, no progress bar, and the store
and experiment the original is in. The new run carries the tag `mlp.reproduces=<run id>`
(set through MLflow's `MLFLOW_RUN_CONTEXT`, so it is there from the run's creation).

Before comparing numbers it reports what could make them differ: the git commit
(`mlflow.source.git.commit`) and dirty flag (`mlp.git.dirty`) of the original against the
code that runs now, and after the run the archive checksum (`data.archive_sha256`), the
NumPy version and the BLAS of both runs. Then every metric of the original is compared
with the reproduction's, point by point at every step, for exact equality; timing and
system metrics are left out (they measure the machine, not the computation). Exit 0 when
every point is equal, 1 with a table of the differences, 2 when the run cannot be
reproduced (no such run, no recorded config, the training failed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from mlp.config import schema as configlib
from mlp.tracking import keys as metrics
from mlp.tracking import recorder as tracking
from mlp.tracking import store

REPRODUCES_TAG = "mlp.reproduces"
CONFIG_ARTIFACT = "config/resolved.yaml"
# Keys that must differ in a reproduction and do not change what it computes.
OWN_KEYS = {"trainer.checkpoint_dir": None, "trainer.resume": None, "trainer.progress": False}
# Tags compared between the original and the reproduction (what can change the numbers).
PROVENANCE_TAGS = ("data.archive_sha256", "mlp.numpy", "mlp.blas", "mlp.python")
# Metrics that measure the machine, not the computation: under their old and new names.
_TIMING = {metrics.EPOCH_TIME, metrics.IMAGES_PER_SEC}
NOT_COMPARED = _TIMING | {old for old, new in metrics.EPOCH_KEYS.items() if new in _TIMING}
NOT_COMPARED_PREFIX = metrics.SYSTEM_PREFIX


class ReproduceError(RuntimeError):
    """The run cannot be reproduced (not found, no recorded config, training failed)."""


@dataclass(frozen=True)
class Difference:
    """One metric point that is not equal: value None where a run has no such point."""

    key: str
    step: int
    original: float | None
    reproduction: float | None


def override_value(value: Any) -> str:
    """A config value in Hydra's override grammar, read back as exactly that value:
    null, true/false, repr of numbers (floats round-trip), quoted strings, lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def overrides_for(resolved: Mapping[str, Any], uri: str, experiment: str,
                  output_dir: Path) -> list[str]:
    """`key=value` for every leaf of the recorded config, with OWN_KEYS, the store, the
    experiment and the Hydra output directory of the reproduction."""
    # An Optuna trial's `trial.*` say which study it reported to: how it was launched, not
    # what it computed. The reproduction is a run of its own, reporting to no study.
    leaves = {k: v for k, v in configlib.flatten(resolved).items() if not k.startswith("trial.")}
    leaves |= OWN_KEYS | {"tracking.uri": uri, "tracking.experiment": experiment}
    return [f"{k}={override_value(v)}" for k, v in leaves.items()] + [
        f"hydra.run.dir={override_value(str(output_dir))}"]


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, list[float]]:
    """step -> the values logged at that step, in the order they were logged."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda p: (p.step, p.timestamp))
    out: dict[int, list[float]] = {}
    for p in points:
        out.setdefault(p.step, []).append(p.value)
    return out


def compared_keys(keys: set[str]) -> list[str]:
    return sorted(k for k in keys
                  if k not in NOT_COMPARED and not k.startswith(NOT_COMPARED_PREFIX))


def compare_runs(client: MlflowClient, original: str, reproduction: str
                 ) -> tuple[int, list[Difference]]:
    """(points compared, differences) over every compared metric of either run, step by
    step; equal means the same floats (NaN equals NaN), the same number of them."""
    keys = compared_keys(set(client.get_run(original).data.metrics)
                         | set(client.get_run(reproduction).data.metrics))
    compared, diffs = 0, []
    for key in keys:
        a, b = history(client, original, key), history(client, reproduction, key)
        for step in sorted(a.keys() | b.keys()):
            va, vb = a.get(step, []), b.get(step, [])
            for i in range(max(len(va), len(vb))):
                x = va[i] if i < len(va) else None
                y = vb[i] if i < len(vb) else None
                compared += 1
                if not _same(x, y):
                    diffs.append(Difference(key, step, x, y))
    return compared, diffs


def _same(x: float | None, y: float | None) -> bool:
    if x is None or y is None:
        return x is y
    return x == y or (math.isnan(x) and math.isnan(y))


def difference_table(diffs: list[Difference], limit: int = 50) -> str:
    """The differences as an aligned text table (the first `limit` rows)."""
    rows = [("metric", "step", "original", "reproduction", "difference")]
    for d in diffs[:limit]:
        delta = ("" if d.original is None or d.reproduction is None
                 else f"{d.reproduction - d.original:+.3g}")
        rows.append((d.key, str(d.step), _num(d.original), _num(d.reproduction), delta))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    if len(diffs) > limit:
        lines.append(f"... and {len(diffs) - limit} more")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "(missing)" if x is None else repr(x)


def code_checks(run_tags: Mapping[str, str], code_dir: Path) -> list[str]:
    """Lines about the original's commit and dirty flag against the code in code_dir."""
    now = tracking.environment_tags(code_dir, [], {})
    commit, then = now.get("mlflow.source.git.commit"), run_tags.get("mlflow.source.git.commit")
    if then is None and commit is None:
        lines = ["commit: none recorded and none now (not launched in a git checkout)"]
    elif then == commit:
        lines = [f"commit: same ({commit})"]
    else:
        lines = [f"commit: recorded {then}, now {commit}  <- DIFFERENT"]
    if run_tags.get("mlp.git.dirty") == "True":
        lines.append("dirty: the original ran with uncommitted changes: its code is not "
                     "known exactly")
    if now.get("mlp.git.dirty") == "True":
        lines.append("dirty: the code now has uncommitted changes")
    return lines


def provenance_checks(original: Mapping[str, str], reproduction: Mapping[str, str]
                      ) -> list[str]:
    """Lines comparing PROVENANCE_TAGS of the two runs."""
    lines = []
    for tag in PROVENANCE_TAGS:
        a, b = original.get(tag), reproduction.get(tag)
        lines.append(f"{tag}: {'same' if a == b else f'{a} -> {b}  <- DIFFERENT'}"
                     + (f" ({a})" if a == b and tag == "data.archive_sha256" else ""))
    return lines


def recorded_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The run's config/resolved.yaml artifact, or ReproduceError."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        except store.STORE_ERRORS as e:
            raise ReproduceError(f"run {run_id} has no {CONFIG_ARTIFACT} artifact to "
                                 f"reproduce it from: {e}") from e
        return yaml.safe_load(Path(path).read_text())


def _mlp_train() -> str:
    beside = Path(sys.executable).parent / "mlp-train"
    return str(beside) if beside.exists() else shutil.which("mlp-train") or "mlp-train"


def reproduce(client: MlflowClient, run_id: str, workdir: Path, code_dir: Path
              ) -> tuple[str, list[str]]:
    """Run `run_id` of the client's store again from its record into the same store and
    experiment (named to `mlp-train` by `tracking.uri`, the option that wins), launched
    from code_dir (whose git state is checked) with its outputs in workdir; returns the
    new run's id and the check lines (code before, provenance after)."""
    uri = client.tracking_uri
    try:
        run = client.get_run(run_id)
    except store.STORE_ERRORS as e:
        raise ReproduceError(f"no run {run_id} in {uri}: {e}") from e
    if run.data.tags.get(metrics.SWEEP_TAG) == "true":
        raise ReproduceError(
            f"run {run_id} is a sweep's parent, not a training run: reproduce one of its "
            f"children, or run the sweep again with: mlp-train -m "
            f"{run.data.tags.get('mlp.sweep.overrides', '<its overrides>')}")
    resolved = recorded_config(client, run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    checks = code_checks(run.data.tags, code_dir)
    env = dict(os.environ, MLFLOW_RUN_CONTEXT=json.dumps({REPRODUCES_TAG: run_id}))
    started = int(time.time() * 1000)
    out = subprocess.run([_mlp_train(), *overrides_for(resolved, uri, experiment, workdir)],
                         cwd=code_dir, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ReproduceError(f"mlp-train exited {out.returncode}:\n{out.stderr[-3000:]}")
    found = client.search_runs([run.info.experiment_id],
                               filter_string=f"tags.`{REPRODUCES_TAG}` = '{run_id}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found or found[0].info.start_time < started:
        raise ReproduceError(f"mlp-train finished but no run tagged {REPRODUCES_TAG}={run_id}")
    new = found[0]
    return new.info.run_id, checks + provenance_checks(run.data.tags, new.data.tags)


