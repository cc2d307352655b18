"""The composition: the objects of a run (data, model, optimizer, schedule, trainer, the
per-run gradient check) built from a checked config. The only place where config keys
meet the constructors of the core, the data and the training loop."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlp import data as datalib
from mlp.config import schema as configlib
from mlp.core import gradcheck, optim
from mlp.core.model import MLP
from mlp.training.trainer import Trainer, TrainSettings

ARCHIVE_VAR = "MLP_LAB_ARCHIVE"  # a local cifar-10-python.tar.gz when data.archive is not set


def build_model(cfg: DictConfig, input_dim: int, num_classes: int,
                max_width: int | None = None, dtype: str | None = None) -> MLP:
    """The MLP of `cfg.model` for inputs of input_dim features and num_classes classes
    (hidden widths capped to max_width for a gradient check)."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    if max_width:
        kwargs["hidden_sizes"] = [min(h, max_width) for h in kwargs["hidden_sizes"]]
    return MLP(input_dim=input_dim, num_classes=num_classes, dtype=dtype or cfg.trainer.dtype,
               seed=cfg.seed, **kwargs)


# Batches the float32 step check may draw to find one without kinks: at 1 in 10 measured on
# best_mlp's net, a run ends on a batch with kinks (and says so) about once in 1e8.
PRECISION_BATCHES = 8
_checks: dict[str, gradcheck.GradcheckReport] = {}  # this process's checks, by what they read


def run_gradcheck(cfg: DictConfig) -> gradcheck.GradcheckReport:
    """The gradient check of what the run trains: its architecture, activation, loss and
    reg (same depth, hidden widths capped at gradcheck.max_width, float64), through the
    training step's own path (the zero-copy backward pass and the run's optimizer's fused
    L2 pass), on gradcheck.samples standard normal inputs (what normalized or whitened
    pixels look like) of the run's input width, with random labels.

    The check reads `model.*`, `gradcheck.*`, the optimizer's name and keyword arguments
    (not `optim.lr`: the check steps at its own rate), the input width and `seed`, and is
    deterministic: the jobs of a sweep run in one process (an `optim.lr` grid) that agree
    on all of these share one check, computed by the first (the report is read only)."""
    g, kwargs, input_dim = cfg.gradcheck, _optimizer_kwargs(cfg), _input_dim(cfg)
    key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True),
                      OmegaConf.to_container(g, resolve=True), cfg.optim.name, kwargs,
                      input_dim, cfg.seed], sort_keys=True, default=str)
    if key not in _checks:
        model = build_model(cfg, input_dim, len(datalib.CLASSES), max_width=g.max_width,
                            dtype="float64")
        rng = np.random.default_rng([cfg.seed, 3])
        X = rng.standard_normal((g.samples, model.arch.input_dim))
        y = rng.integers(0, model.arch.num_classes, g.samples)
        _checks[key] = gradcheck.check_training_step(
            model, _optimizer_maker(cfg, kwargs), X, y, num_checks=g.num_checks, tol=g.tol,
            seed=cfg.seed)
    return _checks[key]


def run_step_precision(cfg: DictConfig) -> gradcheck.PrecisionCheck:
    """The training step in the dtype the run trains in (trainer.dtype), at the run's own
    sizes (architecture, batch, optimizer, lr), against the float64 reference step from
    the same parameters and batch, on standard normal inputs with random labels: the
    first of up to PRECISION_BATCHES such batches on which no unit sits within rounding
    of a kink (`gradcheck.check_step_precision_clear`)."""
    batch = cfg.trainer.batch_size
    model = build_model(cfg, _input_dim(cfg), len(datalib.CLASSES))
    rng = np.random.default_rng([cfg.seed, 5])
    batches = ((rng.standard_normal((batch, model.arch.input_dim), dtype=np.float32),
                rng.integers(0, model.arch.num_classes, batch))
               for _ in range(PRECISION_BATCHES))
    return gradcheck.check_step_precision_clear(
        model, _optimizer_maker(cfg, _optimizer_kwargs(cfg)), batches, lr=cfg.optim.lr)


def _input_dim(cfg: DictConfig) -> int:
    """Features per image the model reads: 3072, or the whitening's components."""
    return datalib.output_dim(cfg.data.whiten.name, cfg.data.whiten.components)


def _optimizer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of the run's optimizer (`optim.make_optimizer`'s)."""
    return configlib.optimizer_kwargs(configlib.flatten(OmegaConf.to_container(cfg,
                                                                               resolve=True)))


def _optimizer_maker(cfg: DictConfig, kwargs: dict[str, Any]
                     ) -> Callable[[dict[str, np.ndarray]], optim.Optimizer]:
    """A function of the parameters that builds the run's optimizer with `kwargs`."""
    return lambda params: optim.make_optimizer(cfg.optim.name, params, **kwargs)


