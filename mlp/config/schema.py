"""The one configuration schema: every key of `mlp-train`, defined once.

Each key is one dataclass field, `field(default=..., metadata=rule(allowed, when, bookkeeping))`:
its type (the annotation), its default, the values it takes (`allowed`), the condition
under which it acts (`when`: another key and the values it must have) and whether it
ever changes a result (`bookkeeping`). `RULES`, `APPLIES_WHEN` and `BOOKKEEPING` are read
from those fields, never written by hand.

The dataclasses mirror `conf/` and the code they configure: `model` -> `model.MLP`'s
keyword arguments, `optim` -> `optim.make_optimizer` + `optim.Schedule`, `data` ->
`data`, `trainer` -> `train.TrainSettings`, `gradcheck` -> `gradcheck.check_training_step`,
`tracking` -> `tracking`. Their defaults are read from that code (a default lives where
it acts); only what the code has no default for (the learning rate, the data set) is set
here. Registered in Hydra's ConfigStore, the schema is the base of `conf/config.yaml`,
whose groups override only what differs.

Hydra rejects a value of the wrong type against these types; `validate` then checks
ranges, choices and combinations and names the key, the value and what is allowed
(`mlp.config.command_line` runs it on every composed config of a command line, before any
work). `applies` says which keys act in a given config (an Adam key does not act in an
SGD run) and `is_bookkeeping` which keys never change a result.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
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


@dataclass(frozen=True)
class Allowed:
    """What a key takes: a test of its value and the same in words ("an integer > 0")."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:  # a value of another type (Hydra's types let None or a str by)
            return False


def one_of(choices: Any) -> Allowed:
    choices = list(choices)
    return Allowed(lambda v: v in choices, f"one of {choices}")


def _existing_file(what: str) -> Allowed:
    # A path that does not exist is knowable before work starts: refused with the config,
    # before a store is opened.
    return Allowed(lambda v: v is None or os.path.isfile(os.path.expanduser(v)),
                   f"null or an existing {what}")


POSITIVE_INT = Allowed(lambda v: v > 0, "an integer > 0")
NON_NEGATIVE = Allowed(lambda v: v >= 0, "a number >= 0")
POSITIVE = Allowed(lambda v: 0 < v < math.inf, "a finite number > 0")


def when(key: str, *values: Any) -> tuple[str, Allowed]:
    """A key acts only when `key` has one of `values`."""
    return key, one_of(values)


def rule(allowed: Allowed | None = None, when: tuple[str, Allowed] | None = None,
         bookkeeping: bool = False) -> dict[str, Any]:
    """A key's rules, as its field's metadata: the values it takes (None: any of its type),
    the key and values under which it acts (None: always), and whether it is bookkeeping
    (never changes what a run computes: where it writes, how it reports)."""
    return {"allowed": allowed, "when": when, "bookkeeping": bookkeeping}


GRADCHECK_ON = when("gradcheck.enabled", True)
BOOKKEEPING_KEY = rule(bookkeeping=True)


