"""`mlp-train`: one training run, or a sweep of them (`-m`), recorded in MLflow.

A Hydra app over `conf/` (installed as the package `mlp.conf`). The order of
events matters: validate the config, connect to the tracking
store, prepare data and model (every error so far exits non-zero with no MLflow run),
then start the run, and whatever happens next, end it with the right status.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from mlp import data as datalib
from mlp.cli import build, exits
from mlp.config import schema as configlib
from mlp.sweeps import callback as sweeplib
from mlp.tracking import cluster, deferred, glance, liveness, masking, names, painter, receipt
from mlp.tracking import keys as metrics
from mlp.tracking import recorder as tracking
from mlp.tracking import spool as spoollib
from mlp.tracking.store import StoreError
from mlp.training import console
from mlp.training.trainer import DivergenceError, Interrupted, Trainer, TrainResult

log = logging.getLogger("mlp")

configlib.register()


@dataclass
class Job:
    """Where this run comes from: the directory it was launched in, its Hydra output
    directory, its overrides as typed, and the sweep it is a job of (None alone)."""

    launch_dir: Path
    output_dir: Path
    overrides: list[str]
    parent: dict | None

    @classmethod
    def from_hydra(cls) -> Job:
        hc = HydraConfig.get()
        parent = sweeplib.read_parent(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
        return cls(Path(hc.runtime.cwd), Path(hc.runtime.output_dir), list(hc.overrides.task),
                   parent)

    def cannot_start(self, cfg: DictConfig, error: ValueError, what: str,
                     config_hash: str | None = None) -> float:
        """Alone: the message and exit 2. In a sweep: a FAILED child run that says why
        (named and, when known, tagged with its config hash like the job's other runs), and
        NaN for the sweeper, so that the sweep goes on and counts it failed at its end."""
        if self.parent is None:
            exits.refused(what, error)
        log.error("job cannot run, the sweep goes on: %s", error)
        client, experiment_id = exits.connect(cfg, self.launch_dir)
        tags = tracking.environment_tags(self.launch_dir, self.overrides, {})
        if config_hash is not None:
            tags[sweeplib.CONFIG_HASH_TAG] = config_hash
        tracking.start_failed_run(client, experiment_id, self.run_name(
            cfg, OmegaConf.to_container(cfg, resolve=True)), tags, error,
            parent_run_id=self.parent["run_id"])
        return math.nan

    def run_name(self, cfg: DictConfig, resolved: dict[str, Any]) -> str:
        """tracking.run_name, else in a sweep its swept values (`lr=1e6 reg=0`), else a
        name made of the config."""
        parent = self.parent
        return cfg.tracking.run_name or (
            sweeplib.child_name(parent["swept"], self.overrides)
            if parent and parent.get("swept") else names.run_name(resolved))

    def command(self, extra: list[str]) -> str:
        """The mlp-train command line of this run, with `extra` overrides."""
        return console.command("mlp-train", self.overrides, extra)


def train(cfg: DictConfig) -> float:
    """One training run, recorded in MLflow; returns the best validation accuracy.

    Before its own work it sends the spools of the experiment's incomplete runs that are
    on this machine (`receipt.repair_incomplete`). Alone, every problem exits non-zero
    with a message (2: config, data, a checkpoint that cannot be resumed or a store that
    cannot create the run, before training; 1: failure, a full disk under the spool
    included; 3: failed gradient check; 4: trained but the record is incomplete; 130:
    interrupted). As a job of a sweep (`-m`), the run is a child of the sweep's parent
    run, a config that already finished in the experiment is skipped, one that was killed
    is resumed into the same run (from its own checkpoint: another run's is refused), its
    checkpoints go to its own subfolder of trainer.checkpoint_dir when that is set, and a
    job that fails is recorded FAILED and returns NaN so that the sweep goes on (and exits
    1 at its end, see `train_main`); only an interruption stops the sweep. In a sweep run
    in this process (the basic launcher), the run's tail (figures, model, final metrics,
    its end and receipt) is recorded while the next job trains (`tracking.deferred`).
    """
    job = Job.from_hydra()
    try:
        configlib.validate(cfg)
    except ValueError as e:
        return job.cannot_start(cfg, e, "invalid configuration")
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    for warning in configlib.inactive_overrides(configlib.flatten(resolved), [
            o.partition("=")[0].lstrip("+~") for o in job.overrides]):
        log.warning("%s", warning)
    client, experiment_id = exits.connect(cfg, job.launch_dir)
    liveness.reap_dead_runs(client)
    receipt.repair_incomplete(client, experiment_id, known=(client.tracking_uri,))
    config_hash = sweeplib.config_hash(resolved)
    resume, killed_run = cfg.trainer.resume, None
    if job.parent is not None:
        finished, resume, killed_run = sweeplib.earlier_attempts(
            client, experiment_id, config_hash, resume)
        if finished is not None:
            return finished
        _own_checkpoint_dir(cfg, resolved, config_hash)
    try:
        splits = build.load_data(cfg)
    except datalib.DataError as e:
        return job.cannot_start(cfg, e, "data problem", config_hash)
    trainer = build.build_trainer(cfg, splits, job.output_dir)
    try:
        continued = _resume(client, trainer, resume, job, killed_run) if resume else None
    except ValueError as e:
        return job.cannot_start(cfg, e, "invalid configuration", config_hash)

    try:
        recorder, name = _start_recording(cfg, resolved, job, (client, experiment_id), splits,
                                          trainer, config_hash, continued)
    except StoreError as e:  # the run could not be created: nothing is trained
        print(masking.mask(f"mlp-lab: {e}"), file=sys.stderr)
        if job.parent is None:
            sys.exit(exits.EXIT_CONFIG)
        return math.nan
    archive = build.archive_override(cfg, job.overrides)
    killed = (Interrupted, KeyboardInterrupt, *_pruned())
    try:
        with recorder.ending_on_error(killed=killed):
            result, datasets = _check_and_train(cfg, resolved, job, recorder, trainer, splits,
                                                name, first=continued is None, archive=archive)
        deferred.run(functools.partial(_record_and_end, recorder, killed, cfg, trainer, splits,
                                       result, datasets, name, alone=job.parent is None),
                     recorder.run_id, name)
    except Interrupted as e:
        log.warning("%s\nresume with: %s", e, _resume_command(job, archive, e))
        if job.parent is not None:
            raise KeyboardInterrupt(str(e)) from e  # stop the whole sweep
        sys.exit(exits.EXIT_INTERRUPTED)
    except Exception as e:
        if job.parent is not None and not isinstance(e, _pruned()):
            log.error("job failed, the sweep goes on: %s: %s", type(e).__name__, e)
            return math.nan
        _exit_for(e, trainer)
    _summary(result, recorder.run_id,
             tracking.how_to_view(client.tracking_uri, experiment_id, recorder.run_id),
             job.command(archive))
    if job.parent is None and recorder.receipt is not None and not recorder.receipt.complete:
        exits.incomplete(f"run {recorder.run_id}", recorder.receipt)
    return result.best_val_acc


def _record_and_end(recorder: tracking.RunRecorder, killed: tuple[type[BaseException], ...],
                    cfg: DictConfig, trainer: Trainer, splits: datalib.Splits,
                    result: TrainResult, datasets: dict[str, Any], name: str,
                    alone: bool) -> None:
    """A trained run's tail: its results (`record_result`), then its end and receipt. In
    a sweep a record that is incomplete is a warning here, and the sweep counts it from
    the run's `mlp.record` (alone, `train` exits 4). Deferred in a sweep run in this
    process (`tracking.deferred`): the next job trains meanwhile."""
    with recorder.finishing(killed=killed):
        record_result(recorder, cfg, trainer, splits, result, datasets, name)
    if not alone and recorder.receipt is not None and not recorder.receipt.complete:
        log.warning("run %s trained, but its record is %s", recorder.run_id,
                    recorder.receipt.tag())


def _exit_for(e: Exception, trainer: Trainer) -> None:
    """A run alone that failed in a way one line can say: that line and its exit code (a
    full disk under the spool, with the checkpoint that resumes it, a divergence, a model
    the store refused: 1; a failed gradient check: 3). Any other error is raised as is."""
    if isinstance(e, spoollib.SpoolError):
        ckpt = trainer.checkpoint_path()
        print(masking.mask(f"mlp-lab: {e}\ntraining stopped; its last checkpoint, "
                           f"{ckpt}, resumes it with trainer.resume={ckpt}"), file=sys.stderr)
        sys.exit(exits.EXIT_FAILED)
    if isinstance(e, DivergenceError | exits.GradcheckFailed | tracking.ModelRefused):
        print(masking.mask(f"mlp-lab: {e}"), file=sys.stderr)
        sys.exit(exits.EXIT_GRADCHECK if isinstance(e, exits.GradcheckFailed)
                 else exits.EXIT_FAILED)
    raise e


def _pruned() -> tuple[type[BaseException], ...]:
    """Optuna's TrialPruned, when Optuna is there: a pruned trial ends KILLED."""
    try:
        from optuna import TrialPruned
    except ImportError:
        return ()
    return (TrialPruned,)


def _resume_command(job: Job, archive: list[str], e: Interrupted) -> str:
    """The command that continues an interrupted run."""
    return job.command([*archive, f"trainer.resume={e.checkpoint}"])


def _own_checkpoint_dir(cfg: DictConfig, resolved: dict[str, Any], config_hash: str) -> None:
    """A sweep job with trainer.checkpoint_dir set keeps its checkpoints, and the spool
    beside them, in `<checkpoint_dir>/<config hash>`: the jobs of a sweep (and of sweeps
    sharing the setting) never share a file, and a re-run finds a config's folder again."""
    base = cfg.trainer.checkpoint_dir
    if base:
        own = str(Path(base) / config_hash)
        cfg.trainer.checkpoint_dir = resolved["trainer"]["checkpoint_dir"] = own


def _resume(client: MlflowClient, trainer: Trainer, checkpoint: str, job: Job,
            killed_run: str | None) -> str | None:
    """Load a checkpoint into the trainer (validated whole first, and written by
    `killed_run` when a sweep job continues that run: a ValueError names the problem),
    send what an earlier attempt could not; returns the run to continue: the checkpoint's
    run, unless that one finished or, in a sweep, is not this config's killed run (a
    resume never changes another run's status: it continues as a new run)."""
    try:
        run_id = trainer.load_checkpoint(checkpoint, run_id=killed_run).get("run_id")
    except (OSError, ValueError) as e:
        raise ValueError(f"trainer.resume: {e}") from e
    spoollib.send_pending(spoollib.beside(Path(checkpoint)), known=(client.tracking_uri,))
    if run_id is None:
        return None
    if client.get_run(run_id).info.status == "FINISHED" or (job.parent is not None
                                                            and run_id != killed_run):
        log.info("run %s is finished or another job's: this resume is recorded as a new run",
                 run_id)
        trainer.meta["resumed_from"] = run_id
        return None
    return run_id


def _start_recording(cfg: DictConfig, resolved: dict[str, Any], job: Job,
                     store: tuple[MlflowClient, str], splits: datalib.Splits, trainer: Trainer,
                     config_hash: str, continued: str | None
                     ) -> tuple[tracking.RunRecorder, str]:
    """Start (or reopen) the MLflow run with the run's tags, and attach its recorder and
    the per-epoch printer (and Optuna's pruning reporter in a trial) to the trainer."""
    client, experiment_id = store
    tags = tracking.environment_tags(job.launch_dir, job.overrides, splits.fingerprint)
    tags[sweeplib.CONFIG_HASH_TAG] = config_hash
    tags["mlp.blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    tags |= liveness.process_tags() | cluster.slurm_tags()
    if "resumed_from" in trainer.meta:
        tags["mlp.resumed_from"] = trainer.meta["resumed_from"]
    if trainer.checkpoint_path() is not None:  # known from the start: a killed run resumes
        tags["checkpoint"] = str(trainer.checkpoint_path())
    parent = job.parent
    name = job.run_name(cfg, resolved)
    if parent is not None:
        tags[sweeplib.SWEEP_NAME_TAG] = parent.get("name", "")
    recorder = tracking.start_run(client, experiment_id, name, tags, run_id=continued,
                                  log_every_steps=cfg.tracking.log_every_steps,
                                  parent_run_id=parent and parent["run_id"],
                                  system_metrics=cfg.tracking.system_metrics,
                                  spool_path=spoollib.beside(trainer.checkpoint_path()))
    if continued is not None:  # what the interrupted attempt left no longer holds
        recorder.clear_tags(("error.type", "error.message", liveness.REASON_TAG))
        recorder.count_stored()
    trainer.meta["run_id"] = recorder.run_id
    trainer.observers += [recorder, console.EpochPrinter(cfg.trainer.epochs)]
    trial = cfg.get("trial")
    if trial is not None and trial.get("study") is not None:
        from mlp.sweeps.pruning import TrialReporter

        trainer.observers.append(TrialReporter(trial.storage, trial.study, trial.id))
    log.info("MLflow run %s (%s) in experiment %r at %s", recorder.run_id, name,
             cfg.tracking.experiment, masking.mask(client.tracking_uri))
    return recorder, name


def _check_and_train(cfg: DictConfig, resolved: dict[str, Any], job: Job,
                     recorder: tracking.RunRecorder, trainer: Trainer, splits: datalib.Splits,
                     name: str, first: bool, archive: list[str]
                     ) -> tuple[TrainResult, dict[str, Any]]:
    """What a run does inside its record before its results: config, datasets and
    gradient check (the first time), then training; returns the result and the datasets.
    An interruption leaves the checkpoint and the command that resumes it as tags; a
    pruned trial says so."""
    datasets = tracking.split_datasets(splits, cfg.data.name, build.data_source(cfg))
    if first:
        recorder.log_config(resolved, job.overrides, job.output_dir / ".hydra")
        recorder.log_datasets(datasets)
        if cfg.gradcheck.enabled:
            report = build.run_gradcheck(cfg)
            log.info("gradient check (float64, widths <= %d):\n%s", cfg.gradcheck.max_width,
                     report)
            recorder.log_gradcheck(report)
            precision = build.run_step_precision(cfg)
            log.info("training step in %s: %s", precision.dtype, precision)
            recorder.log_step_precision(precision)
            if not report.passed and cfg.gradcheck.stop_on_fail:
                raise exits.GradcheckFailed(f"gradient check failed: max relative error "
                                      f"{report.max_rel_error:.2e} >= tol {report.tol:g}")
    try:
        result = trainer.fit()
    except Interrupted as e:
        recorder.set_tags({"checkpoint": str(e.checkpoint),
                           "resume": _resume_command(job, archive, e)})
        raise
    except _pruned():
        recorder.set_tags({"optuna.pruned": "true"})
        raise
    return result, datasets


def _summary(result: TrainResult, run_id: str, view: str, reproduce: str) -> None:
    """The closing lines: accuracies and gap at the kept (best) epoch, where to look, and
    the command that runs it again."""
    best = result.best_epoch - 1
    train_acc, val_acc = result.history["train_acc"][best], result.history["val_acc"][best]
    log.info("done: accuracy train %.4f / val %.4f / test %.4f (gap %+.4f) at the best epoch, "
             "%d of %d%s\nrun %s: %s\nrun it again: %s", train_acc, val_acc, result.test_acc,
             train_acc - val_acc, result.best_epoch, result.epochs_run,
             " (stopped early)" if result.stopped_early else "", run_id, view, reproduce)


def record_result(recorder: tracking.RunRecorder, cfg: DictConfig, trainer: Trainer,
                  splits: datalib.Splits, result: TrainResult, datasets: dict[str, Any],
                  name: str) -> None:
    """The summary of a finished training (the best validation accuracy and its epoch,
    once), figures, the model, the test metrics (once, linked to the model and the test
    split) and the description. With the store gone, the metrics and tags go
    to the run's spool and the rest is named in a warning (`Sink.unless_offline`); a model
    the store refuses (`tracking.ModelRefused`) is raised once the rest is recorded, so
    that the run ends FAILED with that refusal as its error."""
    recorder.set_tags({"checkpoint": str(result.checkpoint),
                       "stopped_early": str(result.stopped_early).lower()})
    recorder.log_metrics({metrics.ACC_BEST_VAL: result.best_val_acc,
                          metrics.BEST_EPOCH: result.best_epoch}, step=metrics.SUMMARY_STEP)
    plotted = False  # whether the figure the description shows is in
    figures = _figures(trainer, splits, result) if cfg.tracking.plots else {}
    model_id = refusal = None
    if cfg.tracking.log_model:  # logged while the figures are drawn (`painter.submit`)
        try:
            with recorder.sink.unless_offline("the model"):
                model_id = recorder.log_model(trainer.model, trainer.normalizer,
                                              splits.classes, name,
                                              example=np.asarray(splits.X_test[:3]),
                                              scoring=trainer.test_scoring)
        except tracking.ModelRefused as e:  # the rest is recorded, then the run fails
            refusal = e
    if figures:
        with recorder.sink.unless_offline("the figures"):
            for figure, png in figures.items():
                recorder.log_png(png.result(), figure)
                plotted = plotted or figure == glance.NAME
    recorder.log_metrics({metrics.ACC_TEST: result.test_acc, metrics.LOSS_TEST: result.test_loss},
                         step=metrics.SUMMARY_STEP, model_id=model_id, dataset=datasets["test"])
    widths = [trainer.model.arch.input_dim, *cfg.model.hidden_sizes, len(splits.classes)]
    with recorder.sink.unless_offline("the description"):
        run = recorder.client.get_run(recorder.run_id)
        recorder.describe(tracking.describe_run(
            OmegaConf.to_container(cfg, resolve=True), result, run.data.tags, widths,
            (run.info.experiment_id, recorder.run_id) if plotted else None))
    if refusal is not None:
        raise refusal


def _figures(trainer: Trainer, splits: datalib.Splits,
             result: TrainResult) -> dict[str, Future[bytes]]:
    """A trained run's figures, each a future PNG named after its file (`painter.submit`),
    in the order they are logged."""
    history, classes = result.history, splits.classes
    return {
        "curves": painter.submit("curves", history),
        glance.NAME: painter.submit(glance.NAME, history, dpi=glance.IMAGE_DPI),
        "confusion_matrix": painter.submit("confusion_matrix", splits.y_test,
                                           result.test_pred, classes),
        "per_class_accuracy": painter.submit("per_class_accuracy", splits.y_test,
                                             result.test_pred, classes),
        "first_layer_weights": painter.submit(
            "first_layer_weights", trainer.normalizer.image_weights(trainer.model.params["W1"])),
    }


@hydra.main(version_base="1.3", config_path="pkg://mlp.conf", config_name="config")
def _train_app(cfg: DictConfig) -> float:
    return train(cfg)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> NoReturn:
    """The `mlp-train` command: `train_main`, then out without Python's teardown
    (`exits.leave`)."""
    exits.leave(train_main)


def train_main() -> None:
    """`mlp-train [overrides]` / `mlp-train -m [sweep overrides]`. A sweep ends with one
    line saying how its jobs ended, and exits 1 when any failed, else 4 when any job's
    record is incomplete (see `sweeps.callback.SweepOutcome`)."""
    masking.install()
    checked = exits.check_command_line_or_exit()
    if checked is not None and checked.runs and not checked.sweep:
        # A data problem exits 2 before Hydra creates a directory or a store is opened; the
        # run then finds its splits loaded (`build.load_data` keeps the last ones).
        try:
            build.load_data(checked.config)
        except datalib.DataError as e:
            exits.refused("data problem", e)
    # SIGTERM (a scheduler, `kill`) ends the run or sweep like Ctrl-C: the run is recorded
    # KILLED, a sweep's parent too, and its SLURM jobs are cancelled (atexit).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _train_app()
    except KeyboardInterrupt:
        gave_up = sweeplib.slurm_gave_up()
        if gave_up:
            print(masking.mask(f"mlp-lab: the sweep's SLURM jobs were cancelled: {gave_up}"),
                  file=sys.stderr)
            sys.exit(exits.EXIT_FAILED)
        print("mlp-lab: interrupted", file=sys.stderr)
        sys.exit(exits.EXIT_INTERRUPTED)
    outcome = sweeplib.last_outcome()
    if outcome is None:
        return
    if outcome.complete:
        print(outcome.summary())
        return
    print(masking.mask(outcome.summary()), file=sys.stderr)
    sys.exit(exits.EXIT_FAILED if not outcome.ok else exits.EXIT_INCOMPLETE)


