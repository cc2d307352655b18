"""mlp-train / mlp-gradcheck end to end on synthetic data, read back through MlflowClient."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, free_port, tool
from helpers import QUICK, mlp_train, runs_of
from mlflow import MlflowClient

from mlp import data as datalib
from mlp.tracking import glance, names
from mlp.tracking import keys as metrics

pytestmark = pytest.mark.e2e


def test_a_run_is_fully_recorded(tmp_path: Path, run_env: dict):
    """The metric contract (mlp/metrics.py): keys, steps, values; params that act; tags,
    datasets, artifacts, the model and its metrics, the description."""
    out = mlp_train([*QUICK, "model.reg=1e-3", "tracking.system_metrics=false",
                     "data.augment.test_flip=true", "data.augment.test_shift=2"], tmp_path,
                    run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    # Not a terminal: one line per epoch all the same, then the result and the commands.
    printed = out.stdout + out.stderr
    number = r"\d+\.\d{4}"
    for epoch in (1, 2):
        assert re.search(rf"epoch {epoch}/2  loss {number} / {number} \(gap [+-]{number}\)  "
                         rf"acc {number} / {number} \(gap [+-]{number}\)  lr \S+  \S+ s",
                         printed), printed[-3000:]
    assert re.search(rf"done: accuracy train {number} / val {number} / test {number} "
                     rf"\(gap [+-]{number}\)", printed)
    assert "run it again: mlp-train data=synthetic" in printed
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "relu-h32-lr2e-2-reg1e-3"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    params = run.data.params
    assert params["model.hidden_sizes"] == "[32]"
    assert params["model.reg"] == "0.001"
    assert params["optim.lr"] == "0.02" and params["optim.momentum"] == "0.9"
    assert params["data.synthetic.n_train"] == "300"
    for absent in ("optim.beta1", "optim.decay_rate", "model.leaky_slope", "tracking.uri",
                   "data.archive", "trainer.progress", "optim.schedule.decay"):
        assert absent not in params, absent
    assert run.data.tags["mlp.trainer.progress"] == "False"  # bookkeeping as tags

    rid = run.info.run_id
    epoch_keys = [k for k in run.data.metrics
                  if k.startswith(("acc/", "loss/", "opt/", "speed/", "units/", "weights/"))
                  and k not in (*metrics.SUMMARY, metrics.LOSS_BATCH)]
    assert {metrics.ACC_TRAIN, metrics.ACC_VAL, metrics.ACC_GAP, metrics.LOSS_TRAIN,
            metrics.LOSS_VAL, metrics.LOSS_GAP, metrics.LR} <= set(epoch_keys)
    history = {k: client.get_metric_history(rid, k) for k in epoch_keys}
    for key, points in history.items():
        assert [p.step for p in points] == [1, 2], key
    for tr, va, gap in zip(history[metrics.ACC_TRAIN], history[metrics.ACC_VAL],
                           history[metrics.ACC_GAP], strict=True):
        # to 6 decimals, as the trainer rounds it (a 1/3 would show every digit of its noise)
        assert gap.value == pytest.approx(round(tr.value - va.value, 6), abs=1e-12)
    batch = client.get_metric_history(rid, metrics.LOSS_BATCH)
    assert [p.step for p in batch] == [10]  # 240 images / 50 -> 5 steps an epoch, every 10th
    # the summary and the gradient check: one point each, at step 0 (a bar in the charts)
    for key in (*metrics.SUMMARY, metrics.GRADCHECK_MAX, metrics.GRADCHECK_PREFIX + "W1",
                metrics.GRADCHECK_PREFIX + "b2", metrics.GRADCHECK_KINKS):
        assert [p.step for p in client.get_metric_history(rid, key)] == [0], key
    m = run.data.metrics
    best = int(m[metrics.BEST_EPOCH])
    val = [p.value for p in history[metrics.ACC_VAL]]
    assert m[metrics.ACC_BEST_VAL] == max(val) == val[best - 1]
    assert 0 < m[metrics.GRADCHECK_MAX] < 1e-7
    assert m[metrics.GRADCHECK_MAX + metrics.LOG10] == pytest.approx(
        np.log10(m[metrics.GRADCHECK_MAX]), abs=0.005)
    assert not any(k.startswith("system/") for k in m)  # tracking.system_metrics=false
    step32 = metrics.STEP_PRECISION_PREFIX + "float32"  # the float32 step vs float64
    assert [p.step for p in client.get_metric_history(rid, step32)] == [0]
    assert 0 < m[step32] < 1e-4
    tags = run.data.tags
    assert tags["gradcheck.passed"] == "true"
    assert tags["gradcheck.step_float32"].startswith("passed ")
    assert float(tags["gradcheck.max_rel_error"]) == pytest.approx(m[metrics.GRADCHECK_MAX],
                                                                    rel=1e-2)
    assert tags["data.archive_sha256"]
    assert "mlp.command" in tags and "data=synthetic" in tags["mlp.overrides"]
    # the description is the run at a glance: the result as stored, beside the small train
    # vs validation figure (96 pixels tall: under the Overview's fold), a link to the curves
    note = tags["mlflow.note.content"]
    assert f"Test accuracy <b>{m[metrics.ACC_TEST]:.2%}</b>" in note
    assert "gradient check <b>passed</b> (max relative error " in note
    assert glance.image(rid, glance.PATH).replace("&", "&amp;") in note
    assert "/artifacts/plots/curves.png?" in note
    png = Path(client.download_artifacts(rid, glance.PATH, str(tmp_path)))
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (width, height) == (220, 96) and height < glance.FOLD_PX

    inputs = {t.value: d.dataset for d in run.inputs.dataset_inputs for t in d.tags
              if t.key == "mlflow.data.context"}
    assert set(inputs) == {"train", "validation", "test"}
    for context, dataset in inputs.items():
        assert dataset.name == f"synthetic-{context}"
        assert dataset.digest.startswith(tags["data.archive_sha256"][:12])

    artifacts = _all_artifacts(client, rid)
    for path in ("plots/curves.png", "plots/confusion_matrix.png", "plots/per_class_accuracy.png",
                 "plots/first_layer_weights.png", "gradcheck/table.json",
                 "gradcheck/report.json", "gradcheck/step_float32.json", "config/resolved.yaml",
                 "config/overrides.txt",
                 "config/hydra/config.yaml", "model_npz/model.npz"):
        assert path in artifacts, (path, sorted(artifacts))

    models = client.search_logged_models([run.info.experiment_id])
    assert len(models) == 1 and models[0].name == names.model_name(run.info.run_name)
    linked = {x.key: x for x in models[0].metrics}
    assert set(linked) == {metrics.ACC_TEST, metrics.LOSS_TEST}
    assert linked[metrics.ACC_TEST].value == m[metrics.ACC_TEST]
    assert linked[metrics.ACC_TEST].dataset_name == "synthetic-test"

    # The model, loaded in a fresh process in another directory (no mlp-lab source there),
    # gives 10 class probabilities per image whose argmax has the logged test accuracy:
    # it scores each image over its moved and mirror images, as the run's test did.
    assert params["data.augment.test_flip"] == "True"
    assert params["data.augment.test_shift"] == "2"
    archive = Path(os.environ["MLP_LAB_DATA"]) / "synthetic-300-100-0.tar.gz"
    raw = datalib.load_cifar10(archive.parent, archive, datalib.file_digest(archive),
                               progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    np.save(elsewhere / "x.npy", raw.X_test)
    script = (
        "import sys, numpy as np, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "print(model.metadata.signature.inputs.to_json())\n"
        "np.save('probs.npy', model.predict(np.load('x.npy').astype(np.float64)))\n")
    loaded = subprocess.run(
        [sys.executable, "-c", script, models[0].model_uri], cwd=elsewhere, timeout=120,
        capture_output=True, text=True,
        env=run_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                       "PYTHONSAFEPATH": "1"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert '"float64"' in loaded.stdout and "3072" in loaded.stdout
    probs = np.load(elsewhere / "probs.npy")
    assert probs.shape == (100, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    assert np.mean(probs.argmax(axis=1) == raw.y_test) == pytest.approx(m[metrics.ACC_TEST],
                                                                        abs=1e-12)


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
    assert metrics.LOSS_TRAIN not in runs[0].data.metrics


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
    done = len(client.get_metric_history(run_id, metrics.ACC_VAL))
    assert 1 <= done < 400

    resumed_epochs = done + 2
    out = mlp_train([*args[:-4], f"trainer.epochs={resumed_epochs}",
                     f"trainer.checkpoint_dir={ckpt_dir}", "gradcheck.enabled=false",
                     f"trainer.resume={ckpt_dir / 'last.npz'}"], tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    steps = [p.step for p in client.get_metric_history(run_id, metrics.ACC_VAL)]
    assert steps == list(range(1, resumed_epochs + 1))
    # The interruption's error no longer describes the run once it finished.
    assert not {"error.type", "error.message"} & set(runs[0].data.tags)

    # The finished run's checkpoint, resumed for more epochs, is a new run: the finished
    # run keeps its status and record.
    before = client.get_run(run_id)
    again = mlp_train([*args[:-4], f"trainer.epochs={resumed_epochs + 1}",
                       f"trainer.checkpoint_dir={ckpt_dir}", "gradcheck.enabled=false",
                       f"trainer.resume={ckpt_dir / 'last.npz'}"], tmp_path, run_env)
    assert again.returncode == 0, again.stderr[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 2
    new = next(r for r in runs if r.info.run_id != run_id)
    assert new.info.status == "FINISHED" and new.data.tags["mlp.resumed_from"] == run_id
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert len(client.get_metric_history(run_id, metrics.ACC_VAL)) == resumed_epochs


def test_environment_and_docker_tags(tmp_path: Path, monkeypatch):
    """Where a run came from: git commit and dirty flag, versions, and the image's tags
    when it runs in the Docker image (its entrypoint sets MLP_LAB_IMAGE* variables)."""
    from mlp.tracking import recorder as tracking

    for var, value in (("MLP_LAB_IMAGE", "mlp-lab:0.1.0"), ("MLP_LAB_IMAGE_DIGEST", "sha256:ab"),
                       ("MLP_LAB_LOCK_HASH", "cd" * 32)):
        monkeypatch.setenv(var, value)
    root = ROOT
    tags = tracking.environment_tags(root, ["optim.lr=0.1"], {"archive_sha256": "ff" * 32,
                                                               "n_train": 10, "seed": 0})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlp.git.dirty"] in ("True", "False")
    assert tags["docker.image"] == "mlp-lab:0.1.0" and tags["docker.digest"] == "sha256:ab"
    assert tags["docker.lock_hash"] == "cd" * 32
    assert tags["mlp.overrides"] == "optim.lr=0.1"
    assert tags["data.archive_sha256"] == "ff" * 32 and tags["data.n_train"] == "10"
    assert "data.seed" not in tags  # the split's other numbers are params
    assert tags["mlp.numpy"] == np.__version__ and tags["mlp.python"].count(".") == 2
    outside = tracking.environment_tags(tmp_path, [], {})  # not a git checkout
    assert "mlflow.source.git.commit" not in outside


def test_gradcheck_command_logs_its_own_run(tmp_path: Path, run_env: dict):
    out = mlp_train(["model.hidden_sizes=[20,15]", "model.activation=tanh", "model.reg=0.1",
                     "gradcheck.max_width=8"], tmp_path, run_env, command="mlp-gradcheck")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PASSED" in out.stdout and "training step in float32: " in out.stdout
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].data.tags["mlp.kind"] == "gradcheck"
    assert runs[0].data.tags["gradcheck.passed"] == "true"
    assert runs[0].data.metrics[metrics.GRADCHECK_MAX] < 1e-7
    assert runs[0].data.tags["gradcheck.step_float32"].startswith("passed ")
    assert 0 < runs[0].data.metrics["rel_error/step_float32"] < 1e-4


LOGGER = """
import sys
from mlp.tracking import recorder as tracking
from mlp.tracking import store
uri, n = sys.argv[1], int(sys.argv[2])
client, exp = store.connect(uri, "parallel")
rec = tracking.start_run(client, exp, f"writer-{n}", {"writer": str(n)}, log_every_steps=1)
for epoch in range(1, 31):
    for step in range(1, 11):
        rec.on_step((epoch - 1) * 10 + step, float(step), 0.1)
    rec.on_epoch(epoch, {"val_acc": epoch / 100, "train_acc": n + epoch / 100})
