"""The Optuna sweeper (hydra/sweeper=mlp_optuna) and pruning: the search-space parser, the
TrialReporter, how job outcomes are told, and real `mlp-train -m` sweeps on synthetic data
(in memory, SQLite, two workers sharing one study), read back from Optuna and MLflow; marked
`server`, the same on a real PostgreSQL: two workers, and a study resumed after an interrupt."""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from conftest import tool  # noqa: E402
from engine_fixtures import Postgres  # noqa: E402
from helpers import FAST, overriding  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.utils import JobReturn, JobStatus  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState  # noqa: E402

from hydra_plugins.mlp_optuna_sweeper import mlp_optuna_sweeper as sweeperlib  # noqa: E402
from hydra_plugins.mlp_optuna_sweeper._search_space import (  # noqa: E402
    SearchSpaceError,
    parse_search_space,
    trial_overrides,
)
from mlp.sweeps import pruning  # noqa: E402

QUICK = overriding(FAST, "trainer.epochs=3")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow store with the experiment, made once: each sweep starts from a copy
    (creating a store costs seconds, and parallel workers must not race to create it)."""
    from mlp.tracking import store

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    store.connect(f"sqlite:///{db}", "mlp-lab")
    return db


def sweep(args: list[str], cwd: Path, env: dict, store: Path,
          base: list[str] = QUICK) -> subprocess.Popen:
    """`mlp-train -m hydra/sweeper=mlp_optuna <base> <args>` started in cwd, logging to a
    copy of `store` in cwd."""
    if not (cwd / "mlflow.db").exists():
        shutil.copy(store, cwd / "mlflow.db")
    return subprocess.Popen([tool("mlp-train"), "-m", "hydra/sweeper=mlp_optuna", *base, *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def trial_runs(cwd: Path) -> tuple[list, list]:
    """(parent runs, trial runs) of the experiment mlp-lab in cwd/mlflow.db."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mlp-lab").experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlp.sweep") == "true"]
    return parents, [r for r in runs if r not in parents]


def results_of(cwd: Path) -> list[dict]:
    return [OmegaConf.to_container(OmegaConf.load(p))
            for p in sorted(cwd.glob("multirun/*/*/optimization_results.yaml"))]


# -- the search space ----------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "expected"), [
    ("optim.lr=interval(1e-4, 1e-1)", FloatDistribution(1e-4, 0.1)),
    ("optim.lr=interval(1e-4, 1e-1) log", FloatDistribution(1e-4, 0.1, log=True)),
    ("optim.lr=tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 0.1, log=True)),
    ("model.reg=interval(0, 1) step=0.25", FloatDistribution(0.0, 1.0, step=0.25)),
    ("trainer.batch_size=int(interval(64, 512))", IntDistribution(64, 512)),
    ("trainer.batch_size=int(interval(64, 512)) step=64", IntDistribution(64, 512, step=64)),
    ("trainer.batch_size=int(interval(16, 1024)) log", IntDistribution(16, 1024, log=True)),
    ("trainer.batch_size=range(64, 513, 64)", IntDistribution(64, 512, step=64)),
    ("optim.momentum=range(0.5, 1.0, 0.1)", FloatDistribution(0.5, 0.9, step=0.1)),
    ("model.hidden_sizes=choice([100], [256], [512,256])",
     CategoricalDistribution(["[100]", "[256]", "[512,256]"])),
    ("model.activation=choice(relu, tanh, elu)", CategoricalDistribution(["relu", "tanh", "elu"])),
    ("model.activation=relu,tanh", CategoricalDistribution(["relu", "tanh"])),
    ("optim.lr=choice(1e-6, 0.02)", CategoricalDistribution([1e-6, 0.02])),
    ("optim=choice(sgd, adam)", CategoricalDistribution(["sgd", "adam"])),
])
def test_a_sweep_entry_becomes_an_optuna_distribution(entry: str, expected):
    space = parse_search_space([entry])
    assert space.distributions == {entry.split("=")[0]: expected}
    assert space.fixed == {}


