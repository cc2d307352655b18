"""tracking.py in-process: URI precedence, params flattening, run names, metric sending
that survives a failing store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlp import tracking


def test_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert tracking.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_uri("http://example:5000", tmp_path) == "http://example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking.resolve_uri("http://example:5000", tmp_path) == "sqlite:////elsewhere.db"


def test_flatten_keeps_lists_whole():
    flat = tracking.flatten({"model": {"hidden_sizes": [100, 50], "reg": 0.001},
                             "data": {"limit": None, "augment": {"pad": 4}}, "seed": 0})
    assert flat == {"model.hidden_sizes": "[100, 50]", "model.reg": "0.001",
                    "data.limit": "null", "data.augment.pad": "4", "seed": "0"}


@pytest.mark.parametrize(("model", "lr", "name"), [
    ({"hidden_sizes": [100], "activation": "relu", "reg": 1e-4, "loss": "softmax"}, 1e-3,
     "relu-h100-lr1e-3-reg1e-4"),
    ({"hidden_sizes": [], "activation": "tanh", "reg": 0.0, "loss": "svm"}, 0.05,
     "tanh-linear-lr5e-2-reg0-svm"),
    ({"hidden_sizes": [512, 256], "activation": "elu", "reg": 5e-3, "loss": "softmax"}, 2e-2,
     "elu-h512x256-lr2e-2-reg5e-3"),
    ({"hidden_sizes": [1024, 1024], "activation": "relu", "reg": 1e-5, "loss": "softmax",
      "norm": "batch", "dropout": 0.1}, 5e-2, "relu-h1024x1024-lr5e-2-reg1e-5-bn-drop0.1"),
    ({"hidden_sizes": [64], "activation": "relu", "reg": 0.0, "loss": "softmax",
      "norm": "layer", "dropout": 0.0}, 1e-2, "relu-h64-lr1e-2-reg0-ln"),
])
def test_run_name_says_what_differs(model: dict, lr: float, name: str):
    assert tracking.run_name({"model": model, "optim": {"lr": lr}}) == name


def test_metrics_survive_a_failing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    experiment = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "flaky")
    recorder = tracking.start_run(experiment, "flaky", {}, log_every_steps=1)
    real = recorder.client.log_batch
    failures = iter([True, False, False, False])

    def flaky(*args, **kwargs):
        if next(failures, False):
            raise MlflowException("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(recorder.client, "log_batch", flaky)
    with pytest.warns(UserWarning, match="retry"):
        recorder.on_step(1, 2.0, 0.1)
        recorder.on_epoch(1, {"val_acc": 0.25})
        recorder.flush(wait=True)
    recorder.on_epoch(2, {"val_acc": 0.5})
    recorder.finish("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(recorder.run_id, "val_acc")
    assert [(p.step, p.value) for p in history] == [(1, 0.25), (2, 0.5)]
    assert len(client.get_metric_history(recorder.run_id, "batch_loss")) == 1
    assert client.get_run(recorder.run_id).info.status == "FINISHED"


def test_finish_rejects_an_unknown_status(tmp_path: Path):
    experiment = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "status")
    recorder = tracking.start_run(experiment, "status", {})
    with pytest.raises(ValueError, match="DONE"):
        recorder.finish("DONE")
    recorder.finish("FINISHED")


def test_the_view_hint_opens_the_model_training_view():
    local = tracking.how_to_view("sqlite:////x/mlflow.db", "1", "abc")
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in local
    assert local.endswith("#/experiments/1/runs/abc?workflowType=machine_learning")
    remote = tracking.how_to_view("http://host:5000/", "2", "r")
    assert remote == "open http://host:5000/#/experiments/2/runs/r?workflowType=machine_learning"
