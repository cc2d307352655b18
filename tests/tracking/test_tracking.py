"""The recorder in-process: the params that act, the gradient check read back at its real
values, run names, metric sending that survives a failing store (URI precedence:
test_store.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import migrated_store
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from omegaconf import OmegaConf

from mlp.config import schema as configlib
from mlp.core.gradcheck import check_model, check_step_precision_clear
from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.tracking import keys, names, store
from mlp.tracking import recorder as tracking


def _start(tmp_path: Path, name: str, **kwargs) -> tracking.RunRecorder:
    client, experiment = store.connect(migrated_store(tmp_path / "mlflow.db"), name)
    return tracking.start_run(client, experiment, name, {}, **kwargs)


def _resolved(**changes: str) -> dict:
    """The schema's defaults with dotted-key changes, as a resolved config."""
    cfg = OmegaConf.structured(configlib.Config)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return OmegaConf.to_container(cfg)


def test_params_are_the_keys_that_act_in_the_run():
    sgd = tracking.run_params(_resolved(optim__name="sgd"))
    assert sgd["model.hidden_sizes"] == "[100]" and sgd["data.limit"] == "null"
    assert not {k for k in sgd if k.startswith(("optim.beta", "optim.momentum", "optim.eps",
                                                 "optim.decay_rate", "data.synthetic."))}
    adam = tracking.run_params(_resolved(optim__name="adam"))
    assert {"optim.beta1", "optim.beta2", "optim.eps"} <= set(adam)
    assert "optim.momentum" not in adam
    synthetic = tracking.run_params(_resolved(data__name="synthetic"))
    assert synthetic["data.synthetic.n_train"] == "600"
    leaky = tracking.run_params(_resolved(model__activation="leaky_relu"))
    assert "model.leaky_slope" in leaky and "model.elu_alpha" not in leaky
    for params in (sgd, adam, synthetic):
        assert not any(k.startswith(("tracking.", "trial.")) or k in (
            "data.archive", "data.root", "trainer.progress", "trainer.resume") for k in params)
    tags = tracking.bookkeeping_tags(_resolved(data__archive="/a/cifar.tar.gz",
                                               tracking__plots="false"))
    assert tags == {"mlp.data.archive": "/a/cifar.tar.gz", "mlp.tracking.plots": "False"}