def archive_path(cfg: DictConfig) -> Path | None:
    """The configured data's archive: `data.archive`, else $MLP_LAB_ARCHIVE, else None (a
    cached or downloaded official archive); for `data=synthetic` the generated archive
    under the data root (made on first use)."""
    d = cfg.data
    if d.name != "synthetic":
        archive = d.archive or os.environ.get(ARCHIVE_VAR) or None
        return Path(archive).expanduser() if archive else None
    root = data_root(cfg)
    archive = root / f"synthetic-{d.synthetic.n_train}-{d.synthetic.n_test}-{cfg.seed}.tar.gz"
    if not archive.exists():
        root.mkdir(parents=True, exist_ok=True)
        datalib.make_synthetic_archive(archive, d.synthetic.n_train, d.synthetic.n_test,
                                       seed=cfg.seed)
    return archive


def data_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.root).expanduser() if cfg.data.root else datalib.default_root()


# The last splits loaded and the last normalizer fitted in this process, with what they were
# made from: the jobs of a sweep run in one process that read the same data share them.
_last_splits: tuple[str, datalib.Splits] | None = None
_last_fit: tuple[datalib.Splits, str, dict[str, np.ndarray]] | None = None


def data_key(cfg: DictConfig) -> str:
    """What a run's splits are made of: two configs with the same key get the same Splits."""
    d = cfg.data
    return json.dumps([str(archive_path(cfg)), str(data_root(cfg)), d.name, d.md5, d.val_size,
                       d.limit, OmegaConf.to_container(d.synthetic), cfg.seed], default=str)


def load_data(cfg: DictConfig) -> datalib.Splits:
    """CIFAR-10 (a local archive, the cache, or the download) or the synthetic set, split
    as configured. The splits are read only: the jobs of a sweep in one process whose
    `data.*` (but its preprocessing), archive and seed agree get the same Splits."""
    global _last_splits
    archive = archive_path(cfg)
    d = cfg.data
    key = data_key(cfg)
    if _last_splits is not None and _last_splits[0] == key:
        return _last_splits[1]
    # The generated archive is its own reference: its md5 keeps it from reading as unverified.
    md5 = datalib.file_digest(archive, "md5") if d.name == "synthetic" else d.md5
    raw = datalib.load_cifar10(data_root(cfg), archive, md5, progress=cfg.trainer.progress)
    splits = datalib.split(raw, val_size=d.val_size, limit=d.limit, seed=cfg.seed)
    _last_splits = key, splits
    return splits


def fit_normalizer(cfg: DictConfig, splits: datalib.Splits) -> datalib.Normalizer:
    """The preprocessing of `data.*` fitted on the training split: a new Normalizer, whose
    state is fitted once per process for the same splits and settings (then loaded)."""
    global _last_fit
    w = cfg.data.whiten
    normalizer = datalib.Normalizer(cfg.data.normalize, whiten=w.name, components=w.components,
                                    eps=w.eps)
    key = json.dumps([cfg.data.normalize, w.name, w.components, w.eps])
    if _last_fit is not None and _last_fit[0] is splits and _last_fit[1] == key:
        normalizer.load_state_dict(_last_fit[2])
        return normalizer
    normalizer.fit(splits.X_train)
    _last_fit = splits, key, normalizer.state_dict()
    return normalizer


def data_source(cfg: DictConfig) -> str:
    """Where the images came from: the archive's absolute path, or the official URL."""
    archive = archive_path(cfg)
    return str(archive.resolve()) if archive else datalib.OFFICIAL_URL


def archive_override(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """`data.archive=<path>` when the archive came from $MLP_LAB_ARCHIVE, so that printed
    commands are complete on their own."""
    if cfg.data.name != "cifar10" or cfg.data.archive or not os.environ.get(ARCHIVE_VAR):
        return []
    return [f"data.archive={os.environ[ARCHIVE_VAR]}"]


def build_trainer(cfg: DictConfig, splits: datalib.Splits, output_dir: Path) -> Trainer:
    """Normalizer (fitted on the training split), model, optimizer, schedule and loop
    settings from the config."""
    t, o = cfg.trainer, cfg.optim
    normalizer = fit_normalizer(cfg, splits)
    model = build_model(cfg, normalizer.out_dim, len(splits.classes))
    optimizer = _optimizer_maker(cfg, _optimizer_kwargs(cfg))(model.params)
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
        test_flip=cfg.data.augment.test_flip, test_shift=cfg.data.augment.test_shift,
        checkpoint_dir=Path(t.checkpoint_dir) if t.checkpoint_dir else output_dir / "checkpoints",
        progress=t.progress, prefetch=t.prefetch, health=cfg.tracking.health, seed=cfg.seed,
        ema=t.ema, ema_every=t.ema_every)
    return Trainer(model, optimizer, schedule, splits, normalizer, settings)
