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
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mlp import config as configlib
from mlp import console, gradcheck, liveness, metrics, optim, plots, tracking
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
    L2 pass), on gradcheck.samples standard normal inputs (what normalized pixels look
    like) with random labels."""
    g = cfg.gradcheck
    model = build_model(cfg, datalib.DIM, len(datalib.CLASSES), max_width=g.max_width,
                        dtype="float64")
    rng = np.random.default_rng([cfg.seed, 3])
    X = rng.standard_normal((g.samples, model.arch.input_dim))
    y = rng.integers(0, model.arch.num_classes, g.samples)
    kwargs = configlib.optimizer_kwargs(configlib.flatten(OmegaConf.to_container(cfg)))
    return gradcheck.check_training_step(
        model, lambda params: optim.make_optimizer(cfg.optim.name, params, **kwargs), X, y,
        num_checks=g.num_checks, tol=g.tol, seed=cfg.seed)


def archive_path(cfg: DictConfig) -> tuple[Path | None, str | None]:
    """(archive, md5) of the configured data: `data.archive`, else $MLP_LAB_ARCHIVE, else
    None (a cached or downloaded official archive); for `data=synthetic` the generated
    archive under the data root (made on first use)."""
    d = cfg.data
    if d.name != "synthetic":
        archive = d.archive or os.environ.get(ARCHIVE_VAR) or None
        return (Path(archive).expanduser() if archive else None), d.md5
    root = _data_root(cfg)
    archive = root / f"synthetic-{d.synthetic.n_train}-{d.synthetic.n_test}-{cfg.seed}.tar.gz"
    if not archive.exists():
        root.mkdir(parents=True, exist_ok=True)
        datalib.make_synthetic_archive(archive, d.synthetic.n_train, d.synthetic.n_test,
                                       seed=cfg.seed)
    return archive, datalib.file_digest(archive, "md5")


def _data_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.root).expanduser() if cfg.data.root else datalib.default_root()


def load_data(cfg: DictConfig) -> datalib.Splits:
    """CIFAR-10 (a local archive, the cache, or the download) or the synthetic set, split
    as configured."""
    archive, md5 = archive_path(cfg)
    raw = datalib.load_cifar10(_data_root(cfg), archive, md5, progress=cfg.trainer.progress)
    return datalib.split(raw, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed)


def _hydra_paths() -> tuple[Path, Path, list[str]]:
    """(launch dir, this job's output dir, the job's overrides)."""
    hc = HydraConfig.get()
    return (Path(hc.runtime.cwd), Path(hc.runtime.output_dir),
            list(hc.overrides.task))


def _config_error(e: ValueError) -> None:
    print(f"mlp-lab: invalid configuration: {e}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _connect(cfg: DictConfig, launch_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment id), or exit with a clear message when unusable."""
    uri = tracking.resolve_uri(cfg.tracking.uri, launch_dir)
    try:
        return uri, tracking.connect(uri, cfg.tracking.experiment)
    except tracking.TrackingError as e:
        print(f"mlp-lab: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def train(cfg: DictConfig) -> float:
    """One training run, recorded in MLflow; returns the best validation accuracy.

    Alone, every problem exits non-zero with a message (2: config or data, 1: failure,
    3: failed gradient check, 130: interrupted). As a job of a sweep (`-m`), the run is a
    child of the sweep's parent run, a config that already finished in the experiment is
    skipped, one that was killed is resumed, and a job that fails is recorded FAILED and
    returns NaN so that the sweep goes on; only an interruption stops the sweep.
    """
    launch_dir, output_dir, overrides = _hydra_paths()
    parent = sweeplib.read_parent(HydraConfig.get().sweep.dir) if _multirun() else None
    try:
        configlib.validate(cfg)
    except ValueError as e:
        if parent is None:
            _config_error(e)
        return _record_invalid_job(cfg, e, launch_dir, overrides, parent)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    flat = configlib.flatten(resolved)
    for warning in configlib.inactive_overrides(flat, [o.partition("=")[0].lstrip("+~")
                                                       for o in overrides]):
        log.warning("%s", warning)
    uri, experiment_id = _connect(cfg, launch_dir)
    liveness.reap_dead_runs()
    config_hash = sweeplib.config_hash(resolved)
    resume = cfg.trainer.resume
    if parent is not None:
        earlier = tracking.runs_with_config(experiment_id, config_hash)
        finished = [r for r in earlier if r.info.status == "FINISHED"]
        if finished:
            log.info("skipping: this config already finished as run %s", finished[0].info.run_id)
            return finished[0].data.metrics.get(metrics.ACC_BEST_VAL, math.nan)
        killed = [r for r in earlier if r.info.status == "KILLED"
                  and Path(r.data.tags.get("checkpoint", "")).is_file()]
        if killed and not resume:
            resume = killed[0].data.tags["checkpoint"]
            log.info("resuming killed run %s from %s", killed[0].info.run_id, resume)

    try:
        splits = load_data(cfg)
    except datalib.DataError as e:
        if parent is None:
            print(f"mlp-lab: data problem: {e}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        return _record_invalid_job(cfg, e, launch_dir, overrides, parent)
    trainer = build_trainer(cfg, splits, output_dir)
    resumed_run = None
    if resume:
        try:
            resumed_run = trainer.load_checkpoint(resume).get("run_id")
        except (OSError, ValueError) as e:
            _config_error(ValueError(f"trainer.resume: {e}"))
        spoollib.send_pending(spoollib.beside(Path(resume)))

    tags = tracking.environment_tags(launch_dir, overrides, splits.fingerprint)
    tags[sweeplib.CONFIG_HASH_TAG] = config_hash
    tags["mlp.blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    tags |= liveness.process_tags()
    name = cfg.tracking.run_name or (
        sweeplib.child_name(parent["swept"], overrides) if parent and parent.get("swept")
        else tracking.run_name(resolved))
    if parent is not None:
        tags[sweeplib.SWEEP_NAME_TAG] = parent.get("name", "")
    recorder = tracking.start_run(experiment_id, name, tags, run_id=resumed_run,
                                  log_every_steps=cfg.tracking.log_every_steps,
                                  parent_run_id=parent and parent["run_id"],
                                  system_metrics=cfg.tracking.system_metrics,
                                  spool_path=spoollib.beside(trainer.checkpoint_path()))
    trainer.meta["run_id"] = recorder.run_id
    trainer.observers += [recorder, console.EpochPrinter(cfg.trainer.epochs)]
    trial = cfg.get("trial")
    if trial is not None and trial.get("study") is not None:
        from mlp.pruning import TrialReporter

        trainer.observers.append(TrialReporter(trial.storage, trial.study, trial.id))
    log.info("MLflow run %s (%s) in experiment %r at %s", recorder.run_id, name,
             cfg.tracking.experiment, uri)
    archive = _archive_override(cfg, overrides)
    datasets = tracking.split_datasets(splits, cfg.data.name, _data_source(cfg))
    try:
        if resumed_run is None:
            recorder.log_config(resolved, overrides, output_dir / ".hydra")
            recorder.log_datasets(datasets)
        if cfg.gradcheck.enabled and resumed_run is None:
            report = run_gradcheck(cfg)
            log.info("gradient check (float64, widths <= %d):\n%s", cfg.gradcheck.max_width, report)
            recorder.log_gradcheck(report)
            if not report.passed and cfg.gradcheck.stop_on_fail:
                raise GradcheckFailed(f"gradient check failed: max relative error "
                                      f"{report.max_rel_error:.2e} >= tol {report.tol:g}")
        result = trainer.fit()
        with recorder.unless_offline("figures, model or description"):
            record_result(recorder, cfg, trainer, splits, result, datasets, name)
    except Interrupted as e:
        again = console.command("mlp-train", overrides, [*archive,
                                                         f"trainer.resume={e.checkpoint}"])
        recorder.set_tags({"checkpoint": str(e.checkpoint), "resume": again})
        recorder.finish("KILLED", e)
        log.warning("%s\nresume with: %s", e, again)
        if parent is not None:
            raise KeyboardInterrupt(str(e)) from e  # stop the whole sweep
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt as e:
        recorder.finish("KILLED", e)
        raise
    except BaseException as e:
        if type(e).__name__ == "TrialPruned":
            recorder.set_tags({"optuna.pruned": "true"})
            recorder.finish("KILLED", e)
            raise
        recorder.finish("FAILED", e)
        if parent is not None and isinstance(e, Exception):
            log.error("job failed, the sweep goes on: %s: %s", type(e).__name__, e)
            return math.nan
        if isinstance(e, DivergenceError | GradcheckFailed):
            print(f"mlp-lab: {e}", file=sys.stderr)
            sys.exit(EXIT_GRADCHECK if isinstance(e, GradcheckFailed) else 1)
        raise
    recorder.finish("FINISHED")
    _summary(result, recorder.run_id, tracking.how_to_view(uri, experiment_id, recorder.run_id),
             console.command("mlp-train", overrides, archive))
    return result.best_val_acc


def _data_source(cfg: DictConfig) -> str:
    """Where the images came from: the archive's absolute path, or the official URL."""
    archive, _ = archive_path(cfg)
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
    """Model, optimizer, schedule, normalizer and loop settings from the config."""
    t, o = cfg.trainer, cfg.optim
    model = build_model(cfg, splits.X_train.shape[1], len(splits.classes))
    flat = configlib.flatten(OmegaConf.to_container(cfg, resolve=True))
    optimizer = optim.make_optimizer(o.name, model.params, **configlib.optimizer_kwargs(flat))
    steps_per_epoch = math.ceil(len(splits.y_train) / t.batch_size)
    schedule = optim.Schedule(
        name=o.schedule.name, lr=o.lr, steps_per_epoch=steps_per_epoch, epochs=t.epochs,
        warmup_epochs=o.schedule.warmup_epochs, step_size=o.schedule.step_size,
        gamma=o.schedule.gamma, decay=o.schedule.decay, min_lr=o.schedule.min_lr)
    normalizer = datalib.Normalizer(cfg.data.normalize).fit(splits.X_train)
    settings = TrainSettings(
        epochs=t.epochs, batch_size=t.batch_size, dtype=t.dtype,
        train_eval_size=t.train_eval_size, eval_batch_size=t.eval_batch_size,
        patience=t.patience, diverge_factor=t.diverge_factor,
        augment_pad=cfg.data.augment.pad, augment_flip=cfg.data.augment.flip,
        checkpoint_dir=Path(t.checkpoint_dir) if t.checkpoint_dir else output_dir / "checkpoints",
        progress=t.progress, prefetch=t.prefetch, health=cfg.tracking.health, seed=cfg.seed)
    return Trainer(model, optimizer, schedule, splits, normalizer, settings)


def record_result(recorder: tracking.RunRecorder, cfg: DictConfig, trainer: Trainer,
                  splits: datalib.Splits, result: TrainResult, datasets: dict[str, Any],
                  name: str) -> None:
    """Figures, the model, the final metrics (linked to the model and the test split) and
    the description of a finished training."""
    recorder.set_tags({"checkpoint": str(result.checkpoint),
                       "stopped_early": str(result.stopped_early).lower()})
    if cfg.tracking.plots:
        classes = splits.classes
        recorder.log_figure(plots.curves_figure(result.history), "curves")
        recorder.log_figure(plots.confusion_figure(splits.y_test, result.test_pred, classes),
                            "confusion_matrix")
        recorder.log_figure(plots.per_class_figure(splits.y_test, result.test_pred, classes),
                            "per_class_accuracy")
        recorder.log_figure(plots.weights_figure(trainer.model.params["W1"]),
                            "first_layer_weights")
    model_id = None
    if cfg.tracking.log_model:
        model_id = recorder.log_model(trainer.model, trainer.normalizer, splits.classes, name,
                                      example=np.asarray(splits.X_test[:3]))
    recorder.log_metrics({metrics.ACC_TEST: result.test_acc, metrics.LOSS_TEST: result.test_loss},
                         step=result.best_epoch, model_id=model_id, dataset=datasets["test"])
    widths = [splits.X_train.shape[1], *cfg.model.hidden_sizes, len(splits.classes)]
    recorder.describe(tracking.describe_run(OmegaConf.to_container(cfg, resolve=True), result,
                                            recorder.client.get_run(recorder.run_id).data.tags,
                                            widths))


def _multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _record_invalid_job(cfg: DictConfig, error: Exception, launch_dir: Path,
                        overrides: list[str], parent: dict) -> float:
    """A sweep job that cannot start: a FAILED child run that says why; NaN to the sweeper."""
    log.error("job cannot run, the sweep goes on: %s", error)
    _, experiment_id = _connect(cfg, launch_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tags = tracking.environment_tags(launch_dir, overrides, {})
    tracking.start_failed_run(experiment_id, tracking.run_name(resolved), tags, error,
                              parent_run_id=parent["run_id"])
    return math.nan


def check(cfg: DictConfig) -> bool:
    """The gradient check alone for a config, logged as its own run."""
    try:
        configlib.validate(cfg)
    except ValueError as e:
        _config_error(e)
    launch_dir, output_dir, overrides = _hydra_paths()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    uri, experiment_id = _connect(cfg, launch_dir)
    tags = tracking.environment_tags(launch_dir, overrides, {}) | {"mlp.kind": "gradcheck"}
    name = "gradcheck-" + (cfg.tracking.run_name or tracking.run_name(resolved))
    recorder = tracking.start_run(experiment_id, name, tags)
    try:
        recorder.log_config(resolved, overrides, output_dir / ".hydra")
        report = run_gradcheck(cfg)
        recorder.log_gradcheck(report)
    except BaseException as e:
        recorder.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", e)
        raise
    recorder.finish("FINISHED")
    print(report)
    print(f"MLflow run {recorder.run_id} at {uri}")
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
    _check_command_line()
    _train_app()


def gradcheck_main() -> None:
    """`mlp-gradcheck [overrides]`: exit 0 when the check passes, 3 when it fails."""
    _check_command_line()
    _gradcheck_app()
