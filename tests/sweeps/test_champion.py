"""One registered model per experiment and search: each sweep adds a version, and
@champion moves to the new version only when its validation accuracy beats the
champion's."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from mlp.sweeps import report as rp
from mlp.tracking import keys


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("mlp-lab", artifact_location=str(tmp_path / "artifacts"))
    return client


def _sweep_best(client: MlflowClient, name: str, val: float,
                status: str = "READY") -> rp.Report:
    """A sweep's report whose best run (`name`, validation accuracy `val`) logged a model
    (left `status`: a failed upload leaves it FAILED)."""
    exp = client.get_experiment_by_name("mlp-lab").experiment_id
    parent = client.create_run(exp, run_name="lr_reg").info.run_id
    run = client.create_run(exp, run_name=name).info.run_id
    client.log_batch(run, metrics=[Metric(keys.ACC_BEST_VAL, val, 0, 1)])
    logged = client.create_logged_model(exp, name=name, source_run_id=run)
    client.finalize_logged_model(logged.model_id, status)  # as Model.log leaves it
    best = {"run": name, "run_id": run, "val_acc": val, "status": "FINISHED"}
    return rp.Report("t", [], [best], [], best, experiment="mlp-lab", parent_run_id=parent)


def test_each_sweep_adds_a_version_and_the_champion_moves_only_when_beaten(client):
    name = rp.registered_name("mlp-lab", "lr_reg")
    assert name == "mlp-lab-lr_reg"  # the default experiment's name is not said twice
    assert rp.registered_name("cifar", "lr_reg") == "mlp-lab-cifar-lr_reg"

    first = rp._register_best(client, _sweep_best(client, "lr_1", 0.45), name)
    assert (first.version, first.won, first.previous) == ("1", True, None)
    assert str(first) == f"{name} version 1 (val 0.4500) is @champion"

    worse = rp._register_best(client, _sweep_best(client, "lr_2", 0.40), name)
    assert (worse.version, worse.won, worse.champion) == ("2", False, "1")
    assert str(worse) == (f"{name} version 2 (val 0.4000); @champion stays with version 1 "
                          "(val 0.4500)")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    better = _sweep_best(client, "lr_3", 0.52)
    won = rp._register_best(client, better, name)
    assert (won.version, won.won, won.previous) == ("3", True, "1")
    assert str(won).endswith("is @champion, beating version 1 (val 0.4500)")
    champion = client.get_model_version_by_alias(name, "champion")
    assert (str(champion.version), champion.run_id) == ("3", better.best["run_id"])

    # the same sweep run again registers nothing new
    again = rp._register_best(client, better, name)
    assert (again.version, again.won) == ("3", True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 3


def test_a_search_name_with_characters_mlflow_refuses_still_registers(client):
    name = rp.registered_name("my.exp", "lr=0.01 reg=1e-4")
    assert name == "mlp-lab-my_exp-lr_0_01_reg_1e-4"
    assert rp._register_best(client, _sweep_best(client, "a", 0.3), name).version == "1"


def test_a_model_whose_upload_failed_is_not_registered(client):
    """The best run's only model is FAILED (its files never arrived; the run keeps it
    beside its spool for mlp-sync): nothing is registered, no version points at it."""
    name = rp.registered_name("mlp-lab", "lr_reg")
    assert rp._register_best(client, _sweep_best(client, "lr_1", 0.45, "FAILED"), name) is None
    assert client.search_model_versions(f"name = '{name}'") == []
