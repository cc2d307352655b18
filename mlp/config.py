"""The configuration: structured-config dataclasses (registered with Hydra) and validation.

The dataclasses mirror `conf/` and the code they configure: `model` -> `model.MLP`,
`optim` -> `optim.make_optimizer` + `optim.Schedule`, `data` -> `data.py`, `trainer` ->
`train.Trainer`, `gradcheck` -> `gradcheck.check_model`, `tracking` -> `tracking.py`.
Hydra rejects a value of the wrong type against these types; `validate` then checks
ranges and choices before any work starts, and names the key, the value and what is
allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mlp import losses, model, optim
from mlp.layers import ACTIVATIONS
from mlp.model import INITS

NORMALIZATIONS = ("mean_image", "channel", "none")
NORMS = (None, "none", *model.NORMS)
DATASETS = ("cifar10", "synthetic")
TRAIN_DTYPES = ("float32", "float64")


@dataclass
class ModelConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [100])
    activation: str = "relu"
    loss: str = "softmax"
    reg: float = 1e-4
    init: str = "he"
    weight_scale: float = 1e-3
    leaky_slope: float = 0.01
    elu_alpha: float = 1.0
    maxout_pieces: int = 2
    dropout: float = 0.0
    norm: str | None = None


@dataclass
class ScheduleConfig:
    name: str = "constant"
    warmup_epochs: float = 0.0
    step_size: int = 10
    gamma: float = 0.1
    decay: float = 0.95
    min_lr: float = 0.0


@dataclass
class OptimConfig:
    name: str = "momentum"
    lr: float = 1e-3
    momentum: float = 0.9
    decay_rate: float = 0.99
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class AugmentConfig:
    pad: int = 0
    flip: bool = False


@dataclass
class SyntheticConfig:
    n_train: int = 600
    n_test: int = 200


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str | None = None
    archive: str | None = None
    md5: str | None = None
    val_size: int = 5000
    limit: int | None = None
    normalize: str = "channel"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 200
    dtype: str = "float32"
    train_eval_size: int = 5000
    eval_batch_size: int = 1000
    patience: int | None = None
    diverge_factor: float = 100.0
    checkpoint_dir: str | None = None
    resume: str | None = None
    progress: bool = True
    prefetch: bool = True


@dataclass
class GradcheckConfig:
    enabled: bool = True
    samples: int = 8
    max_width: int = 16
    num_checks: int = 30
    tol: float = 1e-7
    stop_on_fail: bool = False


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "mlp-lab"
    run_name: str | None = None
    log_every_steps: int = 10
    health: bool = True
    plots: bool = True
    log_model: bool = True


@dataclass
class TrialConfig:
    """Set per trial by the Optuna sweeper (hydra/sweeper=mlp_optuna), never by hand: which
    trial of which study this job is, so that it can report val_acc for pruning."""

    storage: str | None = None
    study: str | None = None
    id: int | None = None  # Optuna's trial id in the storage (not the per-study number)


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)


SCHEMA_NAME = "mlp_lab_schema"


def register() -> None:
    """Register the schema so that `conf/config.yaml` can name it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


