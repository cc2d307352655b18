"""Sweeps: one MLflow parent run per multirun, each job a child run, whatever the launcher.

`SweepCallback` is a Hydra callback (registered in `conf/config.yaml`). Before any job
starts it creates the tracking store and the experiment (concurrent first use of a fresh
SQLite store races in MLflow's migrations), opens the parent run and writes its id to
`<sweep dir>/mlflow_parent.json`, where every job finds it: in this process (basic
launcher), in joblib's worker processes, in submitit jobs on this or another machine
(the sweep dir is on a shared file system there). It also gives each joblib worker its
share of the cores for BLAS before NumPy loads there. After the last job it logs the
comparison report on the parent and ends it with the sweep's outcome, once the jobs run
in this process have recorded their tails (`tracking.deferred`: the next job trains
meanwhile).

The outcome comes from the store, whatever the launcher (joblib and submitit jobs run in
other processes): the report's rows, one per job of the parent (its latest attempt; a
FINISHED one stands for its config). A job counts as failed when that attempt ended FAILED
(diverged, crashed, data problem, failed gradient check, a checkpoint it could not resume)
or was killed without being pruned; a pruned Optuna trial is not a failure, and a job
still RUNNING in another live worker of the same sweep is neither. The parent ends FAILED
when any job failed (or the outcome could not be read), else FINISHED; its tag
`mlp.sweep.outcome` (`4 of 4 finished`, `1 of 2 failed`) and the first line of its
description say the same, and `last_outcome()` hands it to `mlp-train`, which exits 1 on
a failure. The outcome covers every job the parent holds: a re-run of a grid retries the
failed configs, so a green re-run means the whole grid finished.

A parent is identified by the sweep's definition (config name, overrides, sweeper
params): re-running the same sweep reopens the same parent, and the jobs skip configs
that already finished and resume those that were killed (see `cli.train`).
"""

from __future__ import annotations

import _thread
import atexit
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlp.sweeps import slurm
from mlp.tracking.keys import (
    ACC_BEST_VAL,
    CONFIG_HASH_TAG,
    RECORD_TAG,
    SWEEP_HASH_TAG,
    SWEEP_NAME_TAG,
    SWEEP_TAG,
    SWEPT_TAG,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("mlp.sweep")

PARENT_FILE = "mlflow_parent.json"
OUTCOME_TAG = "mlp.sweep.outcome"  # on the parent: `4 of 4 finished`, `1 of 2 failed`
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

def config_hash(resolved: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the resolved config without its bookkeeping keys
    (`config.BOOKKEEPING`: tracking, output locations, progress bars), which do not change
    the computation."""
    from mlp.config import schema as configlib

    flat = configlib.flatten({k: v for k, v in resolved.items() if k != "hydra"})
    return _digest({k: v for k, v in flat.items() if not configlib.is_bookkeeping(k)})


def swept_keys(overrides: list[str], sweeper_params: dict[str, Any]) -> dict[str, str]:
    """{key or group: its values as written} of what a multirun sweeps: the command line's
    sweep overrides (`optim.lr=1e-3,1e-2`, `optim=sgd,adam`, `range(...)`) and the
    sweeper's params (a preset's `hydra.sweeper.params`, an Optuna search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = {key: str(value) for key, value in sweeper_params.items()}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            swept[override.key_or_group] = override.input_line.partition("=")[2]
    return dict(sorted(swept.items()))


def child_name(swept: list[str], overrides: list[str]) -> str:
    """A sweep job's run name from its values of the swept keys: `lr=3e-3 reg=1e-4`."""
    from mlp.tracking.names import short_number

    given = {k.lstrip("+~"): v for k, _, v in (o.partition("=") for o in overrides)}
    parts = []
    for key in swept:
        value = given.get(key, "?")
        try:
            value = short_number(float(value))
        except ValueError:
            pass
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts)


def _digest(tree: Any) -> str:
    """16 hex digits of the sha256 of a JSON-able tree, independent of key order."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_parent_run(client: MlflowClient, experiment_id: str, name: str,
                    tags: Mapping[str, str]) -> str:
    """The parent run of a sweep in the client's store: the one with the same
    `mlp.sweep.hash` tag if the sweep ran before (reopened as RUNNING), else a new one."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_HASH_TAG}` = '{tags[SWEEP_HASH_TAG]}'",
        max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    return client.create_run(experiment_id, run_name=name, tags=dict(tags)).info.run_id


def runs_with_config(client: MlflowClient, experiment_id: str, config_hash: str) -> list:
    """Training runs of the experiment whose `mlp.config_hash` tag is config_hash, newest
    first."""
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{config_hash}'",
        order_by=["attributes.start_time DESC"])


