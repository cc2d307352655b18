"""Console entry points `mlp-train` and `mlp-gradcheck`: the composition root.

Each is a Hydra app over `conf/` (installed as the package `mlp.conf`). The order of
events matters and is the same for both: validate the config, connect to the tracking
store, prepare data and model (every error so far exits non-zero with no MLflow run),
then start the run, and whatever happens next, end it with the right status.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mlp import config as configlib
from mlp import console, gradcheck, liveness, masking, metrics, optim, plots, tracking
from mlp import data as datalib
from mlp import spool as spoollib
from mlp import sweep as sweeplib
from mlp.model import MLP
from mlp.overrides import OverrideError, check_command_line
from mlp.train import DivergenceError, Interrupted, Trainer, TrainResult, TrainSettings

log = logging.getLogger("mlp")

configlib.register()

ARCHIVE_VAR = "MLP_LAB_ARCHIVE"  # a local cifar-10-python.tar.gz when data.archive is not set
EXIT_CONFIG = 2
EXIT_GRADCHECK = 3
EXIT_INTERRUPTED = 130


class GradcheckFailed(RuntimeError):
    """The run's own gradient check failed and gradcheck.stop_on_fail is set."""


def build_model(cfg: DictConfig, input_dim: int, num_classes: int,
                max_width: int | None = None, dtype: str | None = None) -> MLP:
    """The MLP of `cfg.model` for inputs of input_dim features and num_classes classes
    (hidden widths capped to max_width for a gradient check)."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    if max_width:
        kwargs["hidden_sizes"] = [min(h, max_width) for h in kwargs["hidden_sizes"]]
    return MLP(input_dim=input_dim, num_classes=num_classes, dtype=dtype or cfg.trainer.dtype,
               seed=cfg.seed, **kwargs)


def run_gradcheck(cfg: DictConfig) -> gradcheck.GradcheckReport:
    """The gradient check of what the run trains: its architecture, activation, loss and
    reg (same depth, hidden widths capped at gradcheck.max_width, float64), through the
    training step's own path (the zero-copy backward pass and the run's optimizer's fused
    L2 pass), on gradcheck.samples standard normal inputs (what normalized or whitened
    pixels look like) of the run's input width, with random labels."""
    g, w = cfg.gradcheck, cfg.data.whiten
    model = build_model(cfg, datalib.output_dim(w.name, w.components), len(datalib.CLASSES),
                        max_width=g.max_width, dtype="float64")
    rng = np.random.default_rng([cfg.seed, 3])
    X = rng.standard_normal((g.samples, model.arch.input_dim))
    y = rng.integers(0, model.arch.num_classes, g.samples)
    kwargs = configlib.optimizer_kwargs(configlib.flatten(OmegaConf.to_container(cfg)))
    return gradcheck.check_training_step(
        model, lambda params: optim.make_optimizer(cfg.optim.name, params, **kwargs), X, y,
        num_checks=g.num_checks, tol=g.tol, seed=cfg.seed)


def archive_path(cfg: DictConfig) -> Path | None:
    """The configured data's archive: `data.archive`, else $MLP_LAB_ARCHIVE, else None (a
    cached or downloaded official archive); for `data=synthetic` the generated archive
    under the data root (made on first use)."""
    d = cfg.data
    if d.name != "synthetic":
        archive = d.archive or os.environ.get(ARCHIVE_VAR) or None
        return Path(archive).expanduser() if archive else None
    root = _data_root(cfg)
    archive = root / f"synthetic-{d.synthetic.n_train}-{d.synthetic.n_test}-{cfg.seed}.tar.gz"
    if not archive.exists():
        root.mkdir(parents=True, exist_ok=True)
        datalib.make_synthetic_archive(archive, d.synthetic.n_train, d.synthetic.n_test,
                                       seed=cfg.seed)
    return archive


def _data_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.root).expanduser() if cfg.data.root else datalib.default_root()


