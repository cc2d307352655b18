"""A team's MLflow tracking server for real: `mlflow server` on PostgreSQL with served
artifacts (engines/mlflow-server-up.sh), written to by a sweep of 4 parallel joblib workers,
and the same server with MLflow's basic-auth app. Marked `server` (not in the default run):
`pytest -m server`; needs `pip install -e '.[server]'` and PostgreSQL (installed by the
fixture as root)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tool
from engine_fixtures import MlflowServer
from helpers import FAST, GRID
from mlflow import MlflowClient

from mlp.tracking import recorder as tracking
from mlp.tracking import store

pytestmark = pytest.mark.server

# FAST with what a real run records besides metrics: plots and the model (artifacts), the
# batch loss at every step, 5 epochs.
RECORDED = [*(o for o in FAST if not o.startswith(("tracking.plots=", "tracking.log_model=",
                                                   "trainer.epochs="))),
            "trainer.epochs=5", "tracking.log_every_steps=1"]


@pytest.fixture(autouse=True)
def _quiet_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Recorded:
    """What a store holds of one run: status, params, points per metric key, artifacts."""
    status: str
    params: dict[str, str]
    points: dict[str, int]
    artifacts: dict[str, int] = field(default_factory=dict)  # path -> size in bytes
    error: str = ""  # a failed run's error.type and error.message tags


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int]:
    found: dict[str, int] = {}
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            found |= _artifacts(client, run_id, entry.path)
        else:
            found[entry.path] = entry.file_size
    return found


def read_back(uri: str, experiment: str = "mlp-lab") -> dict[str, Recorded]:
    """Every run of `experiment` at `uri`, by run name ('parent' for the sweep's parent),
    with every metric's full history and the list of its artifacts."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    store = {}
    for run in runs:
        name = "parent" if run.data.tags.get("mlp.sweep") == "true" else run.info.run_name
        assert name not in store, f"two runs named {name}"
        store[name] = Recorded(
            run.info.status, dict(run.data.params),
            # system/* points are sampled every 10 s: their count follows the run's wall
            # time, not what it trained, so a slower (loaded) run has more of them.
            {key: len(client.get_metric_history(run.info.run_id, key))
             for key in run.data.metrics if not key.startswith("system/")},
            _artifacts(client, run.info.run_id),
            " ".join(run.data.tags.get(k, "") for k in ("error.type", "error.message")).strip())
    return store


def totals(store: dict[str, Recorded]) -> tuple[int, int, int]:
    """(runs, metric points, artifacts) of a store."""
    return (len(store), sum(sum(r.points.values()) for r in store.values()),
            sum(len(r.artifacts) for r in store.values()))


def mlp_train(args: list[str], cwd: Path, env: dict, timeout: float = 600
              ) -> subprocess.CompletedProcess:
    return subprocess.run([tool("mlp-train"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_sweep_of_4_parallel_workers_loses_nothing_on_the_server(
        mlflow_server: MlflowServer, tmp_path: Path, run_env: dict):
    # What the jobs send: the same sweep (same configs and seeds, so the same points and
    # files) recorded in a local SQLite store, one job after the other (SQLite under parallel
    # writers on a loaded machine is not the reference we want).
    (tmp_path / "local").mkdir()
    local = mlp_train(["-m", *RECORDED, *GRID], tmp_path / "local", run_env)
    assert local.returncode == 0, local.stderr[-3000:]
    sent = read_back(f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}")
    assert {r.status for r in sent.values()} == {"FINISHED"}, sent

    # The team's way: the server named by MLFLOW_TRACKING_URI (config and params unchanged).
    (tmp_path / "server").mkdir()
    done = mlp_train(["-m", *RECORDED, *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
                     tmp_path / "server", dict(run_env, MLFLOW_TRACKING_URI=mlflow_server.url))
    assert done.returncode == 0, done.stderr[-3000:]
    received = read_back(mlflow_server.url)

    print(f"\nsent (runs, metric points, artifacts): {totals(sent)}; "
          f"read back from the server: {totals(received)}")
    assert sorted(received) == sorted(sent) and len(sent) == 5
    assert {r.status for r in received.values()} == {"FINISHED"}, (
        {name: (r.status, r.error) for name, r in received.items()}, done.stderr[-3000:])
    for name, run in received.items():
        assert run.params == sent[name].params, name
        assert run.points == sent[name].points, name
        assert sorted(run.artifacts) == sorted(sent[name].artifacts), name
    assert totals(received) == totals(sent)
    assert all(received[name].artifacts for name in received)

    # Every artifact comes back whole, through the server (the client never sees its disk).
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("mlp-lab")
    for run in client.search_runs([exp.experiment_id]):
        name = "parent" if run.data.tags.get("mlp.sweep") == "true" else run.info.run_name
        where = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / name)))
        got = {str(p.relative_to(where)): p.stat().st_size for p in where.rglob("*")
               if p.is_file()}
        assert got == received[name].artifacts, name
    served = mlflow_server.dir / "artifacts"
    assert served.is_dir() and any(served.rglob("*.png")), "artifacts not in the server's store"

    # The registry (a sweep's best model with an alias, when the sweep registers one).
    def registry(uri: str) -> dict[str, dict[str, str]]:
        # A sweep without a preset is named by its keys and its start time: compare the
        # names without the time (the two sweeps started at different times).
        models = MlflowClient(uri).search_registered_models()
        return {re.sub(r"-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$", "", m.name):
                {alias: str(version) for alias, version in m.aliases.items()} for m in models}

    assert registry(mlflow_server.url) == registry(f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}")


def _log_together(recorders: list[tracking.RunRecorder], datasets: dict) -> list[Exception]:
    """Each recorder logs `datasets` in its own thread, all released at once; the errors."""
    together = threading.Barrier(len(recorders))
    errors: list[Exception] = []

    def log(recorder: tracking.RunRecorder) -> None:
        together.wait()
        try:
            recorder.log_datasets(datasets)
        except Exception as e:  # collected, asserted by the caller
            errors.append(e)

    threads = [threading.Thread(target=log, args=(r,)) for r in recorders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_parallel_jobs_logging_the_same_splits_all_record_them(
        mlflow_server: MlflowServer):
    # The store checks whether a dataset exists, then inserts it: 8 jobs logging the same
    # splits at the same moment collide on its key (most rounds, unguarded). Every run must
    # still end up with its three inputs.
    client, experiment_id = store.connect(mlflow_server.url, "same-splits")  # as mlp-train
    for round_ in range(4):
        splits = SimpleNamespace(
            fingerprint={"archive_sha256": f"{round_:012d}"}, X_train=np.zeros((4, 3)),
            y_train=np.zeros(4), X_val=np.zeros((2, 3)), y_val=np.zeros(2),
            X_test=np.zeros((2, 3)), y_test=np.zeros(2))
        datasets = tracking.split_datasets(splits, "synthetic", "/data/archive.tar.gz")
        recorders = [tracking.RunRecorder(client, client.create_run(experiment_id).info.run_id)
                     for _ in range(8)]
        errors = _log_together(recorders, datasets)
        assert errors == [], f"round {round_}: {errors[:1]}"
        for recorder in recorders:
            inputs = client.get_run(recorder.run_id).inputs.dataset_inputs
            assert sorted(i.dataset.name for i in inputs) == [
                "synthetic-test", "synthetic-train", "synthetic-validation"]


@pytest.fixture(scope="module")
def trainer_login(mlflow_auth_server: MlflowServer) -> tuple[str, str]:
    """A user of the basic-auth server, created by its admin."""
    login = ("trainer", "Tr41ner-pass-5e8c")
    status, _ = mlflow_auth_server.call("POST", "users/create",
                                        {"username": login[0], "password": login[1]},
                                        auth=("admin", mlflow_auth_server.admin_password))
    assert status == 200
    return login


def test_the_basic_auth_server_takes_runs_from_users_only(
        mlflow_auth_server: MlflowServer, trainer_login: tuple[str, str], tmp_path: Path,
        run_env: dict):
    server = mlflow_auth_server
    assert server.call("POST", "experiments/search", {"max_results": 1})[0] == 401

    env = dict(run_env, MLFLOW_TRACKING_USERNAME=trainer_login[0],
               MLFLOW_TRACKING_PASSWORD="wrong-password")
    refused = mlp_train([*FAST, f"tracking.uri={server.url}", "tracking.experiment=auth"],
                        tmp_path, env)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr

    env["MLFLOW_TRACKING_PASSWORD"] = trainer_login[1]
    done = mlp_train([*FAST, f"tracking.uri={server.url}", "tracking.experiment=auth"],
                     tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    status, found = server.call("GET", "experiments/get-by-name?experiment_name=auth",
                                auth=trainer_login)
    assert status == 200
    status, runs = server.call("POST", "runs/search",
                               {"experiment_ids": [found["experiment"]["experiment_id"]]},
                               auth=trainer_login)
    assert status == 200
    assert [r["info"]["status"] for r in runs["runs"]] == ["FINISHED"]
    text = json.dumps(runs) + done.stdout + done.stderr
    assert trainer_login[1] not in text and server.admin_password not in text


def _files_containing(root: Path, secret: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and secret.encode() in p.read_bytes())


def test_a_password_in_the_tracking_uri_is_recorded_nowhere(
        mlflow_auth_server: MlflowServer, trainer_login: tuple[str, str], tmp_path: Path,
        run_env: dict):
    # The login inside tracking.uri (http://user:password@host): the runs are logged with it,
    # and the password is in no param, tag, artifact, run directory file or line of output.
    server, (user, password) = mlflow_auth_server, trainer_login
    uri = server.url.replace("http://", f"http://{user}:{password}@")
    (tmp_path / "sweep").mkdir()
    done = mlp_train(["-m", *RECORDED, "optim.lr=0.01,0.03", f"tracking.uri={uri}",
                      "tracking.experiment=masked"], tmp_path / "sweep", run_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert password not in done.stdout + done.stderr
    assert _files_containing(tmp_path / "sweep", password) == []

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("masked")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        recorded = json.dumps([run.data.params, run.data.tags, list(run.data.metrics),
                               run.info.run_name])
        assert password not in recorded, run.info.run_name
        where = tmp_path / "artifacts" / run.info.run_id
        client.download_artifacts(run.info.run_id, "", str(where))
        assert _files_containing(where, password) == [], run.info.run_name
    assert _files_containing(server.dir / "artifacts", password) == []
