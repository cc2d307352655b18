"""Hyperparameter search with Optuna 4 behind Hydra's multirun: `hydra/sweeper=mlp_optuna`.

    mlp-train -m hydra/sweeper=mlp_optuna hydra.sweeper.n_trials=30 \\
        'optim.lr=tag(log, interval(1e-4, 1e-1))' 'model.activation=choice(relu, tanh)'

The loop, batch after batch: ask Optuna for `n_jobs` trials, turn each into the job's
overrides, hand the batch to the launcher (basic: one after the other in this process;
joblib: in parallel), then tell Optuna how every job ended:

- the job returned a number (mlp-train: the best val_acc): COMPLETE with that value;
- the job raised `optuna.TrialPruned` (its `TrialReporter`, see mlp/pruning.py, found it
  worse than the median after some epoch): PRUNED;
- the job raised anything else or returned NaN (mlp-train's failed jobs do): FAIL, and
  the sweep goes on.

It stops when the study holds `n_trials` trials in total (complete, pruned, failed or
still running), counting those of other workers: several `mlp-train -m` processes given
the same `storage` and `study_name` share one study and run distinct trials. Each job's
overrides also say which trial it is (`+trial.storage`, `+trial.study`, `+trial.id` = the
trial's id in the storage) so that it can report val_acc per epoch for pruning; its output
directory is `<sweep dir>/<trial number>`. At the end `optimization_results.yaml` in the
sweep dir holds the best value, parameters and overrides, and the trial counts.

Settings (`hydra.sweeper.*`):

    direction: maximize      # or minimize
    study_name: null         # default: tracking.experiment, plus -<preset> with experiment=...
    storage: null            # null: in memory (this process only); sqlite:///optuna.db or
                             # postgresql://host/db to share the study and keep it
    n_trials: 20             # in the study in total
    n_jobs: 1                # trials per batch (run in parallel by a parallel launcher)
    sampler: {name: tpe, seed: null, n_startup_trials: 5}          # tpe | random; a study
                             # that has trials already samples with a seed made of both
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 2}  # median | none
    params:                  # the search space, key: expression
      optim.lr: interval(1e-4, 1e-1) log
      model.hidden_sizes: choice([100], [256], [512,256])

The search space (in `params` or as command-line overrides, which win), in Hydra's
override syntax plus the shorthands `log` and `step=S` after a function call (in `params`
only: on the command line Hydra's parser takes no trailing word, so write
`'optim.lr=tag(log, interval(1e-4, 1e-1))'` there):

    interval(lo, hi)                          float in [lo, hi]
    interval(lo, hi) log                      log scale; = tag(log, interval(lo, hi))
    interval(lo, hi) step=s                   lo, lo+s, ... up to hi
    int(interval(lo, hi)) [log] [step=s]      integer in [lo, hi], both ends included
    range(start, stop[, step])                start, start+step, ... < stop (stop excluded,
                                              as in Python and Hydra's basic sweeper)
    choice(a, b, ...)  or  a,b,...            one of the values, e.g. choice([100], [512,256])
                                              or choice(relu, tanh); config groups too
                                              (model=choice(mlp, linear))
    anything else (trainer.epochs=3)          fixed: every trial gets it unchanged

Workers take turns to count the trials and ask new ones, so the study ends with exactly
`n_trials` and no trial runs twice: on SQLite (workers on one machine) through a lock file
`<database>.lock`, on PostgreSQL (workers anywhere) through an advisory lock of the
database. Other database servers get no lock: workers that ask at the same instant can
overshoot `n_trials` by a few trials. An in-memory study cannot be reached from other
processes: with a parallel launcher its jobs do not report val_acc, so nothing is pruned
(a warning says so); use a storage.

An interrupted sweep (Ctrl-C, SIGTERM; mlp-train stops the whole sweep) marks its running
trials FAIL with the user attribute `interrupted` and puts their parameters back in the
study's queue: those trials do not count towards `n_trials`, and the next `mlp-train -m`
with the same storage and study name runs them first (resuming their killed MLflow runs
from the checkpoint), then the rest. A worker killed outright (SIGKILL) leaves its trials
RUNNING: they count, as another worker may still be running them.

A password in a PostgreSQL storage URL stays in the sweeper: the jobs get the URL without
it, and the password through PGPASSWORD in their environment (which libpq reads), so that
it is in no override, `.hydra` file or log line; PGPASSWORD set by the user wins.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import optuna

    from ._search_space import SearchSpace

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")
RESULTS_FILE = "optimization_results.yaml"
INTERRUPTED_ATTR = "interrupted"  # user attribute of trials an interrupted sweep put back
LOCK_KEY = 0x6D6C705F6C6162  # the PostgreSQL advisory lock of the workers ("mlp_lab")


class MlpOptunaSweeper(Sweeper):
    """See the module docstring. Arguments: the fields of `config.MlpOptunaSweeperConf`."""

    def __init__(self, direction: str, study_name: str | None, storage: str | None,
                 n_trials: int, n_jobs: int, sampler: DictConfig, pruner: DictConfig,
                 params: DictConfig | None) -> None:
        _check(direction in DIRECTIONS, "direction", direction, f"one of {list(DIRECTIONS)}")
        _check(n_trials > 0, "n_trials", n_trials, "an integer > 0")
        _check(n_jobs > 0, "n_jobs", n_jobs, "an integer > 0")
        _check(sampler.name in SAMPLERS, "sampler.name", sampler.name,
               f"one of {list(SAMPLERS)}")
        _check_quotable("study_name", study_name)
        _check_quotable("storage", storage)
        self.direction = direction
        self.study_name = study_name
        self.storage = absolute_storage_url(storage)
        self.job_storage = job_storage_url(self.storage)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = OmegaConf.to_container(sampler)
        self.pruner = OmegaConf.to_container(pruner)
        self.params = {} if params is None else OmegaConf.to_container(params)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run trials until the study holds n_trials; return the JobReturns batch by batch."""
        assert self.config is not None and self.launcher is not None
        _import_optuna()
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        from mlp.sweeps import pruning
        from mlp.tracking.secrets import mask_uri

        from ._search_space import parse_search_space

        space = parse_search_space([*(f"{k}={v}" for k, v in self.params.items()),
                                    *arguments])
        name = self.study_name or default_study_name(self.config)
        _check_quotable("study_name", name)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # Hydra's record of the sweep, with any password in a URL (the storage's) masked.
        (sweep_dir / "multirun.yaml").write_text(mask_uri(OmegaConf.to_yaml(self.config)))

        study = self._open_study(name, space)
        in_process = isinstance(self.launcher, BasicLauncher)
        reporting = self.storage is not None or in_process
        if self.storage is None and reporting:
            pruning.register_study(study)
        if not reporting:
            log.warning("in-memory study with %s: its jobs run in other processes and cannot "
                        "report val_acc, so no trial is pruned; set hydra.sweeper.storage "
                        "(e.g. sqlite:///optuna.db) to prune", type(self.launcher).__name__)
        n_there = len(_counted(study))
        log.info("study %r (%s, %s), storage %s: %d of %d trials there already; search "
                 "space: %s", name, self.direction, self.sampler["name"], redact(self.storage),
                 n_there, self.n_trials, ", ".join(space.distributions) or "none")
        if n_there >= self.n_trials:
            log.warning("study %r is complete: raise hydra.sweeper.n_trials to continue it, or "
                        "name another hydra.sweeper.study_name", name)

        returns: list[Sequence[JobReturn]] = []
        while trials := self._ask(study, space):
            try:
                batch = [self._job_overrides(space, trial, name, reporting) for trial in trials]
                if not in_process:  # the basic launcher composes each job right away
                    self.validate_batch_is_legal(batch)
                results = self._launch(trials, batch)
            except BaseException:
                for trial in trials:
                    _put_back(study, trial)
                raise
            for trial, result in zip(trials, results, strict=True):
                _tell(study, trial, result)
            returns.append(results)
        write_results(study, sweep_dir / RESULTS_FILE, self.storage)
        return returns

    def _open_study(self, name: str, space: SearchSpace) -> optuna.Study:
        """Create the study, or join it when the storage already has it (other workers,
        an earlier sweep) and its parameters fit the search space, and store the pruner's
        settings on it for the jobs."""
        import optuna
        from optuna.distributions import check_distribution_compatibility

        from mlp.sweeps import pruning

        with _study_lock(self.storage):
            study = optuna.create_study(
                study_name=name, storage=pruning.make_storage(self.storage),
                sampler=make_sampler(**self.sampler), pruner=pruning.make_pruner(**self.pruner),
                direction=self.direction, load_if_exists=True)
            if study.direction.name.lower() != self.direction:
                raise ValueError(f"study {name!r} in {redact(self.storage)} is to "
                                 f"{study.direction.name.lower()}, not to {self.direction}")
            study.set_user_attr(pruning.PRUNER_ATTR, self.pruner)
            n_earlier = len(study.get_trials(deepcopy=False))
        if n_earlier and self.sampler["seed"] is not None:
            # A study resumed with the same seed would draw its first parameters again (the
            # configs that finished already): draw from a seed made of (seed, the trials it
            # has). Not seed + trials: worker seeds 1 and 2 starting at 1 and 0 trials would
            # both draw from seed 2, the same parameters.
            mixed = int(np.random.SeedSequence([self.sampler["seed"], n_earlier])
                        .generate_state(1)[0])
            study.sampler = make_sampler(**(self.sampler | {"seed": mixed}))
        for trial in study.get_trials(deepcopy=False):
            for key, earlier in trial.distributions.items():
                if key not in space.distributions:
                    continue
                try:
                    check_distribution_compatibility(earlier, space.distributions[key])
                except ValueError as e:
                    raise ValueError(
                        f"study {name!r} in {redact(self.storage)} searched {key} as {earlier}, "
                        f"not as {space.distributions[key]}: name another "
                        "hydra.sweeper.study_name for a new search space") from e
        return study

    def _ask(self, study: optuna.Study, space: SearchSpace) -> list[optuna.trial.Trial]:
        """Up to n_jobs new trials, as many as the study still lacks of n_trials."""
        with _study_lock(self.storage):
            n_new = min(self.n_jobs, self.n_trials - len(_counted(study)))
            return [study.ask(space.distributions) for _ in range(n_new)]

    def _job_overrides(self, space: SearchSpace, trial: optuna.trial.Trial, study_name: str,
                       reporting: bool) -> list[str]:
        """The trial's overrides (kept on the trial as user attribute `overrides`), plus,
        when the job can reach the study, which trial it is."""
        from ._search_space import trial_overrides

        overrides = trial_overrides(space, trial.params)
        trial.set_user_attr("overrides", overrides)
        if not reporting:
            return overrides
        storage = "null" if self.job_storage is None else f"'{self.job_storage}'"
        # `+`: trial is not a key of the user's schema but an extension node that this
        # sweeper adds (mlp.config.EXTENSIONS).
        return [*overrides, f"+trial.storage={storage}", f"+trial.study='{study_name}'",
                f"+trial.id={trial._trial_id}"]

    def _launch(self, trials: list[optuna.trial.Trial],
                batch: list[list[str]]) -> list[JobReturn]:
        """Launch the batch with job numbers = trial numbers (unique across the workers of
        a study, so their jobs never share an output directory); a run of consecutive
        numbers goes to the launcher at once."""
        results: list[JobReturn] = []
        start = 0
        for end in range(1, len(trials) + 1):
            if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
                results.extend(self.launcher.launch(batch[start:end],
                                                    initial_job_idx=trials[start].number))
                start = end
        return results


