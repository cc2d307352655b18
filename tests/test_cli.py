"""mlp-train / mlp-gradcheck end to end on synthetic data, read back through MlflowClient."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tool
from mlflow import MlflowClient

from mlp import data as datalib

pytestmark = pytest.mark.e2e  # every test here runs the console scripts in a subprocess

QUICK = ["data=synthetic", "data.synthetic.n_train=300", "data.synthetic.n_test=100",
         "data.val_size=60", "model.hidden_sizes=[32]", "trainer.epochs=2",
         "trainer.batch_size=50", "trainer.train_eval_size=100", "trainer.progress=false",
         "optim.lr=0.02", "gradcheck.max_width=8", "gradcheck.num_checks=10"]


def mlp_train(args: list[str], cwd: Path, env: dict, timeout: float = 180,
              command: str = "mlp-train") -> subprocess.CompletedProcess:
    return subprocess.run([tool(command), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def runs_of(db: Path, experiment: str = "mlp-lab") -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def test_a_run_is_fully_recorded(tmp_path: Path, run_env: dict):
    out = mlp_train([*QUICK, "model.reg=1e-3"], tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "relu-h32-lr2e-2-reg1e-3"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    params = run.data.params
    assert params["model.hidden_sizes"] == "[32]"
    assert params["model.activation"] == "relu"
    assert params["model.reg"] == "0.001"
    assert params["optim.lr"] == "0.02"
    assert params["trainer.dtype"] == "float32"

    history = {k: client.get_metric_history(run.info.run_id, k)
               for k in ("train_loss", "val_loss", "train_acc", "val_acc", "gap_acc",
                         "gap_loss", "lr")}
    for key, points in history.items():
        assert [p.step for p in points] == [1, 2], key
    for tr, va, gap in zip(history["train_acc"], history["val_acc"], history["gap_acc"],
                           strict=True):
        assert gap.value == pytest.approx(tr.value - va.value, abs=1e-12)
    batch = client.get_metric_history(run.info.run_id, "batch_loss")
    assert [p.step for p in batch] == [10]  # 240 images / 50 -> 5 steps an epoch, every 10th

    m = run.data.metrics
    for key in ("test_loss", "test_acc", "best_val_acc", "best_epoch",
                "gradcheck/max_rel_error", "gradcheck/W1", "gradcheck/b2",
                "health/W1/update_ratio", "health/layer1/dead_frac"):
        assert key in m, key
    assert m["gradcheck/max_rel_error"] < 1e-7
    assert run.data.tags["gradcheck.passed"] == "true"
    assert run.data.tags["data.archive_sha256"]
    assert "mlp.command" in run.data.tags and "data=synthetic" in run.data.tags["mlp.overrides"]

    artifacts = _all_artifacts(client, run.info.run_id)
    for path in ("plots/curves.png", "plots/confusion_matrix.png", "plots/per_class_accuracy.png",
                 "plots/first_layer_weights.png", "gradcheck/table.json",
                 "gradcheck/report.json", "config/resolved.yaml", "config/overrides.txt",
                 "config/hydra/config.yaml", "model_npz/model.npz"):
        assert path in artifacts, (path, sorted(artifacts))
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "gradcheck/table.json",
                                                      str(tmp_path))).read_text())
    assert {"name", "shape", "checked", "kinks", "max_rel_error", "verdict"} <= set(
        table["columns"])

    # the pyfunc model predicts the package's classes: its test accuracy is the logged one
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = client.search_logged_models([run.info.experiment_id])
    assert len(models) == 1
    pyfunc = mlflow.pyfunc.load_model(models[0].model_uri)
    archive = Path(os.environ["MLP_LAB_DATA"]) / "synthetic-300-100-0.tar.gz"
    raw = datalib.load_cifar10(archive.parent, archive, datalib.file_digest(archive),
                               progress=False)
    pred = np.asarray(pyfunc.predict(raw.X_test))
    assert pred.shape == (100,)
    assert np.mean(pred == raw.y_test) == pytest.approx(m["test_acc"], abs=1e-12)


def _all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_invalid_config_exits_nonzero_and_starts_no_run(tmp_path: Path, run_env: dict):
    out = mlp_train([*QUICK, "optim.lr=-0.1"], tmp_path, run_env)
    assert out.returncode == 2
    assert "optim.lr=-0.1" in out.stderr and "expected" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_archive_is_a_clear_error_without_a_run(tmp_path: Path, run_env: dict):
    out = mlp_train(["data.archive=/no/such/cifar.tar.gz", "trainer.epochs=1"], tmp_path,
                    run_env)
    assert out.returncode == 2
    assert "/no/such/cifar.tar.gz" in out.stderr
    assert runs_of(tmp_path / "mlflow.db")[1] == []


def test_divergence_ends_the_run_failed(tmp_path: Path, run_env: dict):
    out = mlp_train([*QUICK, "optim.name=sgd", "optim.lr=1e6"], tmp_path, run_env)
    assert out.returncode == 1
    assert "diverged" in out.stderr
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error.type"] == "DivergenceError"


def test_failed_gradcheck_can_stop_the_run(tmp_path: Path, run_env: dict):
    out = mlp_train([*QUICK, "gradcheck.tol=1e-30", "gradcheck.stop_on_fail=true"], tmp_path,
                    run_env)
    assert out.returncode == 3
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["gradcheck.passed"] == "false"
    assert "train_loss" not in runs[0].data.metrics


def test_sigterm_kills_the_run_and_resume_finishes_it(tmp_path: Path, run_env: dict):
    ckpt_dir = tmp_path / "ckpt"
    args = [*QUICK, "trainer.epochs=400", f"trainer.checkpoint_dir={ckpt_dir}",
            "gradcheck.enabled=false", "tracking.plots=false", "tracking.log_model=false"]
    proc = subprocess.Popen([tool("mlp-train"), *args], cwd=tmp_path, env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (ckpt_dir / "last.npz").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (ckpt_dir / "last.npz").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["KILLED"]
    run_id = runs[0].info.run_id
    assert runs[0].data.tags["checkpoint"] == str(ckpt_dir / "last.npz")
    done = len(client.get_metric_history(run_id, "val_acc"))
    assert 1 <= done < 400

    resumed_epochs = done + 2
    out = mlp_train([*args[:-4], f"trainer.epochs={resumed_epochs}",
                     f"trainer.checkpoint_dir={ckpt_dir}", "gradcheck.enabled=false",
                     f"trainer.resume={ckpt_dir / 'last.npz'}"], tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    steps = [p.step for p in client.get_metric_history(run_id, "val_acc")]
    assert steps == list(range(1, resumed_epochs + 1))


def test_gradcheck_command_logs_its_own_run(tmp_path: Path, run_env: dict):
    out = mlp_train(["model.hidden_sizes=[20,15]", "model.activation=tanh", "model.reg=0.1",
                     "gradcheck.max_width=8"], tmp_path, run_env, command="mlp-gradcheck")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PASSED" in out.stdout
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].data.tags["mlp.kind"] == "gradcheck"
    assert runs[0].data.tags["gradcheck.passed"] == "true"
    assert runs[0].data.metrics["gradcheck/max_rel_error"] < 1e-7


LOGGER = """
import sys
from mlp import tracking
uri, n = sys.argv[1], int(sys.argv[2])
exp = tracking.connect(uri, "parallel")
rec = tracking.start_run(exp, f"writer-{n}", {"writer": str(n)}, log_every_steps=1)
for epoch in range(1, 31):
    for step in range(1, 11):
        rec.on_step((epoch - 1) * 10 + step, float(step), 0.1)
    rec.on_epoch(epoch, {"val_acc": epoch / 100, "train_acc": n + epoch / 100})
