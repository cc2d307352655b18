"""Console entry points `mlp-train` and `mlp-gradcheck`: the composition root.

Each is a Hydra app over `conf/` (installed as the package `mlp.conf`). The order of
events matters and is the same for both: validate the config, connect to the tracking
store, prepare data and model (every error so far exits non-zero with no MLflow run),
then start the run, and whatever happens next, end it with the right status.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mlp import config as configlib
from mlp import data as datalib
from mlp import gradcheck, optim, plots, tracking
from mlp.model import MLP
from mlp.train import DivergenceError, Interrupted, Trainer, TrainSettings

log = logging.getLogger("mlp")

configlib.register()

EXIT_CONFIG = 2
EXIT_GRADCHECK = 3
EXIT_INTERRUPTED = 130


class GradcheckFailed(RuntimeError):
    """The run's own gradient check failed and gradcheck.stop_on_fail is set."""


def build_model(cfg: DictConfig, max_width: int | None = None, dtype: str | None = None) -> MLP:
    """The MLP of `cfg.model` (hidden widths capped to max_width for a gradient check)."""
    m = cfg.model
    hidden = [min(h, max_width) if max_width else h for h in m.hidden_sizes]
    return MLP(input_dim=3072, hidden_sizes=hidden, num_classes=len(datalib.CLASSES),
               activation=m.activation, loss=m.loss, reg=m.reg, init=m.init,
               weight_scale=m.weight_scale, dtype=dtype or cfg.trainer.dtype, seed=cfg.seed,
               leaky_slope=m.leaky_slope, elu_alpha=m.elu_alpha, maxout_pieces=m.maxout_pieces)


def run_gradcheck(cfg: DictConfig) -> gradcheck.GradcheckReport:
    """The gradient check of the run's architecture, activation, loss and reg: same depth,
    hidden widths capped at gradcheck.max_width, float64, on gradcheck.samples standard
    normal inputs (what normalized pixels look like) with random labels."""
    g = cfg.gradcheck
    model = build_model(cfg, max_width=g.max_width, dtype="float64")
    rng = np.random.default_rng([cfg.seed, 3])
    X = rng.standard_normal((g.samples, model.arch.input_dim))
    y = rng.integers(0, model.arch.num_classes, g.samples)
    return gradcheck.check_model(model, X, y, num_checks=g.num_checks, tol=g.tol, seed=cfg.seed)