def read_parent(sweep_dir: str | Path) -> dict | None:
    """The parent run written by `SweepCallback` for this sweep dir, if any."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def blas_threads(n_jobs: int, cores: int | None = None) -> int:
    """BLAS threads per job so that n_jobs parallel jobs share the cores without
    oversubscription. n_jobs as joblib reads it: -1 all cores, -2 all but one, ..."""
    cores = cores or os.cpu_count() or 1
    if n_jobs < 0:
        n_jobs = cores + 1 + n_jobs
    return max(1, cores // max(1, n_jobs))


@dataclass
class SweepOutcome:
    """How the jobs of a sweep ended: how many there are, finished, pruned, still running,
    the failed ones as `<name>: <first line of the error>`, and the ones that trained but
    whose record is incomplete as `<name>: <its mlp.record>`; `error` says why the outcome
    could not be read (then it counts as a failure)."""

    total: int = 0
    finished: int = 0
    pruned: int = 0
    running: int = 0
    failed: list[str] = field(default_factory=list)
    error: str | None = None
    incomplete: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, rows: Sequence[Mapping[str, Any]]) -> SweepOutcome:
        """From a sweep report's rows (`report.Report.rows`: run, status, error, record)."""
        from mlp.tracking import receipt

        statuses = [row["status"] for row in rows]
        failed = [f"{row['run']}: {row.get('error') or status.lower()}"
                  for row, status in zip(rows, statuses, strict=True)
                  if status not in ("FINISHED", "PRUNED", "RUNNING")]
        incomplete = [f"{row['run']}: {row['record']}" for row in rows
                      if row["status"] != "RUNNING"
                      and receipt.is_incomplete(row.get("record"))]
        return cls(len(rows), statuses.count("FINISHED"), statuses.count("PRUNED"),
                   statuses.count("RUNNING"), failed, incomplete=incomplete)

    @property
    def ok(self) -> bool:
        return not self.failed and self.error is None

    @property
    def complete(self) -> bool:
        """Whether every job's record is whole (`mlp.record`) besides `ok`."""
        return self.ok and not self.incomplete

    def sync_commands(self) -> list[str]:
        """The `mlp-sync` commands that send what the incomplete jobs keep."""
        from mlp.tracking import receipt

        spools = [receipt.spool_of(line.partition(": ")[2]) for line in self.incomplete]
        return [f"mlp-sync {p.parent}" for p in dict.fromkeys(spools) if p is not None]

    @property
    def status(self) -> str:
        """The parent's final status: FINISHED only when no job failed."""
        return "FINISHED" if self.ok else "FAILED"

    def tag(self) -> str:
        """`4 of 4 finished`, `1 of 2 failed`, `3 of 4 finished, 1 pruned`."""
        if self.error is not None:
            return "unknown"
        if self.failed:
            return f"{len(self.failed)} of {self.total} failed"
        if self.incomplete:
            return f"{len(self.incomplete)} of {self.total} incomplete"
        others = [f"{n} {what}" for n, what in ((self.pruned, "pruned"),
                                                 (self.running, "still running")) if n]
        return ", ".join([f"{self.finished} of {self.total} finished", *others])

    def summary(self) -> str:
        """The sweep's last line: `mlp-lab: 1 of 2 children failed: lr=1e6: training
        diverged ...` (failures joined by `; `)."""
        if self.error is not None:
            return f"mlp-lab: the sweep's outcome could not be read: {self.error}"
        if self.failed:
            return (f"mlp-lab: {len(self.failed)} of {self.total} children failed: "
                    + "; ".join(self.failed))
        if self.incomplete:
            return (f"mlp-lab: {len(self.incomplete)} of {self.total} children trained, but "
                    "their record is incomplete: " + "; ".join(self.incomplete)
                    + "; send it with: " + "; ".join(self.sync_commands()))
        return f"mlp-lab: {self.tag().replace(' finished', ' children finished', 1)}"


_outcome: SweepOutcome | None = None
_slurm_watch: slurm.JobWatch | None = None  # the SLURM jobs of this process's sweep


def slurm_gave_up() -> str | None:
    """Why the watch of this process's SLURM jobs cancelled them itself (a job that can
    never start, or too long pending), or None."""
    return _slurm_watch.cancelled if _slurm_watch is not None else None


def last_outcome() -> SweepOutcome | None:
    """The outcome of the sweep that ended last in this process (None: no sweep ended)."""
    return _outcome


