"""The best model of a sweep, registered as @champion, served by `mlflow models serve` from a
directory outside the repository, answers REST /invocations with class probabilities."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, free_port, tool
from mlflow import MlflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.serve]

SWEEP = ["data=synthetic", "data.synthetic.n_train=300", "data.synthetic.n_test=100",
         "data.val_size=60", "model.hidden_sizes=[16]", "trainer.epochs=2",
         "trainer.batch_size=50", "trainer.train_eval_size=100", "trainer.progress=false",
         "gradcheck.enabled=false", "tracking.plots=false", "optim.lr=0.01,0.03"]




def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_champion_serves_class_probabilities(tmp_path: Path, run_env: dict):
    out = subprocess.run([tool("mlp-train"), "-m", *SWEEP], cwd=tmp_path, env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = next(r for r in client.search_runs(["1"]) if r.data.tags.get("mlp.sweep"))
    name = parent.data.tags["mlp.sweep.registered_model"].split("@")[0]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == parent.data.tags["mlp.sweep.best_run_id"]

    elsewhere = tmp_path / "serving"  # no mlp-lab source here: the model carries its code
    elsewhere.mkdir()
    port = free_port()
    # As with an activated virtualenv: the server starts `uvicorn` from PATH.
    env = run_env | {"MLFLOW_TRACKING_URI": uri, "PYTHONSAFEPATH": "1",
                     "PATH": f"{BIN}{os.pathsep}{run_env.get('PATH', '')}"}
    server = subprocess.Popen(
        [tool("mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(1)
        pixels = np.random.default_rng(0).integers(0, 256, (3, 3072)).tolist()
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": pixels})
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    probs = np.asarray(answer["predictions"])
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    assert (probs >= 0).all()