def make_sampler(name: str, seed: int | None, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """`tpe` (random for the first n_startup_trials, then Tree-structured Parzen
    Estimators) or `random`."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def default_study_name(config: DictConfig) -> str:
    """tracking.experiment (else the job's name), plus `-<preset>` for experiment=<preset>."""
    name = OmegaConf.select(config, "tracking.experiment") or config.hydra.job.name
    preset = OmegaConf.select(config, "hydra.runtime.choices.experiment")
    return f"{name}-{preset}" if preset else name


def absolute_storage_url(url: str | None) -> str | None:
    """The storage URL with a relative SQLite path made absolute (jobs may run elsewhere)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or os.path.isabs(db):
        return url
    return parsed.set(database=os.path.abspath(db)).render_as_string(hide_password=False)


def job_storage_url(url: str | None) -> str | None:
    """The storage URL for the jobs: a PostgreSQL URL without its password, which goes to
    PGPASSWORD in this process's environment (the jobs inherit it) unless that is set;
    any other URL unchanged."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.password is None:
        return url
    os.environ.setdefault("PGPASSWORD", parsed.password)
    # URL.set(password=None) would keep the password (None means "unchanged" there).
    return parsed._replace(password=None).render_as_string(hide_password=False)


def redact(url: str | None) -> str:
    """The storage URL without its password, for logs and files."""
    if url is None:
        return "in memory"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def write_results(study: optuna.Study, path: Path, storage: str | None) -> dict[str, Any]:
    """optimization_results.yaml: the best trial (value, params, overrides to re-run it)
    and the trial counts; the best trial is logged as well. Returns what was written."""
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    best = study.best_trial if complete else None
    results = {
        "name": "mlp_optuna", "study_name": study.study_name, "storage": redact(storage),
        "direction": study.direction.name.lower(), "n_trials": len(trials),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == states.PRUNED for t in trials),
        "n_failed": sum(t.state == states.FAIL for t in trials),
        "n_running": sum(t.state == states.RUNNING for t in trials),
        "best_trial": best and best.number, "best_value": best and best.value,
        "best_params": best and best.params,
        "best_overrides": best and best.user_attrs.get("overrides"),
    }
    OmegaConf.save(OmegaConf.create(results), path)
    if best is None:
        log.warning("no trial of study %r completed; see %s", study.study_name, path)
    else:
        log.info("best trial #%d: %.4f with %s\nre-run it: mlp-train %s",
                 best.number, best.value, best.params,
                 " ".join(f"'{o}'" for o in results["best_overrides"] or []))
    return results


def _tell(study: optuna.Study, trial: optuna.trial.Trial, result: JobReturn) -> None:
    """Tell Optuna how a job ended: COMPLETE (a finite number), PRUNED or FAIL."""
    import optuna

    states = optuna.trial.TrialState
    if result.status == JobStatus.COMPLETED:
        try:
            value = float(result.return_value)
        except (TypeError, ValueError):
            value = math.nan
        if math.isfinite(value):
            study.tell(trial, value)
            log.info("trial #%d: %.4f", trial.number, value)
            return
        reason = f"the job returned {result.return_value!r} (a failed run: see its log)"
    else:
        error = result._return_value  # return_value would raise it
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=states.PRUNED)
            log.info("trial #%d pruned: %s", trial.number, error)
            return
        reason = f"{type(error).__name__}: {error}"
    study.tell(trial, state=states.FAIL)
    log.warning("trial #%d failed (the sweep goes on): %s", trial.number, reason)


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards n_trials: complete, pruned, failed (unless an
    interrupted sweep put them back in the queue), running."""
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED,
                                                      states.FAIL, states.RUNNING))
    return [t for t in trials if not t.user_attrs.get(INTERRUPTED_ATTR)]


def _put_back(study: optuna.Study, trial: optuna.trial.Trial) -> None:
    """An interrupted trial: FAIL, marked `interrupted`, its parameters queued again for
    the next sweep of the study."""
    import optuna

    trial.set_user_attr(INTERRUPTED_ATTR, True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(trial.params)
    log.warning("trial #%d interrupted: queued again for the next sweep of study %r",
                trial.number, study.study_name)


@contextmanager
def _study_lock(storage: str | None) -> Iterator[None]:
    """Exclusive among the workers of a study, so that counting the trials and asking new
    ones is one step: a lock file next to a SQLite database, an advisory lock of a
    PostgreSQL database (released with its connection, also when a worker dies); no-op
    otherwise."""
    from sqlalchemy.engine import make_url

    url = None if storage is None else make_url(storage)
    backend = None if url is None else url.get_backend_name()
    if backend == "postgresql":
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                       {"key": LOCK_KEY})
        finally:
            engine.dispose()
        return
    if backend != "sqlite" or url.database in (None, "", ":memory:"):
        yield
        return
    import fcntl

    with open(f"{url.database}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ImportError("hydra/sweeper=mlp_optuna needs Optuna 4: "
                          "pip install 'mlp-lab[optuna]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this sweeper logs each trial
    return optuna


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"hydra.sweeper.{key}={value!r} is not allowed: expected {allowed}")


def _check_quotable(key: str, value: str | None) -> None:
    """The value goes into the jobs' overrides as a quoted string (trial.study='...')."""
    _check(value is None or not any(c in value for c in ("'", "\\", "${")), key, value,
           "a string without quotes, backslashes or ${")