class SweepCallback(Callback):
    """Parent run around a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.parent: dict | None = None
        self.client: MlflowClient | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlp.tracking import deferred, masking, store  # mlflow loads when a sweep starts

        masking.install()
        deferred.allow()  # the jobs run here (basic launcher) record their tails meanwhile

        hydra = config.hydra
        launcher = str(hydra.launcher.get("_target_", ""))
        if "Joblib" in launcher:
            threads = blas_threads(int(hydra.launcher.get("n_jobs", -1)))
            for var in THREAD_VARS:
                os.environ.setdefault(var, str(threads))
            log.info("joblib launcher: %s BLAS thread(s) per job",
                     os.environ["OPENBLAS_NUM_THREADS"])

        uri = store.resolve_uri(config.tracking.uri, hydra.runtime.cwd)
        self.client, experiment_id = store.connect(uri, config.tracking.experiment)
        overrides = list(hydra.overrides.task)
        params = hydra.sweeper.get("params")
        sweeper_params = OmegaConf.to_container(params, resolve=True) if params else {}
        definition = {"config": hydra.job.config_name, "overrides": sorted(overrides),
                      "sweeper": sweeper_params}
        sweep_hash = _digest(definition)
        name = _sweep_name(config, overrides)
        swept = swept_keys(overrides, sweeper_params)
        run_id = open_parent_run(self.client, experiment_id, name, {
            SWEEP_TAG: "true", SWEEP_HASH_TAG: sweep_hash, SWEEP_NAME_TAG: name,
            "mlp.sweep.overrides": masking.mask(" ".join(overrides)),
            "mlp.sweep.params": masking.mask(json.dumps(sweeper_params)),
            "mlp.sweep.launcher": launcher.rsplit(".", 1)[-1],
            SWEPT_TAG: " ".join(swept),
            **{f"{SWEPT_TAG}.{key}": values for key, values in swept.items()}})
        self.parent = {"run_id": run_id, "experiment_id": experiment_id, "uri": uri,
                       "name": name, "swept": list(swept)}
        sweep_dir = Path(hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(json.dumps(masking.mask_tree(self.parent)))
        atexit.register(self._end_if_running, "KILLED")
        if slurm.is_slurm(hydra.launcher):
            global _slurm_watch
            # submitit writes each array's batch script beside the jobs' folders (%j).
            folder = (Path(hydra.runtime.cwd) / str(hydra.launcher.submitit_folder)).parent
            # Kept apart from the callback, which submitit pickles into every job.
            _slurm_watch = slurm.JobWatch(folder, config.cluster.status_every_s,
                                          config.cluster.max_pending_s,
                                          on_cancel=_thread.interrupt_main).start()
            atexit.register(self._cancel_jobs)  # atexit runs it before ending the parent
        log.info("MLflow parent run %s (%s) at %s", run_id, name, masking.mask(uri))

    def _cancel_jobs(self) -> None:
        """The sweep ends before its jobs (Ctrl-C, SIGTERM, a job that can never start):
        scancel them, so that no job outlives its sweep, and say so on the parent."""
        watch = _slurm_watch
        if watch is None or watch.done:
            return
        watch.stop()
        watch.cancel("the sweep was interrupted")
        if self.client is None or self.parent is None:
            return
        why = watch.cancelled or "no job was queued"
        self.client.set_tag(self.parent["run_id"], "slurm.cancelled", why)
        # A job killed before it could end its run (still starting, or past the grace
        # period) leaves it RUNNING: the sweep says what became of it.
        from mlp.tracking import liveness

        for child in self.client.search_runs(
                [self.parent["experiment_id"]],
                f"tags.mlflow.parentRunId = '{self.parent['run_id']}' "
                "and attributes.status = 'RUNNING'"):
            self.client.set_tag(child.info.run_id, liveness.REASON_TAG,
                                f"its SLURM job was cancelled with the sweep: {why}")
            self.client.set_terminated(child.info.run_id, status="KILLED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Report on the parent, then end it with the outcome (see the module docstring),
        once every job's deferred tail has ended (`tracking.deferred`)."""
        global _outcome
        # The report's modules (matplotlib among them: most of a second) load while the
        # last job's tail is still recorded, mostly by the painter on the other core.
        from mlp.sweeps import report
        from mlp.tracking import deferred, liveness, painter

        tails_failed = deferred.wait()
        painter.stop()  # every tail has its figures
        if self.parent is None or self.client is None:
            return
        watch = _slurm_watch
        if watch is not None:  # every job is done: nothing left to watch or cancel
            watch.stop()
            watch.done = True
            if watch.array_ids:
                self.client.set_tag(self.parent["run_id"], "slurm.array_job_id",
                                    " ".join(sorted(watch.array_ids)))
        client = self.client
        run_id = self.parent["run_id"]
        liveness.reap_dead_runs(client)  # a job killed outright did not end its run
        outcome = None
        out_dir = Path(config.hydra.sweep.dir) / "report"
        try:
            table = report.log_sweep_report(client, run_id, out_dir)
            log.info("sweep report:\n%s", table)
            outcome = SweepOutcome.of(_whole_errors(client, table.rows))
            log.info("%s", self._where_to_look(table, out_dir))
        except Exception as e:  # a report must never lose the sweep's results
            log.warning("could not build the sweep report: %s", e)
        try:
            if outcome is None:  # read again without the report
                outcome = recheck_outcome(client, run_id)
            else:
                record_outcome(client, run_id, outcome)
        except Exception as e:  # the store is unreadable: nothing says the jobs succeeded
            outcome = SweepOutcome(error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
            log.warning("could not read how the jobs ended: %s", outcome.error)
        # A tail that failed counts even when the store could not take its run's end.
        outcome.failed += [why for run, why in tails_failed.items()
                           if not _ended_failed(client, run)]
        _outcome = outcome
        self._end_if_running(outcome.status)

    def _where_to_look(self, table: Any, out_dir: Path) -> str:
        """The sweep's closing lines: the parent run and the chart view of its children in
        the MLflow UI, the report on disk, the best model and the command that trains the
        best configuration again."""
        from mlp.sweeps import report
        from mlp.tracking import masking
        from mlp.tracking.recorder import how_to_view

        parent = self.parent or {}
        run_id = parent["run_id"]
        lines = [f"sweep {parent['name']}: parent run {run_id}: " + how_to_view(
                     masking.mask(parent["uri"]), parent["experiment_id"], run_id,
                     children=True),
                 f"report: {out_dir / 'report.html'} (also under the parent's Artifacts; "
                 f"again with: mlp-report --experiment {table.experiment} "
                 f"--sweep {parent['name']})"]
        registered = self.client.get_run(run_id).data.tags.get("mlp.sweep.registered_model")
        if registered:
            lines.append(f"best model: models:/{registered.split(' ')[0]}")
        if table.best is not None and table.best["overrides"]:
            lines.append(f"best configuration ({table.best['run']}): "
                         + report.reproduce_command(table.best["overrides"]))
        return "\n".join(lines)

    def _end_if_running(self, status: str) -> None:
        """End the parent (its outcome, or KILLED when the process exits mid-sweep)."""
        if self.parent is None or self.client is None:
            return
        client = self.client
        if client.get_run(self.parent["run_id"]).info.status == "RUNNING":
            client.set_terminated(self.parent["run_id"], status=status)


def record_outcome(client: Any, run_id: str, outcome: SweepOutcome) -> None:
    """Say `outcome` on the parent `run_id`: its OUTCOME_TAG and the headline of its
    description's glance (`glance.with_headline`, `headline`), in place of what an earlier
    outcome said there."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from mlp.tracking import glance

    note = client.get_run(run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
    client.set_tag(run_id, OUTCOME_TAG, outcome.tag())
    client.set_tag(run_id, MLFLOW_RUN_NOTE, glance.with_headline(note, headline(outcome)))


def headline(outcome: SweepOutcome) -> str:
    """The outcome in one line of the parent's glance (HTML, `glance.LINE_CHARS`): `<b>Outcome:
    2 of 6 failed</b>: lr=1e4 reg=0, lr=1e4 reg=1e-3`, the failed or incomplete jobs by
    name, as many as fit, then `+N more`. Their errors are in the report the glance links
    to, each job's own run and the sweep's last line: a second line would push the best
    runs under MLflow's fold."""
    from mlp.tracking import glance

    head = f"Outcome: {outcome.tag()}"
    names = [line.partition(": ")[0] for line in outcome.failed + outcome.incomplete]
    shown: list[str] = []
    for name in names:
        more = len(names) - len(shown) - 1
        said = ", ".join([*shown, name]) + (f" +{more} more" if more else "")
        if len(head) + 2 + len(said) > glance.LINE_CHARS:
            break
        shown.append(name)
    if names and not shown:  # a name too long for the line: its start
        tail = f" +{len(names) - 1} more" if len(names) > 1 else ""
        shown = [names[0][:max(glance.LINE_CHARS - len(head) - 3 - len(tail), 1)] + "…"]
    more = len(names) - len(shown)
    said = ", ".join(shown) + (f" +{more} more" if more else "")
    return f"<b>{glance.escape(head)}</b>" + (f": {glance.escape(said)}" if said else "")


def recheck_outcome(client: Any, parent_run_id: str) -> SweepOutcome:
    """The outcome of the sweep under `parent_run_id` read again from the store and
    recorded (`record_outcome`): when the sweep's report could not be built, and after
    `mlp-sync` has completed the record of its jobs."""
    from mlp.sweeps import report

    parent = client.get_run(parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id).name
    outcome = SweepOutcome.of(_whole_errors(
        client, report.build_report(client, experiment, parent_run_id).rows))
    record_outcome(client, parent_run_id, outcome)
    return outcome


def _ended_failed(client: MlflowClient, run_id: str) -> bool:
    """Whether the store says run_id ended FAILED (the sweep's outcome counted it)."""
    try:
        return client.get_run(run_id).info.status == "FAILED"
    except Exception:  # unreadable: the failure is counted from what the process knows
        return False


def _whole_errors(client: Any, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The report's rows with the whole first line of each failed run's error (the table
    shortens it; the closing line names what went wrong, run ids and paths included)."""
    whole = []
    for row in rows:
        if row.get("error"):
            message = client.get_run(row["run_id"]).data.tags.get("error.message", "")
            row = {**row, "error": message.strip().split("\n")[0] or row["error"]}
        whole.append(dict(row))
    return whole


def _sweep_name(config: DictConfig, overrides: list[str]) -> str:
    """The search's name, the same for every sweep of it: the sweep preset's name (or the
    experiment preset's) when the sweep uses one, else its swept keys (`reg-lr`). The
    sweeps of one search share a registered model (`report.registered_name`), and
    `mlp-report --sweep <name>` reads the latest."""
    for group in ("hparams_search", "experiment"):
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") == group and "," not in value:
                return value
    params = config.hydra.sweeper.get("params")
    swept = swept_keys(overrides, OmegaConf.to_container(params) if params else {})
    return "-".join(key.rsplit(".", 1)[-1] for key in swept) or "multirun"


def earlier_attempts(client: MlflowClient, experiment_id: str, config_hash: str,
                     resume: str | None) -> tuple[float | None, str | None, str | None]:
    """For a sweep job, what the earlier runs of its config leave it to do:
    (best val accuracy, None, None) when the config already finished in the experiment
    (skip it); (None, checkpoint, run id) to continue its killed run `run id` from
    `resume` when given, else from that run's own checkpoint (the resume refuses a
    checkpoint that another run wrote); (None, resume, None) for a new run.

    A killed run's spool is sent first: a run whose end could not reach the store (a
    database lock that outlasted the job) was marked KILLED by the reaper but finished,
    and its spooled end makes it FINISHED again instead of training the config twice.
    A finished run whose record is incomplete (`mlp.record`) counts as finished only once
    its spool is sent and the store holds everything (`receipt.repair`: repair before
    retraining); when its spool is not on this machine or the store still does not take
    it, the config is trained again as a new run."""
    from mlp.tracking import spool as spoollib

    earlier = runs_with_config(client, experiment_id, config_hash)
    killed = [r for r in earlier if r.info.status == "KILLED" and "checkpoint" in r.data.tags]
    if any([spoollib.send_pending(spoollib.beside(Path(r.data.tags["checkpoint"])),
                                  known=(client.tracking_uri,))
            for r in killed]):
        earlier = runs_with_config(client, experiment_id, config_hash)
    finished = [r for r in earlier if r.info.status == "FINISHED"
                and _whole(client, r.info.run_id, r.data.tags)]
    if finished:
        log.info("skipping: this config already finished as run %s", finished[0].info.run_id)
        return (client.get_run(finished[0].info.run_id).data.metrics
                .get(ACC_BEST_VAL, math.nan), None, None)
    killed = [r for r in earlier if r.info.status == "KILLED"
              and Path(r.data.tags.get("checkpoint", "")).is_file()]
    if not killed:
        return None, resume, None
    run = killed[0]
    checkpoint = resume or run.data.tags["checkpoint"]
    log.info("resuming killed run %s from %s", run.info.run_id, checkpoint)
    return None, checkpoint, run.info.run_id


def _whole(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> bool:
    """Whether a finished run's record is whole, after sending its spool when it was not."""
    from mlp.tracking import receipt

    if not receipt.is_incomplete(tags.get(RECORD_TAG)):
        return True
    done = receipt.repair(client, run_id, known=(client.tracking_uri,))
    if done is not None and done.complete:
        return True
    log.warning("run %s finished, but its record is still %s: training the config again",
                run_id, tags[RECORD_TAG] if done is None else done.tag())
    return False
