"""The one configuration schema: every key of `mlp-train`, its type and its default.

The dataclasses mirror `conf/` and the code they configure: `model` -> `model.MLP`'s
keyword arguments, `optim` -> `optim.make_optimizer` + `optim.Schedule`, `data` ->
`data`, `trainer` -> `train.TrainSettings`, `gradcheck` -> `gradcheck.check_training_step`,
`tracking` -> `tracking`. Their defaults are read from that code (a default lives where
it acts); only what the code has no default for (the learning rate, the data set) is set
here. Registered in Hydra's ConfigStore, the schema is the base of `conf/config.yaml`,
whose groups override only what differs.

Hydra rejects a value of the wrong type against these types; `validate` then checks
ranges, choices and combinations before any work starts and names the key, the value and
what is allowed. `applies` says which keys act in a given config (an Adam key does not
act in an SGD run) and `BOOKKEEPING` which keys never change a result.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mlp import data as datalib
from mlp.core import gradcheck, losses, model, optim
from mlp.core.layers import ACTIVATIONS
from mlp.errors import ConfigError
from mlp.training import budget
from mlp.training.trainer import TrainSettings


def _defaults(fn: Callable) -> dict[str, Any]:
    """The keyword defaults of a function or class constructor."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty}


_MLP = _defaults(model.MLP)
_OPTIM = _defaults(optim.make_optimizer)
_SCHEDULE = _defaults(optim.Schedule)
_CHECK = _defaults(gradcheck.check_training_step)
_NORMALIZER = _defaults(datalib.Normalizer)
_TRAIN = TrainSettings()

DATASETS = ("cifar10", "synthetic")
TRAIN_DTYPES = ("float32", "float64")
NORMS = (None, "none", *model.NORMS)


@dataclass
class ModelConfig:
    """`model.MLP`'s keyword arguments (input and output sizes come from the data)."""

    hidden_sizes: list[int] = field(default_factory=lambda: list(_MLP["hidden_sizes"]))
    activation: str = _MLP["activation"]      # relu, leaky_relu, elu, sigmoid, tanh, maxout
    loss: str = _MLP["loss"]                  # softmax or svm
    reg: float = _MLP["reg"]                  # L2: data loss + reg * sum of squared weights
    init: str = _MLP["init"]                  # he, xavier, normal (std = weight_scale)
    weight_scale: float = _MLP["weight_scale"]
    leaky_slope: float = _MLP["leaky_slope"]
    elu_alpha: float = _MLP["elu_alpha"]
    maxout_pieces: int = _MLP["maxout_pieces"]
    dropout: float = _MLP["dropout"]          # drop probability after each hidden activation
    norm: str | None = _MLP["norm"]           # null, batch or layer
    label_smoothing: float = _MLP["label_smoothing"]  # softmax targets (1 - s) onehot + s / C


@dataclass
class ScheduleConfig:
    """`optim.Schedule`: the learning rate over the run."""

    name: str = "constant"                    # constant, step, exponential, cosine, onecycle
    warmup_epochs: float = _SCHEDULE["warmup_epochs"]  # onecycle: the rise to optim.lr
    step_size: int = _SCHEDULE["step_size"]
    gamma: float = _SCHEDULE["gamma"]
    decay: float = _SCHEDULE["decay"]         # exponential: lr * decay**epoch (cs231n)
    min_lr: float = _SCHEDULE["min_lr"]       # cosine, onecycle: the lr at the end
    div_factor: float = _SCHEDULE["div_factor"]  # onecycle starts at optim.lr / div_factor


@dataclass
class OptimConfig:
    """`optim.make_optimizer` and its schedule."""

    name: str = "momentum"                    # sgd, momentum, nesterov, rmsprop, adam
    lr: float = 1e-2
    momentum: float = _OPTIM["momentum"]
    decay_rate: float = _OPTIM["decay_rate"]
    beta1: float = _OPTIM["beta1"]
    beta2: float = _OPTIM["beta2"]
    eps: float = _OPTIM["eps"]
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class AugmentConfig:
    pad: int = 0                              # random crop with this zero padding (0: off)
    flip: bool = False                        # random horizontal flip


@dataclass
class WhitenConfig:
    """`data.Normalizer`'s whitening, fitted on the training split after `normalize`."""

    name: str = _NORMALIZER["whiten"]         # none, pca (k features), zca (3072, least moved)
    components: int | None = _NORMALIZER["components"]  # leading components kept (null: all)
    eps: float = _NORMALIZER["eps"]           # added to the covariance's eigenvalues


