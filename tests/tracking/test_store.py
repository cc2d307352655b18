"""One way to the store: one URI precedence for every command, an explicit client passed
down, and MLflow's process-wide tracking URI neither read nor left set by `mlp`."""

from __future__ import annotations

import ast
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import ROOT

from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.tracking import keys, store
from mlp.tracking import recorder as tracking

URI_VAR = "MLFLOW_TRACKING_URI"
# MLflow's calls that find their store (or run, or experiment) through process globals.
GLOBAL_CALLS = {"set_tracking_uri", "get_tracking_uri", "start_run", "end_run", "active_run",
                "last_active_run", "set_experiment", "log_metric", "log_metrics", "log_param",
                "log_params", "log_input", "log_inputs", "set_tag", "set_tags", "log_artifact",
                "log_artifacts", "log_figure", "log_dict", "log_text", "log_table",
                "log_model", "register_model", "search_runs", "get_run",
                "enable_system_metrics_logging"}


def test_the_commands_option_beats_the_environment_which_beats_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    default = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert store.resolve_uri(None, tmp_path) == default
    assert store.resolve_uri("", tmp_path) == default
    assert store.resolve_uri("http://example:5000", tmp_path) == "http://example:5000"
    monkeypatch.setenv(URI_VAR, "sqlite:////elsewhere.db")
    assert store.resolve_uri(None, tmp_path) == "sqlite:////elsewhere.db"
    assert store.resolve_uri("http://example:5000", tmp_path) == "http://example:5000"


def test_a_relative_sqlite_path_is_taken_from_the_launch_dir(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """Every job of a sweep, whatever its working directory, writes to one file."""
    monkeypatch.chdir(tmp_path)
    launch = tmp_path / "launch"
    assert store.resolve_uri("sqlite:///db/x.db?timeout=5", launch) == (
        f"sqlite:///{launch.resolve()}/db/x.db?timeout=5")
    monkeypatch.setenv(URI_VAR, "sqlite:///env.db")
    assert store.resolve_uri(None, launch) == f"sqlite:///{launch.resolve()}/env.db"
    assert store.resolve_uri("sqlite:////abs/x.db", launch) == "sqlite:////abs/x.db"


def _global_uses(source: str, name: str) -> list[str]:
    """`mlflow.<call>` of GLOBAL_CALLS, any `get/set_tracking_uri` and `MlflowClient()`
    without a URI in the module `name` (its text: `source`), as `name:line call`, except
    inside `store.process_uri` (the one confined use)."""
    tree = ast.parse(source)
    allowed = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
               and name == "mlp/tracking/store.py" and fn.name == "process_uri"
               for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in allowed:
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        base = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        fluent = called in GLOBAL_CALLS and base.split(".")[0] == "mlflow"
        unnamed = called == "MlflowClient" and not node.args and not node.keywords
        if fluent or unnamed or called in ("set_tracking_uri", "get_tracking_uri"):
            found.append(f"{name}:{node.lineno} {ast.unparse(func)}")
    return found


def test_no_module_reads_or_sets_mlflows_process_global():
    assert [use for path in sorted((ROOT / "mlp").rglob("*.py"))
            for use in _global_uses(path.read_text(), str(path.relative_to(ROOT)))] == []
    probe = ("mlflow.start_run()\nmlflow.tracking.MlflowClient()\nx.get_tracking_uri()\n"
             "mlflow.MlflowClient('sqlite://')\nclient.log_metrics('r', [])\n")
    assert _global_uses(probe, "p.py") == ["p.py:1 mlflow.start_run",
                                           "p.py:2 mlflow.tracking.MlflowClient",
                                           "p.py:3 x.get_tracking_uri"]


def test_a_run_lands_in_the_store_its_option_names_only(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """tracking.uri=A with $MLFLOW_TRACKING_URI=B: the run, its metrics, its model (logged
    through the one call that needs MLflow's global) are in A; B is never created, and the
    global is unset again (MLflow reads B from the environment afterwards)."""
    a, b = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    a.parent.mkdir()
    b.parent.mkdir()
    monkeypatch.setenv(URI_VAR, f"sqlite:///{b}")
    client, experiment = store.connect(store.resolve_uri(f"sqlite:///{a}", tmp_path), "explicit")
    recorder = tracking.start_run(client, experiment, "explicit", {"mlp.kind": "test"})
    recorder.on_epoch(1, {"val_acc": 0.5})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 12)).astype(np.uint8)
    net = MLP(input_dim=12, hidden_sizes=[4], num_classes=3, seed=0)
    model_id = recorder.log_model(net, Normalizer().fit(images), ("a", "b", "c"), "mlp",
                                  example=images[:2])
    recorder.log_metrics({keys.ACC_TEST: 0.4}, step=1, model_id=model_id)
    recorder.finish("FINISHED")

    assert not b.exists()
    assert mlflow.get_tracking_uri() == f"sqlite:///{b}"
    run = client.get_run(recorder.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == experiment
    assert run.data.tags["mlp.kind"] == "test" and run.data.tags["mlflow.runName"] == "explicit"
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    logged = client.get_logged_model(model_id)
    assert (logged.source_run_id, logged.experiment_id) == (recorder.run_id, experiment)
    assert logged.status.to_proto() == 2  # READY
    assert [m.key for m in logged.metrics] == [keys.ACC_TEST]
    assert [p.step for p in client.get_metric_history(recorder.run_id, keys.ACC_VAL)] == [1]


def test_a_read_only_command_does_not_create_a_store(tmp_path: Path):
    with pytest.raises(store.StoreError, match="no MLflow store at"):
        store.open_client(f"sqlite:///{tmp_path / 'typo.db'}", create=False)
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.e2e
def test_mlp_train_writes_where_tracking_uri_says_whatever_the_environment(
        tmp_path: Path, run_env: dict):
    """The same in a real `mlp-train` (the model logged too), with the store named by a
    relative path: it is taken from the launch dir, not from Hydra's output dir."""
    from helpers import FAST, mlp_train, runs_of

    elsewhere = tmp_path / "elsewhere.db"
    out = mlp_train([*FAST, "tracking.log_model=true", "tracking.uri=sqlite:///a.db"], tmp_path,
                    run_env | {URI_VAR: f"sqlite:///{elsewhere}"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not elsewhere.exists()
    client, runs = runs_of(tmp_path / "a.db")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert client.search_logged_models([runs[0].info.experiment_id])[0].source_run_id == (
        runs[0].info.run_id)