def test_fixed_overrides_pass_through_and_the_command_line_wins():
    space = parse_search_space(["optim.lr=interval(1e-4, 1e-1) log", "model.reg=interval(0, 1)",
                                "trainer.epochs=3", "data=synthetic", "optim.lr=0.05",
                                "+extra=1", "model.hidden_sizes=choice([16], [8,8])"])
    assert list(space.distributions) == ["model.reg", "model.hidden_sizes"]
    assert list(space.fixed.values()) == ["trainer.epochs=3", "data=synthetic", "optim.lr=0.05",
                                          "+extra=1"]
    overrides = trial_overrides(space, {"model.reg": 1e-05, "model.hidden_sizes": "[8,8]"})
    assert overrides[-2:] == ["model.reg=1e-05", "model.hidden_sizes=[8,8]"]
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert {o.key_or_group: o.value() for o in parsed}["model.hidden_sizes"] == [8, 8]


@pytest.mark.parametrize("entry", [
    "model.activation=choice(relu, tanh) log",     # log of a choice
    "optim.lr=interval(0.1, 0.01)",                 # empty interval
    "optim.lr=tag(log, interval(0, 1))",            # log from 0
    "trainer.batch_size=range(64, 64)",             # empty range
    "trainer.batch_size=int(interval(1, 9)) step=0.5",
    "optim.lr=interval(1e-4, 1e-1) log step=1e-4",  # Optuna: no step on a log scale
    "model.activation=glob(*)",
])
def test_an_unusable_entry_is_named(entry: str):
    with pytest.raises(SearchSpaceError, match=r"search space entry '.*'"):
        parse_search_space([entry])


# -- pruning from inside the job -----------------------------------------------------------

def _study_with_a_good_trial(storage: str | None) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=pruning.make_storage(storage),
                                direction="maximize",
                                pruner=pruning.make_pruner("median", 1, 0))
    study.set_user_attr(pruning.PRUNER_ATTR, {"name": "median", "n_startup_trials": 1,
                                              "n_warmup_steps": 0})
    good = study.ask()
    for epoch in (1, 2, 3):
        good.report(0.9, epoch)
    study.tell(good, 0.9)
    return study


@pytest.mark.parametrize("where", ["memory", "sqlite"])
def test_trial_reporter_reports_val_acc_and_prunes_a_bad_trial(where: str, tmp_path: Path):
    storage = None if where == "memory" else f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study_with_a_good_trial(storage)
    if storage is None:
        pruning.register_study(study)
    ok, bad = study.ask(), study.ask()

    reporter = pruning.TrialReporter(storage, "s", ok._trial_id)
    reporter.on_step(1, 2.3, 0.01)
    for epoch in (1, 2, 3):
        reporter.on_epoch(epoch, {"val_acc": 0.95, "val_loss": 0.2})
    reporter = pruning.TrialReporter(storage, "s", bad._trial_id)
    with pytest.raises(optuna.TrialPruned, match=re.escape("after epoch 1: val_acc 0.1000")):
        reporter.on_epoch(1, {"val_acc": 0.1})
    trials = study.get_trials()
    assert trials[1].intermediate_values == {1: 0.95, 2: 0.95, 3: 0.95}
    assert trials[2].intermediate_values == {1: 0.1}


def test_an_in_memory_study_of_another_process_is_a_clear_error():
    with pytest.raises(RuntimeError, match="storage"):
        pruning.TrialReporter(None, "no-such-study", 0)


def test_job_outcomes_are_told_complete_pruned_or_failed():
    study = optuna.create_study(direction="maximize")
    outcomes = [JobReturn(status=JobStatus.COMPLETED, _return_value=0.75),
                JobReturn(status=JobStatus.FAILED, _return_value=optuna.TrialPruned("bad")),
                JobReturn(status=JobStatus.COMPLETED, _return_value=math.nan),
                JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom")),
                JobReturn(status=JobStatus.COMPLETED, _return_value="not a number")]
    for outcome in outcomes:
        sweeperlib._tell(study, study.ask(), outcome)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.FAIL, TrialState.FAIL, TrialState.FAIL]
    assert study.best_value == 0.75