@dataclass
class SyntheticConfig:
    n_train: int = 600
    n_test: int = 200


@dataclass
class DataConfig:
    """Which images, where from, and how they are split and preprocessed."""

    name: str = "cifar10"                     # cifar10 or synthetic
    root: str | None = None                   # null: $MLP_LAB_DATA or ~/.cache/mlp-lab
    archive: str | None = None                # null: $MLP_LAB_ARCHIVE, a cached copy, or download
    md5: str | None = None                    # the local archive's md5, to verify it
    val_size: int = 5000
    limit: int | None = None                  # only the first N training images
    normalize: str = _NORMALIZER["mode"]      # channel, mean_image (cs231n), none
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainerConfig:
    """`train.TrainSettings`: the loop."""

    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    dtype: str = _TRAIN.dtype
    train_eval_size: int = _TRAIN.train_eval_size   # train metrics on this fixed subset
    eval_batch_size: int = _TRAIN.eval_batch_size
    patience: int | None = _TRAIN.patience          # early stop after N epochs without better
    diverge_factor: float = _TRAIN.diverge_factor   # stop when a batch loss exceeds this x first
    checkpoint_dir: str | None = None               # null: <hydra output dir>/checkpoints
    resume: str | None = None                       # a checkpoint .npz to continue from
    progress: bool = _TRAIN.progress                # tqdm bars (on a terminal only)
    prefetch: bool = _TRAIN.prefetch                # next batch on a helper thread
    ema: float = _TRAIN.ema                         # decay of the weights' average (0: off)
    ema_every: int = _TRAIN.ema_every               # average every N steps (decay**N)


@dataclass
class GradcheckConfig:
    """The gradient check of the run's own architecture, before training."""

    enabled: bool = True
    samples: int = 8                          # inputs in the check's batch
    max_width: int = 16                       # hidden widths are capped to this
    num_checks: int = 30                      # coordinates sampled per parameter
    tol: float = _CHECK["tol"]
    stop_on_fail: bool = False


@dataclass
class TrackingConfig:
    """Where and what MLflow records."""

    uri: str | None = None                    # null: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "mlp-lab"
    run_name: str | None = None               # null: what differs, e.g. relu-h100-lr1e-2
    log_every_steps: int = 10                 # loss/batch every N steps
    health: bool = True                       # per-layer norms, update ratios, dead units
    plots: bool = True
    log_model: bool = True
    system_metrics: bool = True               # CPU and memory while the run trains


@dataclass
class Config:
    seed: int = 0                             # init, shuffling, augmentation, check sampling
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class TrialConfig:
    """Set per job by the Optuna sweeper (hydra/sweeper=mlp_optuna) as `+trial.*`, never by
    hand: which trial of which study the job is, so that it can report for pruning."""

    storage: str | None = None
    study: str | None = None
    id: int | None = None  # Optuna's trial id in the storage (not the per-study number)


# Nodes that are not part of the user's schema but may be added with `+node.key=...` by the
# tools that own them.
EXTENSIONS: dict[str, type] = {"trial": TrialConfig}

# Keys that never change what a run computes (where it writes, how it reports): two configs
# that differ only here are the same experiment. Not params; not hashed; never "swept".
BOOKKEEPING = ("tracking", "trial", "trainer.progress", "trainer.checkpoint_dir",
               "trainer.resume", "trainer.prefetch", "data.root", "data.archive", "data.md5")

def _one_of(choices: Any) -> tuple[Callable[[Any], bool], str]:
    choices = list(choices)
    return (lambda v: v in choices), f"one of {choices}"