@dataclass
class ModelConfig:
    """`model.MLP`'s keyword arguments (input and output sizes come from the data)."""

    hidden_sizes: list[int] = field(
        default_factory=lambda: list(_MLP["hidden_sizes"]), metadata=rule(Allowed(
            lambda v: all(h > 0 for h in v),
            "a list of positive integers ([] for a linear classifier)")))
    activation: str = field(default=_MLP["activation"], metadata=rule(one_of(ACTIVATIONS)))
    loss: str = field(default=_MLP["loss"], metadata=rule(one_of(losses.LOSSES)))
    # L2: data loss + reg * sum of squared weights
    reg: float = field(default=_MLP["reg"], metadata=rule(NON_NEGATIVE))
    # he, xavier, normal (std = weight_scale)
    init: str = field(default=_MLP["init"], metadata=rule(one_of(model.INITS)))
    weight_scale: float = field(default=_MLP["weight_scale"],
                                metadata=rule(POSITIVE, when("model.init", "normal")))
    leaky_slope: float = field(default=_MLP["leaky_slope"], metadata=rule(
        Allowed(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        when("model.activation", "leaky_relu")))
    elu_alpha: float = field(default=_MLP["elu_alpha"],
                             metadata=rule(POSITIVE, when("model.activation", "elu")))
    maxout_pieces: int = field(default=_MLP["maxout_pieces"], metadata=rule(
        Allowed(lambda v: v >= 2, "an integer >= 2"), when("model.activation", "maxout")))
    # drop probability after each hidden activation
    dropout: float = field(default=_MLP["dropout"], metadata=rule(
        Allowed(lambda v: 0 <= v < 1, "a drop probability in [0, 1)")))
    norm: str | None = field(default=_MLP["norm"], metadata=rule(one_of(NORMS)))
    # softmax targets (1 - s) onehot + s / C
    label_smoothing: float = field(default=_MLP["label_smoothing"], metadata=rule(
        Allowed(lambda v: 0 <= v < 1, "a number in [0, 1) (0: one-hot targets)"),
        when("model.loss", "softmax")))


@dataclass
class ScheduleConfig:
    """`optim.Schedule`: the learning rate over the run (the schedule checks its own
    values when `validate` builds it)."""

    name: str = field(default="constant", metadata=rule(one_of(optim.SCHEDULES)))
    warmup_epochs: float = _SCHEDULE["warmup_epochs"]  # onecycle: the rise to optim.lr
    step_size: int = field(default=_SCHEDULE["step_size"],
                           metadata=rule(when=when("optim.schedule.name", "step")))
    gamma: float = field(default=_SCHEDULE["gamma"],
                         metadata=rule(when=when("optim.schedule.name", "step")))
    # exponential: lr * decay**epoch (cs231n)
    decay: float = field(default=_SCHEDULE["decay"],
                         metadata=rule(when=when("optim.schedule.name", "exponential")))
    # cosine, onecycle: the lr at the end
    min_lr: float = field(default=_SCHEDULE["min_lr"], metadata=rule(
        when=when("optim.schedule.name", "cosine", "onecycle")))
    # onecycle starts at optim.lr / div_factor
    div_factor: float = field(default=_SCHEDULE["div_factor"],
                              metadata=rule(when=when("optim.schedule.name", "onecycle")))


@dataclass
class OptimConfig:
    """`optim.make_optimizer` and its schedule (the optimizer checks its own values when
    `validate` builds it)."""

    name: str = field(default="momentum", metadata=rule(one_of(optim.OPTIMIZERS)))
    lr: float = field(default=1e-2, metadata=rule(POSITIVE))
    momentum: float = field(default=_OPTIM["momentum"],
                            metadata=rule(when=when("optim.name", "momentum", "nesterov")))
    decay_rate: float = field(default=_OPTIM["decay_rate"],
                              metadata=rule(when=when("optim.name", "rmsprop")))
    beta1: float = field(default=_OPTIM["beta1"], metadata=rule(when=when("optim.name", "adam")))
    beta2: float = field(default=_OPTIM["beta2"], metadata=rule(when=when("optim.name", "adam")))
    eps: float = field(default=_OPTIM["eps"],
                       metadata=rule(when=when("optim.name", "rmsprop", "adam")))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class AugmentConfig:
    # random crop with this zero padding (0: off)
    pad: int = field(default=0, metadata=rule(Allowed(lambda v: 0 <= v <= 16,
                                                      "an integer in [0, 16]")))
    flip: bool = False                        # random horizontal flip
    # evaluate (and serve) on each image and its mirror image, averaging their scores
    test_flip: bool = False
    # test (and serve) on the image moved this many pixels up, down, left, right too (0: off)
    test_shift: int = field(default=0, metadata=rule(Allowed(lambda v: 0 <= v <= 16,
                                                             "an integer in [0, 16]")))


@dataclass
class WhitenConfig:
    """`data.Normalizer`'s whitening, fitted on the training split after `normalize`."""

    # none, pca (k features), zca (3072, least moved)
    name: str = field(default=_NORMALIZER["whiten"],
                      metadata=rule(one_of(datalib.Normalizer.WHITENINGS)))
    # leading components kept (null: all)
    components: int | None = field(default=_NORMALIZER["components"], metadata=rule(
        Allowed(lambda v: v is None or 1 <= v <= datalib.DIM,
                f"null (all {datalib.DIM}) or an integer in [1, {datalib.DIM}]"),
        when("data.whiten.name", "pca", "zca")))
    # added to the covariance's eigenvalues
    eps: float = field(default=_NORMALIZER["eps"],
                       metadata=rule(POSITIVE, when("data.whiten.name", "pca", "zca")))


@dataclass
class SyntheticConfig:
    n_train: int = field(default=600, metadata=rule(Allowed(lambda v: v > 1, "an integer > 1")))
    n_test: int = field(default=200, metadata=rule(POSITIVE_INT))


@dataclass
class DataConfig:
    """Which images, where from, and how they are split and preprocessed."""

    name: str = field(default="cifar10", metadata=rule(one_of(DATASETS)))
    # null: $MLP_LAB_DATA or ~/.cache/mlp-lab
    root: str | None = field(default=None, metadata=BOOKKEEPING_KEY)
    # null: $MLP_LAB_ARCHIVE, a cached copy, or download
    archive: str | None = field(default=None, metadata=rule(
        _existing_file("file"), bookkeeping=True))
    # the local archive's md5, to verify it
    md5: str | None = field(default=None, metadata=rule(Allowed(
        lambda v: v is None or (len(v) == 32 and all(c in "0123456789abcdef" for c in v.lower())),
        "null or 32 hexadecimal digits"), bookkeeping=True))
    val_size: int = field(default=5000, metadata=rule(POSITIVE_INT))
    # only the first N training images
    limit: int | None = field(default=None, metadata=rule(
        Allowed(lambda v: v is None or v > 1, "null or an integer > 1")))
    # channel, mean_image (cs231n), none
    normalize: str = field(default=_NORMALIZER["mode"],
                           metadata=rule(one_of(datalib.Normalizer.MODES)))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig,
                                       metadata=rule(when=when("data.name", "synthetic")))


