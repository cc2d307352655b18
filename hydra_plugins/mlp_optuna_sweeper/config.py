"""The sweeper's config (`hydra/sweeper=mlp_optuna`), registered in Hydra's ConfigStore.

Hydra imports this module while scanning the `hydra_plugins` namespace, before it composes
any config, so `hydra/sweeper=mlp_optuna` resolves without a YAML file. Optuna is not
imported here: `mlp-train` without the sweeper does not need it installed. (No
`from __future__ import annotations`: the scan runs this module before it is in
sys.modules, where dataclasses would look string annotations up.)
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    name: str = "tpe"               # tpe | random
    seed: int | None = None         # give each worker of a shared study its own seed
    n_startup_trials: int = 5       # tpe: random trials before the model takes over


@dataclass
class PrunerConf:
    name: str = "median"            # median | none
    n_startup_trials: int = 3       # completed trials before any trial is pruned
    n_warmup_steps: int = 2         # epochs of a trial before it can be pruned


@dataclass
class MlpOptunaSweeperConf:
    _target_: str = "hydra_plugins.mlp_optuna_sweeper.mlp_optuna_sweeper.MlpOptunaSweeper"
    direction: str = "maximize"     # the job's return value (mlp-train: best val_acc)
    study_name: str | None = None   # default: tracking.experiment[-<experiment preset>]
    storage: str | None = None      # null: in memory; sqlite:///optuna.db, postgresql://...
    n_trials: int = 20              # trials in the study in total, over all workers
    n_jobs: int = 1                 # trials per batch handed to the launcher
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: dict[str, str] | None = None   # the search space: key -> expression


ConfigStore.instance().store(group="hydra/sweeper", name="mlp_optuna",
                             node=MlpOptunaSweeperConf, provider="mlp-lab")