rec.finish("FINISHED")
"""


def test_four_processes_share_one_sqlite_store(tmp_path: Path, run_env: dict):
    from mlp import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.connect(uri, "parallel")  # the store and experiment exist before the writers
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER, uri, str(n)], env=run_env,
                              stderr=subprocess.PIPE, text=True) for n in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    client, runs = runs_of(tmp_path / "mlflow.db", "parallel")
    assert sorted(r.data.tags["writer"] for r in runs) == ["0", "1", "2", "3"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "batch_loss")) == 300
        assert len(client.get_metric_history(r.info.run_id, "val_acc")) == 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_before_training(tmp_path: Path, run_env: dict):
    start = time.time()
    out = mlp_train([*QUICK, f"tracking.uri=http://127.0.0.1:{_free_port()}"], tmp_path, run_env)
    assert out.returncode == 2
    assert "tracking" in out.stderr.lower() and "127.0.0.1" in out.stderr
    assert time.time() - start < 60


def test_logging_through_a_tracking_server(tmp_path: Path, run_env: dict):
    port = _free_port()
    env = dict(run_env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        [tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        out = mlp_train([*QUICK, f"tracking.uri={uri}", "tracking.experiment=remote"],
                        tmp_path, run_env)
        assert out.returncode == 0, out.stderr[-3000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("remote")
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert len(client.get_metric_history(runs[0].info.run_id, "val_acc")) == 2
        assert "plots/curves.png" in _all_artifacts(client, runs[0].info.run_id)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert not (tmp_path / "mlflow.db").exists()