@dataclass
class TrainerConfig:
    """`train.TrainSettings`: the loop."""

    epochs: int = field(default=_TRAIN.epochs, metadata=rule(POSITIVE_INT))
    batch_size: int = field(default=_TRAIN.batch_size, metadata=rule(POSITIVE_INT))
    dtype: str = field(default=_TRAIN.dtype, metadata=rule(one_of(TRAIN_DTYPES)))
    # train metrics on this fixed subset (null: as many images as data.val_size)
    train_eval_size: int | None = field(default=_TRAIN.train_eval_size, metadata=rule(Allowed(
        lambda v: v is None or v > 0, "null (as many as data.val_size) or an integer > 0")))
    eval_batch_size: int = field(default=_TRAIN.eval_batch_size, metadata=rule(POSITIVE_INT))
    # early stop after N epochs without better
    patience: int | None = field(default=_TRAIN.patience, metadata=rule(Allowed(
        lambda v: v is None or v > 0, "null (no early stopping) or an integer > 0")))
    # stop when a batch loss exceeds this x first
    diverge_factor: float = field(default=_TRAIN.diverge_factor,
                                  metadata=rule(Allowed(lambda v: v > 1, "a number > 1")))
    # null: <hydra output dir>/checkpoints
    checkpoint_dir: str | None = field(default=None, metadata=BOOKKEEPING_KEY)
    # a checkpoint .npz to continue from
    resume: str | None = field(default=None, metadata=rule(
        _existing_file("checkpoint file"), bookkeeping=True))
    # tqdm bars (on a terminal only)
    progress: bool = field(default=_TRAIN.progress, metadata=BOOKKEEPING_KEY)
    # next batch on a helper thread
    prefetch: bool = field(default=_TRAIN.prefetch, metadata=BOOKKEEPING_KEY)
    # decay of the weights' average (0: off)
    ema: float = field(default=_TRAIN.ema, metadata=rule(
        Allowed(lambda v: 0 <= v < 1, "a decay in [0, 1) (0: no average)")))
    # average every N steps (decay**N)
    ema_every: int = field(default=_TRAIN.ema_every, metadata=rule(
        POSITIVE_INT, ("trainer.ema", Allowed(lambda v: v > 0, "a decay > 0"))))


