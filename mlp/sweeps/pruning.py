"""Optuna pruning from inside a training run: report val_acc every epoch, stop a bad trial.

The Optuna sweeper (`hydra/sweeper=mlp_optuna`, in `hydra_plugins/mlp_optuna_sweeper`) asks
Optuna for a trial, runs it as a Hydra job, and tells each job which trial it is with the
overrides `trial.storage`, `trial.study` and `trial.id` (the trial's id in the
storage). `mlp-train` then adds a `TrialReporter` to the training loop's observers: after
every epoch it reports `val_acc` to the trial and raises `optuna.TrialPruned` when the
study's pruner says the trial is worse than the others were at that epoch.

Where the study lives decides how a job finds it. With a storage URL (SQLite, PostgreSQL)
the job loads the study from there and rebuilds its pruner from the settings the sweeper
stored on the study (`PRUNER_ATTR`), so jobs can run in other processes or on other
machines. An in-memory study exists only in the sweeper's process: the sweeper registers
it here (`register_study`) and jobs run by the basic launcher, in that same process, look
it up by name.

optuna is an optional dependency (`pip install 'mlp-lab[optuna]'`): it is imported only
when a pruner, a storage or a reporter is made, never by `import mlp.sweeps.pruning`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

PRUNERS = ("median", "none")
PRUNER_ATTR = "mlp.pruner"  # study user attribute: the pruner's settings, for jobs elsewhere
SQLITE_TIMEOUT = 60.0       # seconds a worker waits for another worker's SQLite write lock

_studies: weakref.WeakValueDictionary[str, optuna.Study] = weakref.WeakValueDictionary()


def register_study(study: optuna.Study) -> None:
    """Make an in-memory study findable by name for the jobs run in this process (the
    basic launcher's), for as long as the sweeper holds it."""
    _studies[study.study_name] = study


def registered_study(name: str) -> optuna.Study | None:
    """The in-memory study registered under `name` in this process, if any."""
    return _studies.get(name)


def make_pruner(name: str = "median", n_startup_trials: int = 3,
                n_warmup_steps: int = 2) -> optuna.pruners.BasePruner:
    """`median`: prune a trial whose val_acc at an epoch is below the median of the
    completed trials at that epoch, once `n_startup_trials` trials completed and after
    `n_warmup_steps` epochs of the trial; `none`: never prune."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials,
                                           n_warmup_steps=n_warmup_steps)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"hydra.sweeper.pruner.name={name!r} is not allowed: expected one of "
                     f"{list(PRUNERS)}")


def make_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """Optuna's storage for a database URL (None: in memory). A SQLite database waits up to
    SQLITE_TIMEOUT seconds for a lock held by another worker instead of failing at once."""
    import optuna

    if url is None:
        return None
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


class TrialReporter:
    """An `Observer` (mlp/train.py) that reports each epoch's val_acc to an Optuna trial
    and raises `optuna.TrialPruned` when the study's pruner stops the trial.

    storage: the study's database URL, or None for an in-memory study registered in this
    process; study: the study's name; trial_id: the trial's id in the storage.
    """

    def __init__(self, storage: str | None, study: str, trial_id: int) -> None:
        import optuna

        if storage is None:
            found = registered_study(study)
            if found is None:
                raise RuntimeError(
                    f"no in-memory Optuna study {study!r} in this process: an in-memory "
                    "study works only with the basic launcher; give the sweeper a storage, "
                    "e.g. hydra.sweeper.storage=sqlite:///optuna.db")
        else:
            found = optuna.load_study(study_name=study, storage=make_storage(storage),
                                      sampler=optuna.samplers.RandomSampler())
            found.pruner = make_pruner(**found.user_attrs.get(PRUNER_ATTR, {"name": "none"}))
        self.trial = optuna.trial.Trial(found, trial_id)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        """Nothing: pruning looks at epochs only."""

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Report val_acc at step=epoch; raise optuna.TrialPruned if the pruner says so."""
        import optuna

        self.trial.report(float(metrics["val_acc"]), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned after epoch {epoch}: "
                                     f"val_acc {metrics['val_acc']:.4f}")