class ConfigError(ValueError):
    """A configuration value that is out of range or not one of the allowed choices."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not allowed: expected {allowed}")
        self.key = key


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: DictConfig | Config) -> None:
    """Check ranges and choices of a composed config; raise ConfigError at the first
    problem, naming the key (e.g. `optim.lr`), the value and what is allowed."""
    c = cfg if isinstance(cfg, Config) else OmegaConf.to_object(cfg)
    m, o, d, t, g, tr = c.model, c.optim, c.data, c.trainer, c.gradcheck, c.tracking
    _check(all(h > 0 for h in m.hidden_sizes), "model.hidden_sizes", m.hidden_sizes,
           "a list of positive integers ([] for a linear classifier)")
    _check(m.activation in ACTIVATIONS, "model.activation", m.activation,
           f"one of {list(ACTIVATIONS)}")
    _check(m.loss in losses.LOSSES, "model.loss", m.loss, f"one of {list(losses.LOSSES)}")
    _check(m.reg >= 0, "model.reg", m.reg, "a number >= 0")
    _check(m.init in INITS, "model.init", m.init, f"one of {list(INITS)}")
    _check(m.weight_scale > 0, "model.weight_scale", m.weight_scale, "a number > 0")
    _check(0 <= m.leaky_slope < 1, "model.leaky_slope", m.leaky_slope, "a number in [0, 1)")
    _check(m.elu_alpha > 0, "model.elu_alpha", m.elu_alpha, "a number > 0")
    _check(m.maxout_pieces >= 2, "model.maxout_pieces", m.maxout_pieces, "an integer >= 2")
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "a drop probability in [0, 1)")
    _check(m.norm in NORMS, "model.norm", m.norm, f"one of {list(NORMS)}")

    _check(o.name in optim.OPTIMIZERS, "optim.name", o.name, f"one of {list(optim.OPTIMIZERS)}")
    _check(o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _check(o.schedule.name in optim.SCHEDULES, "optim.schedule.name", o.schedule.name,
           f"one of {list(optim.SCHEDULES)}")

    _check(d.name in DATASETS, "data.name", d.name, f"one of {list(DATASETS)}")
    _check(d.val_size > 0, "data.val_size", d.val_size, "an integer > 0")
    _check(d.limit is None or d.limit > 1, "data.limit", d.limit, "null or an integer > 1")
    if d.limit is not None:
        _check(d.val_size < d.limit, "data.val_size", d.val_size,
               f"fewer images than data.limit={d.limit}")
    _check(d.normalize in NORMALIZATIONS, "data.normalize", d.normalize,
           f"one of {list(NORMALIZATIONS)}")
    _check(0 <= d.augment.pad <= 16, "data.augment.pad", d.augment.pad, "an integer in [0, 16]")
    _check(d.synthetic.n_train > 1, "data.synthetic.n_train", d.synthetic.n_train,
           "an integer > 1")
    _check(d.synthetic.n_test > 0, "data.synthetic.n_test", d.synthetic.n_test, "an integer > 0")
    if d.name == "synthetic":
        _check(d.val_size < d.synthetic.n_train, "data.val_size", d.val_size,
               f"fewer images than data.synthetic.n_train={d.synthetic.n_train}")
    _check(d.md5 is None or (len(d.md5) == 32 and all(ch in "0123456789abcdef"
                                                     for ch in d.md5.lower())),
           "data.md5", d.md5, "null or 32 hexadecimal digits")

    _check(t.epochs > 0, "trainer.epochs", t.epochs, "an integer > 0")
    _check(t.batch_size > 0, "trainer.batch_size", t.batch_size, "an integer > 0")
    _check(t.dtype in TRAIN_DTYPES, "trainer.dtype", t.dtype, f"one of {list(TRAIN_DTYPES)}")
    _check(t.train_eval_size > 0, "trainer.train_eval_size", t.train_eval_size,
           "an integer > 0")
    _check(t.eval_batch_size > 0, "trainer.eval_batch_size", t.eval_batch_size,
           "an integer > 0")
    _check(t.patience is None or t.patience > 0, "trainer.patience", t.patience,
           "null (no early stopping) or an integer > 0")
    _check(t.diverge_factor > 1, "trainer.diverge_factor", t.diverge_factor, "a number > 1")

    _check(g.samples > 0, "gradcheck.samples", g.samples, "an integer > 0")
    _check(g.max_width > 0, "gradcheck.max_width", g.max_width, "an integer > 0")
    _check(g.num_checks > 0, "gradcheck.num_checks", g.num_checks, "an integer > 0")
    _check(0 < g.tol < 1, "gradcheck.tol", g.tol, "a number in (0, 1)")

    _check(bool(tr.experiment.strip()), "tracking.experiment", tr.experiment, "a non-empty name")
    _check(tr.log_every_steps > 0, "tracking.log_every_steps", tr.log_every_steps,
           "an integer > 0")

    # The schedule and the optimizer check their own hyperparameters (ValueError naming
    # the optim.* key); running them here moves those errors before any work.
    optim.Schedule(name=o.schedule.name, lr=o.lr, steps_per_epoch=1, epochs=t.epochs,
                   warmup_epochs=o.schedule.warmup_epochs, step_size=o.schedule.step_size,
                   gamma=o.schedule.gamma, decay=o.schedule.decay, min_lr=o.schedule.min_lr)
    optim.make_optimizer(o.name, {}, momentum=o.momentum, decay_rate=o.decay_rate,
                         beta1=o.beta1, beta2=o.beta2, eps=o.eps)