# Keys that act only when another key has some values: {key: (key it depends on, (test of
# its value, the values under which the key acts, in words))}.
APPLIES_WHEN: dict[str, tuple[str, tuple[Callable[[Any], bool], str]]] = {
    "model.weight_scale": ("model.init", _one_of(["normal"])),
    "model.leaky_slope": ("model.activation", _one_of(["leaky_relu"])),
    "model.elu_alpha": ("model.activation", _one_of(["elu"])),
    "model.maxout_pieces": ("model.activation", _one_of(["maxout"])),
    "model.label_smoothing": ("model.loss", _one_of(["softmax"])),
    "optim.momentum": ("optim.name", _one_of(["momentum", "nesterov"])),
    "optim.decay_rate": ("optim.name", _one_of(["rmsprop"])),
    "optim.beta1": ("optim.name", _one_of(["adam"])),
    "optim.beta2": ("optim.name", _one_of(["adam"])),
    "optim.eps": ("optim.name", _one_of(["rmsprop", "adam"])),
    "optim.schedule.step_size": ("optim.schedule.name", _one_of(["step"])),
    "optim.schedule.gamma": ("optim.schedule.name", _one_of(["step"])),
    "optim.schedule.decay": ("optim.schedule.name", _one_of(["exponential"])),
    "optim.schedule.min_lr": ("optim.schedule.name", _one_of(["cosine", "onecycle"])),
    "optim.schedule.div_factor": ("optim.schedule.name", _one_of(["onecycle"])),
    "data.synthetic": ("data.name", _one_of(["synthetic"])),
    "data.whiten.components": ("data.whiten.name", _one_of(["pca", "zca"])),
    "data.whiten.eps": ("data.whiten.name", _one_of(["pca", "zca"])),
    "trainer.ema_every": ("trainer.ema", ((lambda v: v > 0), "a decay > 0")),
    "gradcheck.samples": ("gradcheck.enabled", _one_of([True])),
    "gradcheck.max_width": ("gradcheck.enabled", _one_of([True])),
    "gradcheck.num_checks": ("gradcheck.enabled", _one_of([True])),
    "gradcheck.tol": ("gradcheck.enabled", _one_of([True])),
    "gradcheck.stop_on_fail": ("gradcheck.enabled", _one_of([True])),
}

SCHEMA_NAME = "mlp_lab_schema"


def register() -> None:
    """Register the schema so that `conf/config.yaml` can name it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"reg": 0.1}} -> {"model.reg": 0.1}; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> str | None:
    """The prefix of `prefixes` that is `key` or one of its parent nodes, if any."""
    return next((p for p in prefixes if key == p or key.startswith(p + ".")), None)


def is_bookkeeping(key: str) -> bool:
    """True for a dotted key that never changes a result (see BOOKKEEPING)."""
    return _under(key, BOOKKEEPING) is not None


def applies(key: str, flat: Mapping[str, Any]) -> bool:
    """Whether dotted `key` acts in the config whose flattened values are `flat`."""
    rule = _under(key, list(APPLIES_WHEN))
    if rule is None:
        return True
    depends_on, (ok, _) = APPLIES_WHEN[rule]
    return ok(flat.get(depends_on)) and applies(depends_on, flat)


def schema_keys() -> dict[str, Any]:
    """Every dotted leaf key of the schema with its default."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


_POSITIVE_INT = (lambda v: v > 0), "an integer > 0"
_NON_NEGATIVE = (lambda v: v >= 0), "a number >= 0"
_POSITIVE = (lambda v: 0 < v < math.inf), "a finite number > 0"