def test_the_stored_gradient_check_equals_the_computed_one(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """Errors from 1e-3 down to 1e-13 (and exact zeros) read back at their value from the
    metrics, the tags, the table artifact and the JSON report."""
    net = MLP(input_dim=6, hidden_sizes=[5], num_classes=3, reg=0.1, dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    report = check_model(net, rng.standard_normal((4, 6)), np.array([0, 1, 2, 1]))
    errors = [1e-3, 3e-9, 2.5e-11, 7e-13, 0.0, 1.234567e-12]
    for i, row in enumerate(report.rows):
        row.max_rel_error = errors[i % len(errors)]
        row.mean_rel_error = row.max_rel_error / 3
    recorder = _start(tmp_path, "gc")
    recorder.log_gradcheck(report)
    recorder.finish("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(recorder.run_id)
    for name, error in report.max_by_param("total").items():
        assert run.data.metrics[keys.GRADCHECK_PREFIX + name] == pytest.approx(error, rel=1e-6)
    assert run.data.metrics[keys.GRADCHECK_MAX] == pytest.approx(report.max_rel_error,
                                                                 rel=1e-6)
    # the tag and the log10 are short enough for a cell of the runs table
    assert run.data.tags["gradcheck.max_rel_error"] == f"{report.max_rel_error:.2e}"
    assert run.data.metrics[keys.GRADCHECK_MAX + keys.LOG10] == round(
        np.log10(report.max_rel_error), 2)
    table = json.loads(Path(client.download_artifacts(recorder.run_id, "gradcheck/table.json",
                                                      str(tmp_path))).read_text())
    stored = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(stored) == len(report.table())
    for row, computed in zip(stored, report.table(), strict=True):
        for column in ("max_rel_error", "mean_rel_error"):
            assert float(row[column]) == pytest.approx(computed[column], rel=1e-6, abs=0)
    assert any(float(row["max_rel_error"]) == 7e-13 for row in stored)
    # MLflow's own reader of its table format finds it (the tag the UI lists tables by;
    # load_table searches with the fluent API, which reads the environment's store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    read = client.load_table(run.info.experiment_id, "gradcheck/table.json",
                             run_ids=[recorder.run_id])
    assert [float(v) for v in read["max_rel_error"]] == [float(row["max_rel_error"])
                                                          for row in stored]
    full = json.loads(Path(client.download_artifacts(recorder.run_id, "gradcheck/report.json",
                                                     str(tmp_path))).read_text())
    assert full["max_rel_error"] == report.max_rel_error


def test_the_stored_step_check_equals_the_computed_one(tmp_path: Path):
    """The float32 step check reads back from the metric, the tag and the JSON report: every
    parameter's error and own tolerance at full precision, the worst named in the tag."""
    model = MLP(input_dim=8, hidden_sizes=[6], num_classes=3, norm="batch", reg=0.1, seed=1)
    rng = np.random.default_rng(0)
    check = check_step_precision_clear(model, "rmsprop", (
        (rng.standard_normal((16, 8), dtype=np.float32), rng.integers(0, 3, 16))
        for _ in range(8)))
    recorder = _start(tmp_path, "step")
    recorder.log_step_precision(check)
    recorder.finish("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(recorder.run_id)
    assert run.data.metrics[keys.STEP_PRECISION_PREFIX + "float32"] == pytest.approx(
        check.max_rel_error, rel=1e-6)
    worst = check.worst
    assert run.data.tags["gradcheck.step_float32"].startswith(
        f"passed {worst} {check.errors[worst]:.2e} (tol {check.tols[worst]:.2e}, ")
    stored = json.loads(Path(client.download_artifacts(
        recorder.run_id, "gradcheck/step_float32.json", str(tmp_path))).read_text())
    assert stored["errors"] == check.errors and stored["tols"] == check.tols
    assert (stored["passed"], stored["worst"], stored["batches"]) == (True, worst,
                                                                       check.batches)


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
    assert names.run_name({"model": model, "optim": {"lr": lr}}) == name


def test_metrics_survive_a_failing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recorder = _start(tmp_path, "flaky", log_every_steps=1)
    real = recorder.client.log_batch
    failures = iter([True, False, False, False])

    def flaky(*args, **kwargs):
        if next(failures, False):
            raise MlflowException("Connection refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(recorder.client, "log_batch", flaky)
    with pytest.warns(UserWarning, match="retry"):
        recorder.on_step(1, 2.0, 0.1)
        recorder.on_epoch(1, {"val_acc": 0.25})
        recorder.sink.flush(wait=True)
    recorder.on_epoch(2, {"val_acc": 0.5})
    recorder.finish("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(recorder.run_id, keys.ACC_VAL)
    assert [(p.step, p.value) for p in history] == [(1, 0.25), (2, 0.5)]
    assert len(client.get_metric_history(recorder.run_id, keys.LOSS_BATCH)) == 1
    assert client.get_run(recorder.run_id).info.status == "FINISHED"


def test_finish_rejects_an_unknown_status(tmp_path: Path):
    recorder = _start(tmp_path, "status")
    with pytest.raises(ValueError, match="DONE"):
        recorder.finish("DONE")
    recorder.finish("FINISHED")


def test_the_view_hint_opens_the_model_training_view():
    local = tracking.how_to_view("sqlite:////x/mlflow.db", "1", "abc").splitlines()
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in local[0]
    assert local[0].endswith("#/experiments/1/runs/abc?workflowType=machine_learning")
    assert local[1].endswith("#/experiments/1/runs?workflowType=machine_learning"
                             "&orderByKey=metrics.%60acc%2Fbest_val%60&orderByAsc=false")
    remote = tracking.how_to_view("http://host:5000/", "2", "r").splitlines()
    assert remote[0] == "open http://host:5000/#/experiments/2/runs/r?workflowType=machine_learning"
    assert remote[1].startswith("  all runs, best first: http://host:5000/#/experiments/2/runs?")
    sweep = tracking.how_to_view("http://host:5000", "2", "p", children=True).splitlines()
    assert sweep[1] == ("  its children's curves overlaid: http://host:5000/#/experiments/2/runs?"
                        "workflowType=machine_learning&compareRunsMode=CHART&searchFilter="
                        "tags.mlflow.parentRunId%20%3D%20%27p%27")


def test_a_wrong_fused_l2_fails_the_runs_logged_gradient_check(tmp_path: Path, monkeypatch):
    """The mutation the per-run check exists for: the optimizer's fused pass adds c/2 W for
    the L2 gradient. The check a run logs (build.run_gradcheck) then says failed."""
    from hydra import compose, initialize_config_module

    from mlp.cli import build
    from mlp.core import optim

    configlib.register()
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model.reg=0.1", "gradcheck.max_width=6",
                                                        "model.hidden_sizes=[8]"])
    assert build.run_gradcheck(cfg).passed
    real = optim.Optimizer._with_l2
    monkeypatch.setattr(optim.Optimizer, "_with_l2", staticmethod(
        lambda c, squares, rule, *arrays, scratch: real(c / 2, squares, rule, *arrays,
                                                          scratch=scratch)))
    monkeypatch.setattr(build, "_checks", {})  # as in a new process: nothing shared
    report = build.run_gradcheck(cfg)
    recorder = _start(tmp_path, "mutant")
    recorder.log_gradcheck(report)
    recorder.finish("FINISHED")
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(recorder.run_id).data.tags
    assert tags["gradcheck.passed"] == "false"


def _tiny_model() -> tuple[MLP, Normalizer, np.ndarray]:
    X = np.random.default_rng(0).integers(0, 256, (20, 3072)).astype(np.uint8)
    return MLP(3072, [4], 10), Normalizer().fit(X), X[:3]


def test_a_run_named_by_dotted_values_gets_its_model(tmp_path: Path):
    """An Optuna trial's name (`reg=0.00507361 lr=0.0119698`) has dots, which MLflow
    refuses in a model name: the model is logged under the sanitized name."""
    recorder = _start(tmp_path, "reg=0.00507361 lr=0.0119698")
    model, normalizer, example = _tiny_model()
    model_id = recorder.log_model(model, normalizer, tuple("abcdefghij"),
                                  "reg=0.00507361 lr=0.0119698", example)
    recorder.finish("FINISHED")
    logged = recorder.client.get_logged_model(model_id)
    assert logged.name == "reg_0_00507361_lr_0_0119698"
    assert logged.source_run_id == recorder.run_id


@pytest.mark.parametrize(("code", "refusal"), [("INVALID_PARAMETER_VALUE", True),
                                               ("INTERNAL_ERROR", False)])
def test_a_model_the_store_refuses_is_an_error_not_an_outage(tmp_path: Path, monkeypatch,
                                                             code, refusal):
    recorder = _start(tmp_path, "refused")

    def refuse(*args, **kwargs):
        raise MlflowException("Invalid model name", getattr(databricks_pb2, code))

    monkeypatch.setattr(recorder.client, "create_logged_model", refuse)
    model, normalizer, example = _tiny_model()
    expected = tracking.ModelRefused if refusal else MlflowException
    with pytest.raises(expected) as raised:
        recorder.log_model(model, normalizer, tuple("abcdefghij"), "m", example)
    recorder.finish("FINISHED")
    assert isinstance(raised.value, MlflowException) != refusal  # an outage stays MLflow's
    if refusal:
        assert str(raised.value) == ("the store refused the model 'm': "
                                     "INVALID_PARAMETER_VALUE: Invalid model name")


def test_a_locked_sqlite_store_is_tried_again_not_spooled(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """A second connection holds an exclusive lock for 1 s, and the first write is told
    "database is locked" (MLflow's SQLite sessions wait 20 s for a lock themselves, so the
    error is what SQLite answers when it will not wait): the sink tries again, the point
    is stored once, nothing is spooled, no outage is declared."""
    db = tmp_path / "mlflow.db"
    recorder = _start(tmp_path, "locked", spool_path=tmp_path / "ckpt" / "spool.jsonl")
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, holder.execute, ["COMMIT"]).start()
    real, calls = recorder.client.log_batch, []

    def locked_once(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(recorder.client, "log_batch", locked_once)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorder.on_epoch(1, {"val_acc": 0.5})
    holder.close()
    assert len(calls) == 2 and not recorder.sink.offline()
    assert not (tmp_path / "ckpt" / "spool.jsonl").exists()
    recorder.finish("FINISHED")
    history = MlflowClient(f"sqlite:///{db}").get_metric_history(recorder.run_id, keys.ACC_VAL)
    assert [(p.step, p.value) for p in history] == [(1, 0.5)]