@dataclass
class GradcheckConfig:
    """The gradient check of the run's own architecture, before training."""

    enabled: bool = True
    # inputs in the check's batch
    samples: int = field(default=8, metadata=rule(POSITIVE_INT, GRADCHECK_ON))
    # hidden widths are capped to this
    max_width: int = field(default=16, metadata=rule(POSITIVE_INT, GRADCHECK_ON))
    # coordinates sampled per parameter
    num_checks: int = field(default=30, metadata=rule(POSITIVE_INT, GRADCHECK_ON))
    tol: float = field(default=_CHECK["tol"], metadata=rule(
        Allowed(lambda v: 0 < v < 1, "a number in (0, 1)"), GRADCHECK_ON))
    stop_on_fail: bool = field(default=False, metadata=rule(when=GRADCHECK_ON))


@dataclass
class TrackingConfig:
    """Where and what MLflow records (bookkeeping as a whole)."""

    uri: str | None = None                    # null: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = field(default="mlp-lab", metadata=rule(
        Allowed(lambda v: bool(v.strip()), "a non-empty name")))
    run_name: str | None = None               # null: what differs, e.g. relu-h100-lr1e-2
    # loss/batch every N steps
    log_every_steps: int = field(default=10, metadata=rule(POSITIVE_INT))
    health: bool = True                       # per-layer norms, update ratios, dead units
    plots: bool = True
    log_model: bool = True
    system_metrics: bool = True               # CPU and memory while the run trains


@dataclass
class ClusterConfig:
    """How a sweep on SLURM (hydra/launcher=submitit_slurm) watches its jobs: a line about
    them at least every `status_every_s` seconds while they change, and all of them
    cancelled when they have all been pending for `max_pending_s` (bookkeeping as a whole;
    what each job asks for is `hydra.launcher.*`, checked against the partition)."""

    status_every_s: float = field(default=30.0, metadata=rule(POSITIVE))
    max_pending_s: float = field(default=600.0, metadata=rule(POSITIVE))


@dataclass
class Config:
    # init, shuffling, augmentation, check sampling
    seed: int = field(default=0, metadata=rule(Allowed(lambda v: v >= 0, "an integer >= 0")))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    gradcheck: GradcheckConfig = field(default_factory=GradcheckConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=BOOKKEEPING_KEY)
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata=BOOKKEEPING_KEY)


@dataclass
class TrialConfig:
    """Set per job by the Optuna sweeper (hydra/sweeper=mlp_optuna) as `+trial.*`, never by
    hand: which trial of which study the job is, so that it can report for pruning."""

    storage: str | None = None
    study: str | None = None
    id: int | None = None  # Optuna's trial id in the storage (not the per-study number)


# Nodes that are not part of the user's schema but may be added with `+node.key=...` by the
# tools that own them; bookkeeping as a whole.
EXTENSIONS: dict[str, type] = {"trial": TrialConfig}


def _settings(node: type, prefix: str = "") -> Iterator[tuple[str, Field]]:
    """(dotted key, its field) for every key and node of a schema dataclass, depth first."""
    for f in fields(node):
        yield prefix + f.name, f
        if isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            yield from _settings(f.default_factory, f"{prefix}{f.name}.")


# Read from the fields above: what each key allows, when it acts, whether it is bookkeeping.
RULES: dict[str, Allowed] = {k: f.metadata.get("allowed") for k, f in _settings(Config)
                             if f.metadata.get("allowed") is not None}
APPLIES_WHEN: dict[str, tuple[str, Allowed]] = {k: f.metadata.get("when")
                                                for k, f in _settings(Config)
                                                if f.metadata.get("when") is not None}
BOOKKEEPING: tuple[str, ...] = (*(k for k, f in _settings(Config) if f.metadata.get("bookkeeping")),
                                *EXTENSIONS)

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
    depends_on, acts_when = APPLIES_WHEN[rule]
    return acts_when(flat.get(depends_on)) and applies(depends_on, flat)


def schema_keys() -> dict[str, Any]:
    """Every dotted leaf key of the schema with its default."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


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
    for key, allowed in RULES.items():
        if not allowed(flat[key]):
            raise ConfigError(key, flat[key], allowed.text)
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
            depends_on, acts_when = APPLIES_WHEN[rule]
            out.append(f"{key}={flat.get(key)!r} has no effect: it applies when {depends_on} "
                       f"is {acts_when.text} (this run: {flat.get(depends_on)!r})")
    return out