rec.finish("FINISHED")
"""


def test_four_processes_share_one_sqlite_store(tmp_path: Path, run_env: dict):
    from mlp.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.connect(uri, "parallel")  # the store and experiment exist before the writers
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER, uri, str(n)], env=run_env,
                              stderr=subprocess.PIPE, text=True) for n in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    client, runs = runs_of(tmp_path / "mlflow.db", "parallel")
    assert sorted(r.data.tags["writer"] for r in runs) == ["0", "1", "2", "3"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, metrics.LOSS_BATCH)) == 300
        assert len(client.get_metric_history(r.info.run_id, metrics.ACC_VAL)) == 30


def test_unreachable_server_fails_before_training(tmp_path: Path, run_env: dict):
    start = time.time()
    out = mlp_train([*QUICK, f"tracking.uri=http://127.0.0.1:{free_port()}"], tmp_path, run_env)
    assert out.returncode == 2
    assert "tracking" in out.stderr.lower() and "127.0.0.1" in out.stderr
    assert time.time() - start < 60


def test_logging_through_a_tracking_server(tmp_path: Path, run_env: dict):
    port = free_port()
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
        assert len(client.get_metric_history(runs[0].info.run_id, metrics.ACC_VAL)) == 2
        assert "plots/curves.png" in _all_artifacts(client, runs[0].info.run_id)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_clean_checkout_stays_clean(tmp_path: Path, run_env: dict):
    """The README's commands (a run, then mlp-report) write nothing git would show."""
    checkout = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT),
                    str(checkout)], check=True, timeout=60)
    assert mlp_train(QUICK, checkout, run_env).returncode == 0
    report = subprocess.run([tool("mlp-report")], cwd=checkout, env=run_env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "wrote outputs/reports/mlp-lab/report.html" in report.stdout
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=checkout,
                            capture_output=True, text=True, check=True, timeout=60)
    assert status.stdout == ""