# Ranges and choices, key by key: (test, what is allowed).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": ((lambda v: v >= 0), "an integer >= 0"),
    "model.hidden_sizes": ((lambda v: all(h > 0 for h in v)),
                           "a list of positive integers ([] for a linear classifier)"),
    "model.activation": _one_of(ACTIVATIONS),
    "model.loss": _one_of(losses.LOSSES),
    "model.reg": _NON_NEGATIVE,
    "model.init": _one_of(model.INITS),
    "model.weight_scale": _POSITIVE,
    "model.leaky_slope": ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "model.elu_alpha": _POSITIVE,
    "model.maxout_pieces": ((lambda v: v >= 2), "an integer >= 2"),
    "model.dropout": ((lambda v: 0 <= v < 1), "a drop probability in [0, 1)"),
    "model.norm": _one_of(NORMS),
    "model.label_smoothing": ((lambda v: 0 <= v < 1), "a number in [0, 1) (0: one-hot targets)"),
    "optim.name": _one_of(optim.OPTIMIZERS),
    "optim.lr": _POSITIVE,
    "optim.schedule.name": _one_of(optim.SCHEDULES),
    "data.name": _one_of(DATASETS),
    "data.val_size": _POSITIVE_INT,
    "data.limit": ((lambda v: v is None or v > 1), "null or an integer > 1"),
    "data.normalize": _one_of(datalib.Normalizer.MODES),
    "data.augment.pad": ((lambda v: 0 <= v <= 16), "an integer in [0, 16]"),
    "data.whiten.name": _one_of(datalib.Normalizer.WHITENINGS),
    "data.whiten.components": ((lambda v: v is None or 1 <= v <= datalib.DIM),
                               f"null (all {datalib.DIM}) or an integer in [1, {datalib.DIM}]"),
    "data.whiten.eps": _POSITIVE,
    "data.synthetic.n_train": ((lambda v: v > 1), "an integer > 1"),
    "data.synthetic.n_test": _POSITIVE_INT,
    "data.md5": ((lambda v: v is None or (len(v) == 32 and all(c in "0123456789abcdef"
                                                               for c in v.lower()))),
                 "null or 32 hexadecimal digits"),
    "trainer.epochs": _POSITIVE_INT,
    "trainer.batch_size": _POSITIVE_INT,
    "trainer.dtype": _one_of(TRAIN_DTYPES),
    "trainer.train_eval_size": _POSITIVE_INT,
    "trainer.eval_batch_size": _POSITIVE_INT,
    "trainer.patience": ((lambda v: v is None or v > 0),
                         "null (no early stopping) or an integer > 0"),
    "trainer.diverge_factor": ((lambda v: v > 1), "a number > 1"),
    "trainer.ema": ((lambda v: 0 <= v < 1), "a decay in [0, 1) (0: no average)"),
    "trainer.ema_every": _POSITIVE_INT,
    "gradcheck.samples": _POSITIVE_INT,
    "gradcheck.max_width": _POSITIVE_INT,
    "gradcheck.num_checks": _POSITIVE_INT,
    "gradcheck.tol": ((lambda v: 0 < v < 1), "a number in (0, 1)"),
    "tracking.experiment": ((lambda v: bool(v.strip())), "a non-empty name"),
    "tracking.log_every_steps": _POSITIVE_INT,
}


def _to_flat(cfg: DictConfig | Config | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, Config):
        cfg = OmegaConf.structured(cfg)
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return flatten(cfg)


def validate(cfg: DictConfig | Config | Mapping[str, Any]) -> None:
    """Check ranges, choices and combinations of a composed config; raise ConfigError at
    the first problem, naming the key (e.g. `optim.lr`), the value and what is allowed."""
    flat = _to_flat(cfg)
    for key, (ok, allowed) in RULES.items():
        if not ok(flat[key]):
            raise ConfigError(key, flat[key], allowed)
    if flat["model.label_smoothing"] and flat["model.loss"] != "softmax":
        raise ConfigError("model.label_smoothing", flat["model.label_smoothing"],
                          f"0 with model.loss={flat['model.loss']!r}: smoothing softens the "
                          "one-hot targets of the softmax loss")
    sizes = {"data.limit": flat["data.limit"]}
    if flat["data.name"] == "synthetic":
        sizes["data.synthetic.n_train"] = flat["data.synthetic.n_train"]
    known = {k: v for k, v in sizes.items() if v is not None}
    if known:
        source, n_train = min(known.items(), key=lambda kv: kv[1])
        if flat["data.val_size"] >= n_train:
            raise ConfigError("data.val_size", flat["data.val_size"],
                              f"fewer images than {source}={n_train}")
    # A batch larger than the training split, or a run larger than the machine's memory.
    budget.check(flat)
    # The schedule and the optimizer check their own hyperparameters (ValueError naming
    # the optim.* key); building them here moves those errors before any work.
    schedule = {k: flat[f"optim.schedule.{k}"] for k in ScheduleConfig.__dataclass_fields__}
    optim.Schedule(lr=flat["optim.lr"], steps_per_epoch=1, epochs=flat["trainer.epochs"],
                   **schedule)
    optim.make_optimizer(flat["optim.name"], {}, **optimizer_kwargs(flat))


def optimizer_kwargs(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`optim.make_optimizer`'s keyword arguments from a flattened config."""
    return {k: flat[f"optim.{k}"] for k in _OPTIM}


def inactive_overrides(flat: Mapping[str, Any], keys: list[str]) -> list[str]:
    """Warnings for the given (overridden) keys that do not act in this config, e.g. an
    Adam beta in an SGD run."""
    out = []
    for key in keys:
        rule = _under(key, list(APPLIES_WHEN))
        if rule is not None and not applies(key, flat):
            depends_on, (_, acts_when) = APPLIES_WHEN[rule]
            out.append(f"{key}={flat.get(key)!r} has no effect: it applies when {depends_on} "
                       f"is {acts_when} (this run: {flat.get(depends_on)!r})")
    return out