def test_bad_sweeper_settings_are_named():
    good = {"direction": "maximize", "study_name": None, "storage": None, "n_trials": 4,
            "n_jobs": 1, "sampler": OmegaConf.create({"name": "tpe", "seed": None,
                                                      "n_startup_trials": 5}),
            "pruner": OmegaConf.create({"name": "median"}), "params": None}
    sweeperlib.MlpOptunaSweeper(**good)
    for key, value, message in [("direction", "up", "hydra.sweeper.direction='up'"),
                                ("n_trials", 0, "hydra.sweeper.n_trials=0"),
                                ("n_jobs", 0, "hydra.sweeper.n_jobs=0"),
                                ("sampler", OmegaConf.create({"name": "grid"}),
                                 "hydra.sweeper.sampler.name='grid'"),
                                ("study_name", "it's", "hydra.sweeper.study_name")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sweeperlib.MlpOptunaSweeper(**(good | {key: value}))
    with pytest.raises(ValueError, match=re.escape("hydra.sweeper.pruner.name='mean'")):
        pruning.make_pruner("mean")


def test_a_stored_study_is_joined_unless_its_search_space_changed(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweeper = sweeperlib.MlpOptunaSweeper(
        direction="maximize", study_name="s", storage=storage, n_trials=2, n_jobs=1,
        sampler=OmegaConf.create({"name": "random", "seed": 0, "n_startup_trials": 0}),
        pruner=OmegaConf.create({"name": "median", "n_startup_trials": 1,
                                 "n_warmup_steps": 0}), params=None)
    space = parse_search_space(["model.activation=choice(relu, tanh)", "trainer.epochs=3"])
    study = sweeper._open_study("s", space)
    [trial] = sweeper._ask(study, space)
    assert set(trial.params) == {"model.activation"}
    assert study.user_attrs[pruning.PRUNER_ATTR]["n_startup_trials"] == 1

    again = sweeper._open_study("s", parse_search_space(["model.activation=relu,tanh"]))
    assert len(again.trials) == 1
    with pytest.raises(ValueError, match=r"name another hydra\.sweeper\.study_name"):
        sweeper._open_study("s", parse_search_space(["model.activation=choice(relu, elu)"]))
    sweeper.direction = "minimize"
    with pytest.raises(ValueError, match="is to maximize, not to minimize"):
        sweeper._open_study("s", space)


def test_storage_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert sweeperlib.absolute_storage_url("sqlite:///o.db") == f"sqlite:///{tmp_path}/o.db"
    assert sweeperlib.absolute_storage_url("sqlite:////abs/o.db") == "sqlite:////abs/o.db"
    url = "postgresql://me:secret@db.example/optuna"
    assert sweeperlib.absolute_storage_url(url) == url
    assert "secret" not in sweeperlib.redact(url)
    assert sweeperlib.redact(None) == "in memory"


def test_mlp_and_the_plugin_scan_do_not_import_optuna():
    code = ("import sys; from hydra.core.plugins import Plugins; import mlp.sweeps.pruning; "
            "from hydra.plugins.sweeper import Sweeper; "
            "names = [c.__name__ for c in Plugins.instance().discover(Sweeper)]; "
            "assert 'MlpOptunaSweeper' in names, names; "
            "assert 'optuna' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- end to end ----------------------------------------------------------------------------

PRESET = """\
# @package _global_
defaults:
  - override /hydra/sweeper: mlp_optuna
hydra:
  sweeper:
    n_trials: 4
    sampler: {seed: 0}
    params:
      optim.lr: interval(1e-3, 1e-1) log
      model.hidden_sizes: choice([16], [8,8])
      trainer.eval_batch_size: int(interval(40, 60)) step=10
"""


@pytest.mark.e2e
def test_an_in_memory_sweep_from_a_preset(tmp_path: Path, run_env: dict, empty_store: Path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "optuna_quick.yaml").write_text(PRESET)
    # each trial logs its model: trials are named by float values with dots
    # (`lr=0.0119698`), which MLflow refuses in a model's name
    base = overriding(QUICK, "tracking.log_model=true")
    base = [o for o in base if not o.startswith("model.hidden_sizes=")]
    out = finish(sweep([f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                        "experiment=optuna_quick"], tmp_path, run_env, empty_store, base))

    [results] = results_of(tmp_path)
    assert results["study_name"] == "mlp-lab-optuna_quick"
    assert results["storage"] == "in memory"
    assert results["n_trials"] == 4 and results["n_failed"] == 0
    assert results["n_complete"] + results["n_pruned"] == 4
    best = results["best_params"]
    assert best["trainer.eval_batch_size"] in (40, 50, 60)
    assert best["model.hidden_sizes"] in ("[16]", "[8,8]")
    assert 1e-3 <= best["optim.lr"] <= 0.1
    assert f"optim.lr={best['optim.lr']}" in results["best_overrides"]
    assert "best trial #" in out

    sweep_dir = next(tmp_path.glob("multirun/*/*"))
    for number in range(4):
        overrides = OmegaConf.load(sweep_dir / str(number) / ".hydra" / "overrides.yaml")
        assert "+trial.storage=null" in overrides
        assert "+trial.study='mlp-lab-optuna_quick'" in overrides
        assert f"+trial.id={number}" in overrides  # in memory: id = number

    [parent], trials = trial_runs(tmp_path)
    assert len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.data.params["trainer.eval_batch_size"] for r in trials} <= {"40", "50", "60"}
    # every trial has its model, and the best one is the registered @champion
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = client.search_logged_models([parent.info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in trials)
    assert any("." in r.info.run_name for r in trials)  # the names MLflow would refuse
    name = parent.data.tags["mlp.sweep.registered_model"].split("@")[0]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == parent.data.tags["mlp.sweep.best_run_id"]
    assert parent.data.tags["mlp.sweep.champion"].endswith("is @champion")


@pytest.mark.e2e
def test_a_sqlite_study_completes_prunes_and_fails_trials(tmp_path: Path, run_env: dict,
                                                          empty_store: Path):
    # Enqueued trials fix the order: good, hopeless (lr 1e-6: pruned after epoch 1 against
    # the good one), diverging (lr 50: the job fails, the sweep goes on), good.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="lr", storage=storage, direction="maximize")
    for lr, reg in [(0.02, 1e-6), (1e-6, 2e-6), (50.0, 3e-6), (0.03, 4e-6)]:
        study.enqueue_trial({"optim.lr": lr, "model.reg": reg})
    proc = sweep(["hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}",
                  "hydra.sweeper.study_name=lr", "hydra.sweeper.pruner.n_startup_trials=1",
                  "hydra.sweeper.pruner.n_warmup_steps=0",
                  "optim.lr=choice(1e-6, 0.02, 0.03, 50.0)", "model.reg=interval(1e-6, 1e-5)"],
                 tmp_path, run_env, empty_store)
    out, _ = proc.communicate(timeout=240)
    # The diverged trial fails the sweep (exit 1); the pruned one does not count.
    assert proc.returncode == 1, out[-4000:]
    assert out.strip().splitlines()[-1].startswith(
        "mlp-lab: 1 of 4 children failed: reg=3e-6 lr=50: training diverged")

    trials = optuna.load_study(study_name="lr", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.FAIL, TrialState.COMPLETE]
    assert list(trials[0].intermediate_values) == [1, 2, 3]
    assert list(trials[1].intermediate_values) == [1]
    [results] = results_of(tmp_path)
    assert (results["n_trials"], results["n_pruned"], results["n_failed"]) == (4, 1, 1)
    assert results["storage"] == storage

    [parent], runs = trial_runs(tmp_path)
    by_lr = {float(r.data.params["optim.lr"]): r for r in runs}
    assert len(by_lr) == 4
    assert by_lr[1e-6].info.status == "KILLED"
    assert by_lr[1e-6].data.tags["optuna.pruned"] == "true"
    assert by_lr[50.0].info.status == "FAILED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FAILED"
    assert parent.data.tags["mlp.sweep.outcome"] == "1 of 4 failed"


@pytest.mark.e2e
def test_two_workers_share_one_sqlite_study(tmp_path: Path, run_env: dict, empty_store: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=shared", "hydra.sweeper.pruner.name=none",
            "optim.lr=tag(log, interval(1e-3, 1e-1))",
            "model.reg=interval(1e-6, 1e-5)"]
    workers = [sweep([*args, f"hydra.sweeper.sampler.seed={seed}"], tmp_path, run_env,
                     empty_store) for seed in (1, 2)]
    outputs = [finish(w) for w in workers]

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = [line for out in outputs for line in out.splitlines() if "] trial #" in line]
    assert sorted(line.split("trial #")[1].split(":")[0] for line in ran) == ["0", "1", "2", "3"]
    # each worker's sweep folder: its jobs' folders, and the report it wrote at its end
    job_dirs = [p.name for p in tmp_path.glob("multirun/*/*/*") if p.is_dir()]
    assert sorted(d for d in job_dirs if d != "report") == ["0", "1", "2", "3"]
    assert job_dirs.count("report") == 2
    _, runs = trial_runs(tmp_path)
    assert len(runs) == 4


# -- on PostgreSQL (marked server: pytest -m server) ----------------------------------------

def _pg_sweep_args(storage: str, study: str, n_trials: int) -> list[str]:
    return [f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name={study}", "hydra.sweeper.pruner.name=none",
            "optim.lr=tag(log, interval(1e-3, 1e-1))", "model.reg=interval(1e-6, 1e-5)"]


@pytest.mark.server
def test_two_workers_share_one_postgresql_study(postgres: Postgres, tmp_path: Path,
                                                run_env: dict, empty_store: Path):
    # The storage URL carries the password: the sweepers use it, their jobs get it through
    # PGPASSWORD only (they could not report to the study otherwise), so it is in no job
    # override, multirun.yaml or output line. Hydra itself saves its command line in each
    # job's .hydra/hydra.yaml: hence the README's advice to give the password by PGPASSWORD.
    postgres.create_database("optuna_shared")
    storage = postgres.uri("optuna_shared", with_password=True)
    env = {k: v for k, v in run_env.items() if k != "PGPASSWORD"}
    workers = [sweep([*_pg_sweep_args(storage, "shared", 6),
                      f"hydra.sweeper.sampler.seed={seed}"], tmp_path, env, empty_store)
               for seed in (1, 2)]
    outputs = [finish(w, timeout=600) for w in workers]

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    ran = [line.split("trial #")[1].split(":")[0] for out in outputs
           for line in out.splitlines() if "] trial #" in line]
    assert sorted(ran, key=int) == [str(n) for n in range(6)]
    job_dirs = [p.name for p in tmp_path.glob("multirun/*/*/*")
                if p.is_dir() and p.name != "report"]  # beside the jobs: each sweep's report
    assert sorted(job_dirs, key=int) == [str(n) for n in range(6)]
    _, runs = trial_runs(tmp_path)
    assert len(runs) == 6
    assert postgres.password not in "".join(outputs)
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".db"
             and postgres.password.encode() in p.read_bytes()]
    assert sorted(str(p.relative_to(tmp_path)) for p in leaks
                  if p.parts[-2:] != (".hydra", "hydra.yaml")) == []


@pytest.mark.server
def test_an_interrupted_postgresql_study_resumes(postgres: Postgres, tmp_path: Path,
                                                 run_env: dict, empty_store: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    storage = postgres.create_database("optuna_resume")  # no password: PGPASSWORD has it
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    env = dict(run_env, PGPASSWORD=postgres.password)
    slow = overriding(QUICK, "data.synthetic.n_train=3000", "data.val_size=300",
                      "model.hidden_sizes=[64]", "trainer.epochs=25")
    args = [*_pg_sweep_args(storage, "resume", 3), "hydra.sweeper.sampler.seed=0"]
    first = sweep(args, tmp_path, env, empty_store, base=slow)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("multirun/*/*/1/checkpoints/last.npz")):
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "trial #1 wrote no checkpoint in 300 s"
            time.sleep(0.1)
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode != 0, out[-3000:]
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.WAITING]
    interrupted = trials[1]
    assert interrupted.user_attrs[sweeperlib.INTERRUPTED_ATTR] is True
    assert trials[2].system_attrs["fixed_params"] == interrupted.params  # queued
    _, runs = trial_runs(tmp_path)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    [killed] = [r for r in runs if r.info.status == "KILLED"]

    again = finish(sweep(args, tmp_path, env, empty_store, base=slow), timeout=600)
    assert "resuming killed run" in again
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].params == interrupted.params
    # The resumed sampler (seed 0 again) did not draw trial #0's parameters a second time.
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in completed}) == 3
    _, runs = trial_runs(tmp_path)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert killed.info.run_id in {r.info.run_id for r in runs}