def load_data(cfg: DictConfig) -> datalib.Splits:
    """CIFAR-10 (a local archive, the cache, or the download) or the synthetic set, split
    as configured."""
    archive = archive_path(cfg)
    # The generated archive is its own reference: its md5 keeps it from reading as unverified.
    md5 = datalib.file_digest(archive, "md5") if cfg.data.name == "synthetic" else cfg.data.md5
    raw = datalib.load_cifar10(_data_root(cfg), archive, md5, progress=cfg.trainer.progress)
    return datalib.split(raw, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed)


def _config_error(e: ValueError) -> None:
    print(masking.mask(f"mlp-lab: invalid configuration: {e}"), file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _connect(cfg: DictConfig, launch_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment id), or exit with a clear message when unusable."""
    uri = tracking.resolve_uri(cfg.tracking.uri, launch_dir)
    try:
        return uri, tracking.connect(uri, cfg.tracking.experiment)
    except tracking.TrackingError as e:
        print(masking.mask(f"mlp-lab: {e}"), file=sys.stderr)
        sys.exit(EXIT_CONFIG)


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

    def cannot_start(self, cfg: DictConfig, error: ValueError, what: str) -> float:
        """Alone: the message and exit 2. In a sweep: a FAILED child run that says why, and
        NaN for the sweeper, so that the sweep goes on."""
        if self.parent is None:
            print(masking.mask(f"mlp-lab: {what}: {error}"), file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        log.error("job cannot run, the sweep goes on: %s", error)
        _, experiment_id = _connect(cfg, self.launch_dir)
        tags = tracking.environment_tags(self.launch_dir, self.overrides, {})
        tracking.start_failed_run(experiment_id, tracking.run_name(
            OmegaConf.to_container(cfg, resolve=True)), tags, error,
            parent_run_id=self.parent["run_id"])
        return math.nan

    def command(self, extra: list[str]) -> str:
        """The mlp-train command line of this run, with `extra` overrides."""
        return console.command("mlp-train", self.overrides, extra)


def train(cfg: DictConfig) -> float:
    """One training run, recorded in MLflow; returns the best validation accuracy.

    Alone, every problem exits non-zero with a message (2: config or data, 1: failure,
    3: failed gradient check, 130: interrupted). As a job of a sweep (`-m`), the run is a
    child of the sweep's parent run, a config that already finished in the experiment is
    skipped, one that was killed is resumed, and a job that fails is recorded FAILED and
    returns NaN so that the sweep goes on; only an interruption stops the sweep.
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
    uri, experiment_id = _connect(cfg, job.launch_dir)
    liveness.reap_dead_runs()
    config_hash = sweeplib.config_hash(resolved)
    resume = cfg.trainer.resume
    if job.parent is not None:
        finished, resume = _earlier_attempts(experiment_id, config_hash, resume)
        if finished is not None:
            return finished
    try:
        splits = load_data(cfg)
    except datalib.DataError as e:
        return job.cannot_start(cfg, e, "data problem")
    trainer = build_trainer(cfg, splits, job.output_dir)
    continued = _resume(trainer, resume) if resume else None

    recorder, name = _start_recording(cfg, resolved, job, (uri, experiment_id), splits,
                                      trainer, config_hash, continued)
    archive = _archive_override(cfg, job.overrides)
    try:
        with recorder.finishing(killed=(Interrupted, KeyboardInterrupt, *_pruned())):
            result = _check_and_train(cfg, resolved, job, recorder, trainer, splits, name,
                                      first=continued is None, archive=archive)
    except Interrupted as e:
        log.warning("%s\nresume with: %s", e, _resume_command(job, archive, e))
        if job.parent is not None:
            raise KeyboardInterrupt(str(e)) from e  # stop the whole sweep
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if job.parent is not None and not isinstance(e, _pruned()):
            log.error("job failed, the sweep goes on: %s: %s", type(e).__name__, e)
            return math.nan
        if isinstance(e, DivergenceError | GradcheckFailed):
            print(masking.mask(f"mlp-lab: {e}"), file=sys.stderr)
            sys.exit(EXIT_GRADCHECK if isinstance(e, GradcheckFailed) else 1)
        raise
    _summary(result, recorder.run_id, tracking.how_to_view(uri, experiment_id, recorder.run_id),
             job.command(archive))
    return result.best_val_acc


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


def _earlier_attempts(experiment_id: str, config_hash: str, resume: str | None
                      ) -> tuple[float | None, str | None]:
    """For a sweep job: (its best val accuracy, None) when this config already finished in
    the experiment, else (None, the checkpoint to resume: a killed attempt's, or `resume`)."""
    earlier = sweeplib.runs_with_config(experiment_id, config_hash)
    finished = [r for r in earlier if r.info.status == "FINISHED"]
    if finished:
        log.info("skipping: this config already finished as run %s", finished[0].info.run_id)
        return finished[0].data.metrics.get(metrics.ACC_BEST_VAL, math.nan), None
    killed = [r for r in earlier if r.info.status == "KILLED"
              and Path(r.data.tags.get("checkpoint", "")).is_file()]
    if killed and not resume:
        resume = killed[0].data.tags["checkpoint"]
        log.info("resuming killed run %s from %s", killed[0].info.run_id, resume)
    return None, resume


def _resume(trainer: Trainer, checkpoint: str) -> str | None:
    """Load a checkpoint into the trainer (validated whole first: exit 2 naming the
    problem), send what an earlier attempt could not; returns the run to continue: the
    checkpoint's run unless that one finished (a resume never changes another run's
    status: a finished run's checkpoint continues as a new run)."""
    try:
        run_id = trainer.load_checkpoint(checkpoint).get("run_id")
    except (OSError, ValueError) as e:
        _config_error(ValueError(f"trainer.resume: {e}"))
    spoollib.send_pending(spoollib.beside(Path(checkpoint)))
    if run_id is not None and tracking.run_status(run_id) == "FINISHED":
        log.info("run %s finished: this resume is recorded as a new run", run_id)
        trainer.meta["resumed_from"] = run_id
        return None
    return run_id


def _start_recording(cfg: DictConfig, resolved: dict[str, Any], job: Job,
                     store: tuple[str, str], splits: datalib.Splits, trainer: Trainer,
                     config_hash: str, continued: str | None
                     ) -> tuple[tracking.RunRecorder, str]:
    """Start (or reopen) the MLflow run with the run's tags, and attach its recorder and
    the per-epoch printer (and Optuna's pruning reporter in a trial) to the trainer."""
    uri, experiment_id = store
    tags = tracking.environment_tags(job.launch_dir, job.overrides, splits.fingerprint)
    tags[sweeplib.CONFIG_HASH_TAG] = config_hash
    tags["mlp.blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    tags |= liveness.process_tags()
    if "resumed_from" in trainer.meta:
        tags["mlp.resumed_from"] = trainer.meta["resumed_from"]
    parent = job.parent
    name = cfg.tracking.run_name or (
        sweeplib.child_name(parent["swept"], job.overrides) if parent and parent.get("swept")
        else tracking.run_name(resolved))
    if parent is not None:
        tags[sweeplib.SWEEP_NAME_TAG] = parent.get("name", "")
    recorder = tracking.start_run(experiment_id, name, tags, run_id=continued,
                                  log_every_steps=cfg.tracking.log_every_steps,
                                  parent_run_id=parent and parent["run_id"],
                                  system_metrics=cfg.tracking.system_metrics,
                                  spool_path=spoollib.beside(trainer.checkpoint_path()))
    if continued is not None:  # what the interrupted attempt left no longer holds
        recorder.clear_tags(("error.type", "error.message", liveness.REASON_TAG))
    trainer.meta["run_id"] = recorder.run_id
    trainer.observers += [recorder, console.EpochPrinter(cfg.trainer.epochs)]
    trial = cfg.get("trial")
    if trial is not None and trial.get("study") is not None:
        from mlp.pruning import TrialReporter

        trainer.observers.append(TrialReporter(trial.storage, trial.study, trial.id))
    log.info("MLflow run %s (%s) in experiment %r at %s", recorder.run_id, name,
             cfg.tracking.experiment, masking.mask(uri))
    return recorder, name


def _check_and_train(cfg: DictConfig, resolved: dict[str, Any], job: Job,
                     recorder: tracking.RunRecorder, trainer: Trainer, splits: datalib.Splits,
                     name: str, first: bool, archive: list[str]) -> TrainResult:
    """What a run does inside its record: config, datasets and gradient check (the first
    time), training, then the results. An interruption leaves the checkpoint and the
    command that resumes it as tags; a pruned trial says so."""
    datasets = tracking.split_datasets(splits, cfg.data.name, _data_source(cfg))
    if first:
        recorder.log_config(resolved, job.overrides, job.output_dir / ".hydra")
        recorder.log_datasets(datasets)
        if cfg.gradcheck.enabled:
            report = run_gradcheck(cfg)
            log.info("gradient check (float64, widths <= %d):\n%s", cfg.gradcheck.max_width,
                     report)
            recorder.log_gradcheck(report)
            if not report.passed and cfg.gradcheck.stop_on_fail:
                raise GradcheckFailed(f"gradient check failed: max relative error "
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
    record_result(recorder, cfg, trainer, splits, result, datasets, name)
    return result


def _data_source(cfg: DictConfig) -> str:
    """Where the images came from: the archive's absolute path, or the official URL."""
    archive = archive_path(cfg)
    return str(archive.resolve()) if archive else datalib.OFFICIAL_URL


def _archive_override(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """`data.archive=<path>` when the archive came from $MLP_LAB_ARCHIVE, so that printed
    commands are complete on their own."""
    if cfg.data.name != "cifar10" or cfg.data.archive or not os.environ.get(ARCHIVE_VAR):
        return []
    return [f"data.archive={os.environ[ARCHIVE_VAR]}"]


def _summary(result: TrainResult, run_id: str, view: str, reproduce: str) -> None:
    """The closing lines: accuracies and gap at the kept (best) epoch, where to look, and
    the command that runs it again."""
    best = result.best_epoch - 1
    train_acc, val_acc = result.history["train_acc"][best], result.history["val_acc"][best]
    log.info("done: accuracy train %.4f / val %.4f / test %.4f (gap %+.4f) at the best epoch, "
             "%d of %d%s\nrun %s: %s\nrun it again: %s", train_acc, val_acc, result.test_acc,
             train_acc - val_acc, result.best_epoch, result.epochs_run,
             " (stopped early)" if result.stopped_early else "", run_id, view, reproduce)


def build_trainer(cfg: DictConfig, splits: datalib.Splits, output_dir: Path) -> Trainer:
    """Normalizer (fitted on the training split), model, optimizer, schedule and loop
    settings from the config."""
    t, o, w = cfg.trainer, cfg.optim, cfg.data.whiten
    normalizer = datalib.Normalizer(cfg.data.normalize, whiten=w.name, components=w.components,
                                    eps=w.eps).fit(splits.X_train)
    model = build_model(cfg, normalizer.out_dim, len(splits.classes))
    flat = configlib.flatten(OmegaConf.to_container(cfg, resolve=True))
    optimizer = optim.make_optimizer(o.name, model.params, **configlib.optimizer_kwargs(flat))
    steps_per_epoch = math.ceil(len(splits.y_train) / t.batch_size)
    schedule = optim.Schedule(
        name=o.schedule.name, lr=o.lr, steps_per_epoch=steps_per_epoch, epochs=t.epochs,
        warmup_epochs=o.schedule.warmup_epochs, step_size=o.schedule.step_size,
        gamma=o.schedule.gamma, decay=o.schedule.decay, min_lr=o.schedule.min_lr,
        div_factor=o.schedule.div_factor)
    settings = TrainSettings(
        epochs=t.epochs, batch_size=t.batch_size, dtype=t.dtype,
        train_eval_size=t.train_eval_size, eval_batch_size=t.eval_batch_size,
        patience=t.patience, diverge_factor=t.diverge_factor,
        augment_pad=cfg.data.augment.pad, augment_flip=cfg.data.augment.flip,
        checkpoint_dir=Path(t.checkpoint_dir) if t.checkpoint_dir else output_dir / "checkpoints",
        progress=t.progress, prefetch=t.prefetch, health=cfg.tracking.health, seed=cfg.seed,
        ema=t.ema, ema_every=t.ema_every)
    return Trainer(model, optimizer, schedule, splits, normalizer, settings)


def record_result(recorder: tracking.RunRecorder, cfg: DictConfig, trainer: Trainer,
                  splits: datalib.Splits, result: TrainResult, datasets: dict[str, Any],
                  name: str) -> None:
    """Figures, the model, the final metrics (linked to the model and the test split) and
    the description of a finished training. With the store gone, the metrics and tags go
    to the run's spool and the rest is named in a warning (`unless_offline`)."""
    recorder.set_tags({"checkpoint": str(result.checkpoint),
                       "stopped_early": str(result.stopped_early).lower()})
    if cfg.tracking.plots:
        with recorder.unless_offline("the figures"):
            classes = splits.classes
            recorder.log_figure(plots.curves_figure(result.history), "curves")
            recorder.log_figure(plots.confusion_figure(splits.y_test, result.test_pred,
                                                       classes), "confusion_matrix")
            recorder.log_figure(plots.per_class_figure(splits.y_test, result.test_pred,
                                                       classes), "per_class_accuracy")
            recorder.log_figure(plots.weights_figure(
                trainer.normalizer.image_weights(trainer.model.params["W1"])),
                "first_layer_weights")
    model_id = None
    if cfg.tracking.log_model:
        with recorder.unless_offline("the model"):
            model_id = recorder.log_model(trainer.model, trainer.normalizer, splits.classes,
                                          name, example=np.asarray(splits.X_test[:3]))
    recorder.log_metrics({metrics.ACC_TEST: result.test_acc, metrics.LOSS_TEST: result.test_loss},
                         step=result.best_epoch, model_id=model_id, dataset=datasets["test"])
    widths = [trainer.model.arch.input_dim, *cfg.model.hidden_sizes, len(splits.classes)]
    with recorder.unless_offline("the description"):
        recorder.describe(tracking.describe_run(
            OmegaConf.to_container(cfg, resolve=True), result,
            recorder.client.get_run(recorder.run_id).data.tags, widths))


def check(cfg: DictConfig) -> bool:
    """The gradient check alone for a config, logged as its own run."""
    try:
        configlib.validate(cfg)
    except ValueError as e:
        _config_error(e)
    job = Job.from_hydra()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    uri, experiment_id = _connect(cfg, job.launch_dir)
    tags = tracking.environment_tags(job.launch_dir, job.overrides, {}) | {
        "mlp.kind": "gradcheck"}
    name = "gradcheck-" + (cfg.tracking.run_name or tracking.run_name(resolved))
    recorder = tracking.start_run(experiment_id, name, tags)
    with recorder.finishing():
        recorder.log_config(resolved, job.overrides, job.output_dir / ".hydra")
        report = run_gradcheck(cfg)
        recorder.log_gradcheck(report)
    print(report)
    print(masking.mask(f"MLflow run {recorder.run_id} at {uri}"))
    return report.passed


@hydra.main(version_base="1.3", config_path="pkg://mlp.conf", config_name="config")
def _train_app(cfg: DictConfig) -> float:
    return train(cfg)


@hydra.main(version_base="1.3", config_path="pkg://mlp.conf", config_name="gradcheck")
def _gradcheck_app(cfg: DictConfig) -> None:
    if not check(cfg):
        sys.exit(EXIT_GRADCHECK)


def _check_command_line() -> None:
    """Refuse a mistyped or ill-typed override before Hydra starts (exit 2)."""
    try:
        check_command_line(sys.argv[1:])
    except OverrideError as e:
        _config_error(e)


def train_main() -> None:
    """`mlp-train [overrides]` / `mlp-train -m [sweep overrides]`."""
    masking.install()
    _check_command_line()
    _train_app()


def gradcheck_main() -> None:
    """`mlp-gradcheck [overrides]`: exit 0 when the check passes, 3 when it fails."""
    masking.install()
    _check_command_line()
    _gradcheck_app()