def load_data(cfg: DictConfig) -> datalib.Splits:
    """CIFAR-10 (downloaded or a local archive) or the synthetic set, split as configured."""
    d = cfg.data
    root = Path(d.root).expanduser() if d.root else datalib.default_root()
    archive, md5 = d.archive, d.md5
    if d.name == "synthetic":
        archive = root / f"synthetic-{d.synthetic.n_train}-{d.synthetic.n_test}-{cfg.seed}.tar.gz"
        if not archive.exists():
            root.mkdir(parents=True, exist_ok=True)
            datalib.make_synthetic_archive(archive, d.synthetic.n_train, d.synthetic.n_test,
                                           seed=cfg.seed)
        md5 = datalib.file_digest(archive, "md5")
    raw = datalib.load_cifar10(root, archive, md5, progress=cfg.trainer.progress)
    return datalib.split(raw, val_size=d.val_size, limit=d.limit, seed=cfg.seed)


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
    """One training run, recorded in MLflow; returns the best validation accuracy."""
    try:
        configlib.validate(cfg)
    except ValueError as e:
        _config_error(e)
    launch_dir, output_dir, overrides = _hydra_paths()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    uri, experiment_id = _connect(cfg, launch_dir)

    try:
        splits = load_data(cfg)
    except datalib.DataError as e:
        print(f"mlp-lab: data problem: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    t = cfg.trainer
    model = build_model(cfg)
    o = cfg.optim
    optimizer = optim.make_optimizer(o.name, model.params, momentum=o.momentum,
                                     decay_rate=o.decay_rate, beta1=o.beta1, beta2=o.beta2,
                                     eps=o.eps)
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
        progress=t.progress, health=cfg.tracking.health, seed=cfg.seed)
    trainer = Trainer(model, optimizer, schedule, splits, normalizer, settings)
    resumed_run = None
    if t.resume:
        try:
            resumed_run = trainer.load_checkpoint(t.resume).get("run_id")
        except (OSError, ValueError) as e:
            _config_error(ValueError(f"trainer.resume: {e}"))

    tags = tracking.environment_tags(launch_dir, overrides, splits.fingerprint)
    name = cfg.tracking.run_name or tracking.run_name(resolved)
    recorder = tracking.start_run(experiment_id, name, tags, run_id=resumed_run,
                                  log_every_steps=cfg.tracking.log_every_steps)
    trainer.meta["run_id"] = recorder.run_id
    trainer.observer = recorder
    log.info("MLflow run %s in experiment %r at %s", recorder.run_id, cfg.tracking.experiment, uri)
    try:
        if resumed_run is None:
            recorder.log_config(resolved, overrides, output_dir / ".hydra")
        if cfg.gradcheck.enabled and resumed_run is None:
            report = run_gradcheck(cfg)
            log.info("gradient check (float64, widths <= %d):\n%s", cfg.gradcheck.max_width, report)
            recorder.log_gradcheck(report)
            if not report.passed and cfg.gradcheck.stop_on_fail:
                raise GradcheckFailed(f"gradient check failed: max relative error "
                                      f"{report.max_rel_error:.2e} >= tol {report.tol:g}")
        result = trainer.fit()
        recorder.log_metrics({"test_loss": result.test_loss, "test_acc": result.test_acc,
                              "best_val_acc": result.best_val_acc,
                              "best_epoch": result.best_epoch}, step=result.epochs_run)
        recorder.set_tags({"checkpoint": str(result.checkpoint),
                           "stopped_early": str(result.stopped_early).lower()})
        if cfg.tracking.plots:
            classes = splits.classes
            recorder.log_figure(plots.curves_figure(result.history), "curves")
            recorder.log_figure(plots.confusion_figure(splits.y_test, result.test_pred, classes),
                                "confusion_matrix")
            recorder.log_figure(plots.per_class_figure(splits.y_test, result.test_pred, classes),
                                "per_class_accuracy")
            recorder.log_figure(plots.weights_figure(model.params["W1"]), "first_layer_weights")
        if cfg.tracking.log_model:
            recorder.log_model(model, normalizer.state_dict(), splits.classes)
    except Interrupted as e:
        recorder.set_tags({"checkpoint": str(e.checkpoint),
                           "resume": f"trainer.resume={e.checkpoint}"})
        recorder.finish("KILLED", e)
        log.warning("%s\nresume with: mlp-train ... trainer.resume=%s", e, e.checkpoint)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt as e:
        recorder.finish("KILLED", e)
        raise
    except BaseException as e:
        recorder.finish("FAILED", e)
        if isinstance(e, DivergenceError | GradcheckFailed):
            print(f"mlp-lab: {e}", file=sys.stderr)
            sys.exit(EXIT_GRADCHECK if isinstance(e, GradcheckFailed) else 1)
        raise
    recorder.finish("FINISHED")
    log.info("test accuracy %.4f (best val_acc %.4f at epoch %d); run %s\nview: mlflow ui "
             "--backend-store-uri %s", result.test_acc, result.best_val_acc, result.best_epoch,
             recorder.run_id, uri)
    return result.best_val_acc


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


@hydra.main(version_base="1.3", config_path="pkg://mlp.conf", config_name="config")
def _gradcheck_app(cfg: DictConfig) -> None:
    if not check(cfg):
        sys.exit(EXIT_GRADCHECK)


def train_main() -> None:
    """`mlp-train [overrides]` / `mlp-train -m [sweep overrides]`."""
    _train_app()


def gradcheck_main() -> None:
    """`mlp-gradcheck [overrides]`: exit 0 when the check passes, 3 when it fails."""
    _gradcheck_app()
