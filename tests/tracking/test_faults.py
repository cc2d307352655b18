"""Faults a run must survive (issue #17): nothing lost, nothing leaked, any run reproducible.

Each test breaks something on purpose and checks what the user is left with:
- many processes opening a fresh SQLite store at once (`mlp.store`);
- the tracking store failing in the middle of a run, then coming back (`mlp.spool`,
  `mlp-sync`); with a real `mlflow server` killed and restarted in the slow tests;
- runs killed with SIGKILL, which must not stay RUNNING (`mlp.liveness`);
- configs too large for the machine (`mlp.budget`, wired into config validation);
- `mlp-reproduce` on a real run, and what it reports when numbers differ;
- what already holds and must keep holding: unsafe archives through the public data API,
  SIGTERM + resume giving the very numbers of an uninterrupted run.
Held elsewhere and not repeated here: pickles that would run code
(test_data.py::test_a_pickle_that_would_run_code_is_refused), every unsafe member kind of
`safe_extract` (test_data.py), a checkpoint without pickles (test_train.py), the steps of a
SIGTERM-resumed run (test_cli.py::test_sigterm_kills_the_run_and_resume_finishes_it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import free_port, tool
from helpers import (
    QUICK,
    OutageProxy,
    listing,
    member,
    migrated_store,
    mlp_train,
    point_counts,
    runs_of,
    sweep,
    write_tar,
)
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from mlp import data
from mlp.cli import sync
from mlp.config import schema as configlib
from mlp.core.gradcheck import check_model
from mlp.core.model import MLP
from mlp.tracking import keys as metrics
from mlp.tracking import liveness, reproduce, spool, store
from mlp.tracking import recorder as tracking

LEAN = ["gradcheck.enabled=false", "tracking.plots=false", "tracking.log_model=false"]


def logged_key(run, key: str) -> str:
    """`key` (mlp.metrics) as this run logged it: the contract's name, or the training
    loop's older name for it (runs recorded before the switch to mlp.metrics)."""
    names = [key, *(old for old, new in metrics.EPOCH_KEYS.items() if new == key)]
    return next((k for k in names if k in run.data.metrics), key)


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return [p.step for p in client.get_metric_history(run.info.run_id, logged_key(run, key))]


# -- 1. a fresh SQLite store opened by many processes at once ---------------------------------

OPENER = """
import sys, time
from pathlib import Path
from mlp.tracking import store
uri, gate = sys.argv[1], Path(sys.argv[2])
(gate.parent / f"ready-{sys.argv[3]}").touch()
while not gate.exists():  # MLflow is imported: wait for the others, then open together
    time.sleep(0.01)
print(store.connect(uri, "crowd")[1])
"""


def _alembic_leftovers(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp_%'")]


def test_processes_create_one_fresh_store_at_once(tmp_path: Path, run_env: dict):
    """Without the lock, 7 of 8 such processes crashed in MLflow's migrations (3 of 4)."""
    db, gate = tmp_path / "mlflow.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, f"sqlite:///{db}", str(gate),
                               str(n)], env=run_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(4)]
    _wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 4)
    gate.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, the same id
    assert _alembic_leftovers(db) == []
    assert (tmp_path / "mlflow.db.lock").exists()


@pytest.mark.parametrize(("name", "says"), [("broken.db", "file is not a database"),
                                             ("no/dir.db", "no does not exist")])
def test_a_store_that_cannot_be_opened_is_a_tracking_error(tmp_path: Path, name: str,
                                                          says: str):
    """StoreError is what mlp-train turns into a message and exit 2 (test_cli.py::
    test_unreachable_server_fails_before_training)."""
    (tmp_path / "broken.db").write_bytes(b"not a database" * 100)
    with pytest.raises(store.StoreError, match=says):
        store.connect(f"sqlite:///{tmp_path / name}", "broken")


@pytest.mark.slow
def test_eight_runs_started_at_once_on_a_fresh_store_all_finish(tmp_path: Path, run_env: dict):
    procs = [subprocess.Popen([tool("mlp-train"), *QUICK, *LEAN, f"seed={n}",
                               f"hydra.run.dir={tmp_path / f'run{n}'}"], cwd=tmp_path,
                              env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for n in range(8)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e[-2000:] for e in errors]
    client, runs = runs_of(tmp_path / "mlflow.db")
    assert sorted(r.data.params["seed"] for r in runs) == [str(n) for n in range(8)]
    counts = set()
    for run in runs:
        assert run.info.status == "FINISHED"
        assert steps(client, run, metrics.ACC_VAL) == [1, 2]
        assert metrics.BEST_EPOCH in run.data.metrics  # logged with the final metrics
        counts.add(tuple((key, len(client.get_metric_history(run.info.run_id, key)))
                         for key in sorted(run.data.metrics)))
    assert len(counts) == 1  # every run has the same keys with the same number of points
    assert _alembic_leftovers(tmp_path / "mlflow.db") == []


# -- 2. the tracking store fails in the middle of a run ---------------------------------------


class _Outage:
    """Makes every client's log_batch and set_terminated fail, as a dead server does,
    until `end()`; counts the log_batch calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.down, self.calls = True, 0
        for name in ("log_batch", "set_terminated"):
            monkeypatch.setattr(MlflowClient, name, self._failing(getattr(MlflowClient, name)))

    def _failing(self, real):
        def call(client: MlflowClient, *args, **kwargs):
            self.calls += real.__name__ == "log_batch"
            if self.down:
                raise MlflowException("API request to http://127.0.0.1:1/ failed: "
                                      "Max retries exceeded (Connection refused)")
            return real(client, *args, **kwargs)
        return call

    def end(self) -> None:
        self.down = False


def _recorder(tmp_path: Path, name: str) -> tuple[str, tracking.RunRecorder]:
    uri = migrated_store(tmp_path / "mlflow.db")
    client, experiment = store.connect(uri, name)
    return uri, tracking.start_run(client, experiment, name, {}, log_every_steps=1,
                                   spool_path=tmp_path / "ckpt" / spool.SPOOL_NAME)


def _epochs(recorder: tracking.RunRecorder, first: int, last: int) -> None:
    for epoch in range(first, last + 1):
        recorder.on_step(epoch * 10, 1.0 / epoch, 0.1)
        recorder.on_epoch(epoch, {"val": epoch / 10})
    recorder.sink.flush(wait=True)


def test_a_store_down_to_the_end_leaves_everything_in_the_spool_for_mlp_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    uri, recorder = _recorder(tmp_path, "outage")
    _epochs(recorder, 1, 2)
    outage = _Outage(monkeypatch)
    with pytest.warns(UserWarning, match="kept in .*tracking-spool.jsonl"):
        _epochs(recorder, 3, 5)
    recorder.set_tags({"checkpoint": "/somewhere/last.npz"})
    with pytest.warns(UserWarning, match=r"6 metric points.*mlp-sync .*tracking-spool.jsonl"):
        recorder.finish("FINISHED")
    # one try, then the store is left alone (RETRY_AFTER) until the forced try at the end
    assert outage.calls == 2
    path = tmp_path / "ckpt" / spool.SPOOL_NAME
    kinds = [r["kind"] for r in spool.Spool(path).read()]
    assert kinds.count("metric") == 6 and kinds[-1] == "status"
    client = MlflowClient(uri)
    assert client.get_run(recorder.run_id).info.status == "RUNNING"
    assert [p.step for p in client.get_metric_history(recorder.run_id, "val")] == [1, 2]

    outage.end()
    assert sync.main([str(tmp_path)]) == 0
    assert "sent 6 metric points, 4 tags and 1 final statuses of 1 run(s)" in (
        capsys.readouterr().out)
    run = client.get_run(recorder.run_id)
    assert run.info.status == "FINISHED"
    assert [(p.step, p.value) for p in client.get_metric_history(recorder.run_id, "val")] == [
        (e, e / 10) for e in range(1, 6)]
    assert len(client.get_metric_history(recorder.run_id, metrics.LOSS_BATCH)) == 5
    assert run.data.tags["checkpoint"] == "/somewhere/last.npz"
    assert liveness.HEARTBEAT_TAG in run.data.tags
    assert not path.exists()


def test_a_store_that_comes_back_gets_the_spool_first_and_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri, recorder = _recorder(tmp_path, "blip")
    monkeypatch.setattr(recorder.sink, "RETRY_AFTER", 0.0)
    outage = _Outage(monkeypatch)
    with pytest.warns(UserWarning, match="does not answer"):
        _epochs(recorder, 1, 3)
    assert spool.Spool(tmp_path / "ckpt" / spool.SPOOL_NAME).pending()
    outage.end()
    _epochs(recorder, 4, 4)
    assert not (tmp_path / "ckpt" / spool.SPOOL_NAME).exists()
    recorder.finish("FINISHED")
    client = MlflowClient(uri)
    history = client.get_metric_history(recorder.run_id, "val")
    assert [p.step for p in history] == [1, 2, 3, 4]
    assert client.get_run(recorder.run_id).info.status == "FINISHED"


def test_results_the_store_refuses_at_the_end_do_not_fail_a_trained_run(tmp_path: Path):
    _, recorder = _recorder(tmp_path, "results")
    with pytest.warns(UserWarning, match="figures not recorded.*checkpoint beside"):
        with recorder.sink.unless_offline("figures"):
            raise MlflowException("Max retries exceeded (Connection refused)")
    recorder.finish("FINISHED")
    bare = tracking.start_run(recorder.client,
                              recorder.client.get_run(recorder.run_id).info.experiment_id,
                              "no spool", {})
    with pytest.raises(MlflowException), bare.sink.unless_offline("figures"):
        raise MlflowException("without a spool nothing is kept: the error stands")
    bare.finish("FAILED")


def test_an_epoch_is_stored_or_on_disk_when_on_epoch_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The trainer writes the epoch's checkpoint when on_epoch returns: by then the epoch's
    points are in the store, or, with the store down, in the spool (no flush asked)."""
    uri, recorder = _recorder(tmp_path, "durable")
    recorder.on_step(10, 0.5, 0.1)
    recorder.on_epoch(1, {"val_acc": 0.1})
    client = MlflowClient(uri)
    assert len(client.get_metric_history(recorder.run_id, metrics.ACC_VAL)) == 1
    assert len(client.get_metric_history(recorder.run_id, metrics.LOSS_BATCH)) == 1
    _Outage(monkeypatch)
    recorder.on_step(20, 0.4, 0.1)
    with pytest.warns(UserWarning, match="kept in"):
        recorder.on_epoch(2, {"val_acc": 0.2})
    kept = spool.Spool(tmp_path / "ckpt" / spool.SPOOL_NAME).read()
    assert {(r["key"], r["step"]) for r in kept if r["kind"] == "metric"} == {
        (metrics.ACC_VAL, 2), (metrics.LOSS_BATCH, 20)}


def test_the_gradient_check_is_recorded_when_it_ends(tmp_path: Path):
    uri, recorder = _recorder(tmp_path, "gradcheck")
    net = MLP(input_dim=6, hidden_sizes=[5], num_classes=3, reg=0.1, dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    recorder.log_gradcheck(check_model(net, rng.standard_normal((4, 6)), np.array([0, 1, 2, 1])))
    stored = MlflowClient(uri).get_run(recorder.run_id).data.metrics
    assert metrics.GRADCHECK_MAX in stored and len([k for k in stored
                                                    if k.startswith("rel_error/")]) >= 7


def test_a_resumed_run_does_not_log_again_the_points_it_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Killed after epoch 3 was recorded (epoch 2 stored, 3 in the spool) but before its
    checkpoint: the resume re-runs epoch 3 from the checkpoint of epoch 2."""
    uri, first = _recorder(tmp_path, "resumed")
    _epochs(first, 1, 2)
    outage = _Outage(monkeypatch)
    with pytest.warns(UserWarning, match="kept in"):
        _epochs(first, 3, 3)
    outage.end()
    again = tracking.start_run(first.client, "unused on a resume", "resumed",
                               {"mlp.attempt": "2"}, run_id=first.run_id, log_every_steps=1,
                               spool_path=first.sink.spool.path)
    _epochs(again, 3, 4)
    again.finish("FINISHED")
    client = MlflowClient(uri)
    for key, expected in (("val", [1, 2, 3, 4]), (metrics.LOSS_BATCH, [10, 20, 30, 40])):
        assert sorted(p.step for p in client.get_metric_history(first.run_id, key)) == expected
    assert client.get_run(first.run_id).data.tags["mlp.attempt"] == "2"


def test_a_store_failing_while_the_run_is_created(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    """Creating the run is tried OPEN_TRIES times; then a StoreError that names the store
    and says that nothing was trained (mlp-train: exit 2, test_cli)."""
    monkeypatch.setattr(tracking, "OPEN_WAIT", 0.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, experiment = store.connect(uri, "create")
    real, calls = MlflowClient.create_run, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= fails:
            raise MlflowException("API request failed: 503 Service Unavailable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", failing)
    fails = tracking.OPEN_TRIES - 1
    recorder = tracking.start_run(client, experiment, "late", {})
    assert len(calls) == tracking.OPEN_TRIES
    recorder.finish("FINISHED")
    calls.clear()
    fails = tracking.OPEN_TRIES
    with pytest.raises(store.StoreError, match=rf"{uri} does not answer: could not create the "
                       rf"run after {tracking.OPEN_TRIES} tries.*nothing was trained"):
        tracking.start_run(client, experiment, "never", {})


def test_params_config_datasets_and_tags_do_not_stop_a_run_when_the_store_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        mlp_log: pytest.LogCaptureFixture):
    """Once the run exists: params and tags are spooled like metric points, the config
    files kept beside the spool (said once the outage was warned about), the datasets
    named in a warning, and mlp-sync sends what was kept."""
    uri, recorder = _recorder(tmp_path, "start")
    outage = _Outage(monkeypatch)
    refused = MlflowException("API request failed: 503 Service Unavailable")
    upload = MlflowClient.log_artifacts
    for name in ("log_artifact", "log_artifacts", "log_inputs"):
        monkeypatch.setattr(MlflowClient, name, lambda *a, **k: (_ for _ in ()).throw(refused))
    resolved = OmegaConf.to_container(OmegaConf.structured(configlib.Config))
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text("optim:\n  lr: 0.1\n")
    mlp_log.set_level(logging.INFO, logger="mlp")
    with pytest.warns(UserWarning) as caught:
        recorder.log_config(resolved, ["optim.lr=0.1"], hydra_dir)
        recorder.log_datasets({"train": mlflow.data.from_numpy(np.zeros((2, 3)), name="d")})
        recorder.on_epoch(1, {"val_acc": 0.3})
    said = " ".join(str(w.message) for w in caught)
    assert "does not answer" in said and "the datasets not recorded" in said
    assert "kept in" in said
    assert "the config files not recorded yet" in mlp_log.text
    records = spool.Spool(tmp_path / "ckpt" / spool.SPOOL_NAME).read()
    kinds = [r["kind"] for r in records]
    assert kinds.count("param") == len(tracking.run_params(resolved)) and "metric" in kinds
    [kept] = [r for r in records if r["kind"] == "files"]
    assert kept["paths"] == ["config/hydra/config.yaml", "config/overrides.txt",
                             "config/resolved.yaml"]
    outage.end()
    monkeypatch.setattr(MlflowClient, "log_artifacts", upload)
    assert sync.main([str(tmp_path / "ckpt")]) == 0
    assert "params, 3 files" in capsys.readouterr().out
    client = MlflowClient(uri)
    run = client.get_run(recorder.run_id)
    assert run.data.params == tracking.run_params(resolved)
    assert run.data.metrics[metrics.ACC_VAL] == 0.3
    stored = client.download_artifacts(recorder.run_id, "config", str(tmp_path / "back"))
    assert (Path(stored) / "hydra" / "config.yaml").read_text() == "optim:\n  lr: 0.1\n"
    assert (Path(stored) / "overrides.txt").read_text() == "optim.lr=0.1\n"
    assert not Path(kept["dir"]).exists()  # sent, then removed


def test_a_full_disk_under_the_spool_ends_the_run_failed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    """The store fails and the spool cannot be written: the epoch is not durable, so
    on_epoch raises (before the trainer writes the checkpoint); the run ends FAILED with
    the error as tags once the store answers."""
    uri, recorder = _recorder(tmp_path, "full")
    outage = _Outage(monkeypatch)

    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.Spool, "_append", full)
    with pytest.raises(spool.SpoolError, match="the disk is full"), recorder.finishing():
        try:
            recorder.on_epoch(1, {"val_acc": 0.3})
        finally:
            outage.end()  # the store answers again when the run ends
    run = MlflowClient(uri).get_run(recorder.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error.type"] == "SpoolError"


def test_mlp_sync_keeps_what_it_cannot_send_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture):
    path = tmp_path / spool.SPOOL_NAME
    points = [Metric("val", 0.5, 1000, 1), Metric("val", 0.6, 2000, 2)]
    spool.Spool(path).append(spool.metric_records("sqlite:////x.db", "r1", points))
    assert sync.main([str(path), "--tracking-uri",
                       f"sqlite:///{tmp_path / 'missing' / 'x.db'}"]) == 1
    assert "2 records left in the file" in capsys.readouterr().err
    assert [r["value"] for r in spool.Spool(path).read()] == [0.5, 0.6]
    assert sync.main([str(tmp_path / "empty-dir-without-spools")]) == 2




@contextlib.contextmanager
def mlflow_server(db: Path, port: int, env: dict) -> Iterator[str]:
    """A lean `mlflow server` on 127.0.0.1:port over `db`; killed (SIGKILL, the whole
    process group, as a crash would) when the block ends."""
    proc = subprocess.Popen(
        [tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
         "1", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
         str(db.parent / "artifacts")],
        cwd=db.parent, env=dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.3)
        else:
            raise TimeoutError(f"mlflow server on port {port} did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("back", ["before the end", "after the end"])
def test_a_tracking_server_killed_mid_run(tmp_path: Path, run_env: dict, back: str):
    """The server dies after the first epoch and comes back either while the run trains
    (everything arrives, no spool left) or after it ended (the run ends within a bounded
    time saying where the spool is; mlp-sync sends it). Training is paused (SIGSTOP) while
    the server is killed or restarted, so no timing decides the outcome."""
    port, db, ckpt = free_port(), tmp_path / "server" / "mlflow.db", tmp_path / "ckpt"
    db.parent.mkdir()
    epochs = 200  # long enough to outlive a failing call (seconds) after the server dies
    args = [*QUICK, *LEAN, f"trainer.epochs={epochs}", f"trainer.checkpoint_dir={ckpt}",
            "tracking.experiment=outage", f"tracking.uri=http://127.0.0.1:{port}"]
    spool_file = ckpt / spool.SPOOL_NAME
    with mlflow_server(db, port, run_env) as uri:
        train = subprocess.Popen([tool("mlp-train"), *args], cwd=tmp_path, env=run_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(uri)

        def recorded() -> bool:
            exp = client.get_experiment_by_name("outage")
            runs = exp and client.search_runs([exp.experiment_id])
            return bool(runs) and len(runs[0].data.metrics) > 0

        _wait_for(recorded)
        train.send_signal(signal.SIGSTOP)
    try:  # the server is dead: let the run go on, and see it spool
        train.send_signal(signal.SIGCONT)
        if back == "before the end":
            _wait_for(spool_file.exists)
            train.send_signal(signal.SIGSTOP)
            with mlflow_server(db, port, run_env) as uri:
                train.send_signal(signal.SIGCONT)
                _, err = train.communicate(timeout=300)
                sync = None
                assert not spool_file.exists()
                client = MlflowClient(uri)
                runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
                history = steps(client, runs[0], metrics.ACC_VAL)
        else:
            _, err = train.communicate(timeout=300)  # bounded without any server
            assert spool_file.exists()
            assert f"mlp-sync {spool_file}" in err
            with mlflow_server(db, port, run_env) as uri:
                sync = subprocess.run([tool("mlp-sync"), str(ckpt)], env=run_env,
                                      capture_output=True, text=True, timeout=300)
                client = MlflowClient(uri)
                runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
                history = steps(client, runs[0], metrics.ACC_VAL)
    finally:
        train.kill()
    # trained either way; a record still in the spool at the end is incomplete: exit 4
    assert train.returncode == (0 if sync is None else 4), err[-3000:]
    assert runs[0].data.tags[metrics.RECORD_TAG] == "complete"
    if sync is not None:
        assert sync.returncode == 0, sync.stderr
        assert "nothing left" in sync.stdout and "record complete" in sync.stdout
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert history == list(range(1, epochs + 1))
    assert metrics.BEST_EPOCH in runs[0].data.metrics  # logged with the final metrics


class _EpochOutage:
    """What the proxy refuses while open: every log-batch carrying epoch points (step >= 1:
    learning curves, final metrics) after the first one, so that part of a run arrives;
    the run's start, params, tags, end and a sweep parent's summary (at step 0) pass."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, body: dict) -> bool:
        if not any(int(m.get("step", 0)) >= 1 for m in body.get("metrics", [])):
            return False
        self.seen += 1
        return self.seen > 1


def _incomplete_through(proxy: OutageProxy, args: list[str], ckpt: Path, cwd: Path,
                        env: dict):
    """One `mlp-train args` (naming its experiment) through the proxy, opened, with its
    checkpoints and spool in `ckpt`: it must exit 4 with the proxy having refused
    something and its last line naming `mlp-sync ckpt`; returns its run."""
    proxy.open = True
    out = mlp_train([*args, f"tracking.uri={proxy.url}", f"trainer.checkpoint_dir={ckpt}"],
                    cwd, env)
    assert out.returncode == 4, out.stderr[-3000:]
    assert proxy.refused > 0
    assert out.stderr.strip().splitlines()[-1].endswith(f"send it with: mlp-sync {ckpt}")
    experiment = next(a for a in args if a.startswith("tracking.experiment="))
    (run,) = _runs(MlflowClient(proxy.upstream), experiment.partition("=")[2])
    return run


def _runs(client: MlflowClient, experiment: str, parents: bool = False) -> list:
    """The training runs of an experiment, or its sweep parents."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if (metrics.SWEEP_TAG in r.data.tags) == parents]


@pytest.mark.slow
@pytest.mark.e2e
def test_a_partial_outage_leaves_a_receipt_that_mlp_sync_and_the_next_sweep_complete(
        tmp_path: Path, run_env: dict):
    """A proxy answers 503 to the run's log-batch calls for part of it (the store takes its
    start, tags and end): the run ends FINISHED with `mlp.record` incomplete and exit 4,
    naming the mlp-sync command, which then completes it with the points of a clean run of
    the same seed. In a one-job sweep, the child is incomplete (exit 4, the parent's outcome
    says so), and the same sweep again sends its spool instead of skipping it as finished."""
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    args = [*QUICK, *LEAN, "trainer.epochs=4", "seed=3"]
    with mlflow_server(db, free_port(), run_env) as uri, OutageProxy(uri, _EpochOutage()) as proxy:
        client = MlflowClient(uri)
        clean = mlp_train([*args, f"tracking.uri={uri}", "tracking.experiment=clean"],
                          tmp_path, run_env)
        assert clean.returncode == 0, clean.stderr[-3000:]
        (clean_run,) = _runs(client, "clean")
        assert clean_run.data.tags[metrics.RECORD_TAG] == "complete"
        expected = point_counts(client, clean_run.info.run_id)

        ckpt = tmp_path / "ckpt"
        run = _incomplete_through(proxy, [*args, "tracking.experiment=partial"], ckpt,
                                  tmp_path, run_env)
        held = point_counts(client, run.info.run_id)
        missing = sum(expected.values()) - sum(held.values())
        assert run.info.status == "FINISHED" and missing > 0
        assert run.data.tags[metrics.RECORD_TAG].startswith(f"incomplete: {missing} points, ")
        assert run.data.tags[metrics.RECORD_TAG].endswith(f" in {ckpt / spool.SPOOL_NAME}")
        assert json.loads(run.data.tags[metrics.RECORD_EXPECTED_TAG])["points"] == expected

        proxy.open = False
        synced = subprocess.run([tool("mlp-sync"), str(ckpt)], env=run_env,
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0, synced.stderr
        assert f"run {run.info.run_id}: record complete" in synced.stdout
        assert client.get_run(run.info.run_id).data.tags[metrics.RECORD_TAG] == "complete"
        assert point_counts(client, run.info.run_id) == expected

        proxy.fails, proxy.open = _EpochOutage(), True
        grid = [*args, f"tracking.uri={proxy.url}", "tracking.experiment=sweep",
                f"trainer.checkpoint_dir={tmp_path / 'sweep-ckpt'}"]
        first = sweep(grid, tmp_path, run_env)
        assert first.returncode == 4, first.stderr[-3000:]
        assert "1 of 1 children trained, but their record is incomplete" in first.stderr
        assert f"mlp-sync {tmp_path / 'sweep-ckpt'}" in first.stderr
        (parent,) = _runs(client, "sweep", parents=True)
        assert parent.data.tags["mlp.sweep.outcome"] == "1 of 1 incomplete"
        (child,) = _runs(client, "sweep")
        assert child.info.status == "FINISHED"
        assert child.data.tags[metrics.RECORD_TAG].startswith("incomplete: ")

        proxy.open = False
        again = sweep(grid, tmp_path, run_env)
        assert again.returncode == 0, again.stderr[-3000:]
        (repaired,) = _runs(client, "sweep")  # sent, not trained again
        assert repaired.info.run_id == child.info.run_id
        assert repaired.data.tags[metrics.RECORD_TAG] == "complete"
        assert point_counts(client, child.info.run_id) == expected
        assert client.get_run(parent.info.run_id).data.tags["mlp.sweep.outcome"] == (
            "1 of 1 finished")


@pytest.mark.slow
@pytest.mark.e2e
def test_files_an_artifact_store_refuses_are_kept_counted_and_sent_by_mlp_sync(
        tmp_path: Path, run_env: dict):
    """A proxy answers 503 to every artifact upload while the tracking server takes the
    points: the run trains, ends FINISHED with its points all stored and `mlp.record`
    counting the files it lacks, and exits 4 naming mlp-sync; mlp-sync uploads the kept
    files, and the run then holds the very files of a clean run of the same seed."""
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    args = [*QUICK, "trainer.epochs=2", "seed=5"]
    with mlflow_server(db, free_port(), run_env) as uri, OutageProxy(
            uri, lambda body: False, uploads=True) as proxy:
        client = MlflowClient(uri)
        clean = mlp_train([*args, f"tracking.uri={uri}", "tracking.experiment=clean"],
                          tmp_path, run_env)
        assert clean.returncode == 0, clean.stderr[-3000:]
        (clean_run,) = _runs(client, "clean")
        files = _files(client, clean_run.info.run_id)
        assert "plots/curves.png" in files and "model_npz/model.npz" in files

        ckpt = tmp_path / "ckpt"
        run = _incomplete_through(proxy, [*args, "tracking.experiment=refused"], ckpt,
                                  tmp_path, run_env)
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert point_counts(client, run_id) == point_counts(client, clean_run.info.run_id)
        assert _files(client, run_id) == {}  # the files went nowhere but beside the spool
        assert run.data.tags[metrics.RECORD_TAG] == (
            f"incomplete: 0 points, 0 tags, {len(files)} files, 1 models in "
            f"{ckpt / spool.SPOOL_NAME}")
        assert not _models(client, run)  # not logged: kept beside the spool too

        proxy.open = False
        synced = subprocess.run([tool("mlp-sync"), str(ckpt)], env=run_env,
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0, synced.stderr
        assert f"run {run_id}: record complete" in synced.stdout
        assert client.get_run(run_id).data.tags[metrics.RECORD_TAG] == "complete"
        assert _files(client, run_id).keys() == files.keys()
        assert _models(client, run) == _models(client, clean_run)  # logged by mlp-sync
        # The same bytes where nothing depends on the clock or the run's own id.
        same = [p for p in files if p.startswith(("plots/", "model_npz/", "gradcheck/"))]
        assert same and all(_files(client, run_id)[p] == files[p] for p in same)


def _models(client: MlflowClient, run) -> list[tuple[str, str]]:
    """(status, the artifacts' names) of the READY servable models logged from `run`."""
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run.info.run_id}'")
    return sorted((str(m.status), ",".join(sorted(
        a.path for a in client.list_logged_model_artifacts(m.model_id))))
        for m in found if str(m.status).endswith("READY"))


def _files(client: MlflowClient, run_id: str, folder: str | None = None) -> dict[str, int]:
    """The run's artifact files (every folder, recursively), with their sizes."""
    found: dict[str, int] = {}
    for info in client.list_artifacts(run_id, folder):
        found |= _files(client, run_id, info.path) if info.is_dir else {info.path: info.file_size}
    return found


# -- 5. runs killed with SIGKILL --------------------------------------------------------------


def test_why_dead_tells_a_dead_process_from_a_live_one():
    here, me = socket.gethostname(), liveness.process_tags()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    now = time.time()
    assert liveness.why_dead(me, 0, now) is None
    assert "is gone" in liveness.why_dead({**me, liveness.PID_TAG: dead}, 0, now)
    # the pid is alive but belongs to a process started at another time: reused
    reused = {**me, liveness.PID_START_TAG: "1"}
    assert "is gone" in liveness.why_dead(reused, 0, now)
    far = {liveness.HOST_TAG: here + "-elsewhere", liveness.PID_TAG: "1",
           liveness.HEARTBEAT_TAG: f"{now - 3 * 3600:.0f}"}
    assert liveness.why_dead(far, 0, now, stale_after=4 * 3600) is None
    assert "no heartbeat" in liveness.why_dead(far, 0, now, stale_after=2 * 3600)
    assert liveness.why_dead({}, 0, now) is None  # no process tags: cannot tell


def test_reaping_ends_only_the_runs_whose_process_is_gone(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, experiment = store.connect(uri, "reap")
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone_tags = {liveness.HOST_TAG: socket.gethostname(), liveness.PID_TAG: str(gone.pid),
                 liveness.PID_START_TAG: liveness.process_start(gone.pid)}
    dead = client.create_run(experiment, tags=gone_tags).info.run_id
    alive = client.create_run(experiment, tags=liveness.process_tags()).info.run_id
    unknown = client.create_run(experiment).info.run_id
    assert liveness.reap_dead_runs(client) == []
    gone.kill()
    gone.wait()
    reaped = liveness.reap_dead_runs(client)
    assert [run_id for run_id, _ in reaped] == [dead]
    run = client.get_run(dead)
    assert run.info.status == "KILLED"
    assert run.data.tags[liveness.REASON_TAG] == (
        f"process {gone.pid} on {socket.gethostname()} is gone")
    assert [client.get_run(r).info.status for r in (alive, unknown)] == ["RUNNING"] * 2


@pytest.mark.slow
def test_a_sigkilled_run_is_marked_killed_by_the_next_run(tmp_path: Path, run_env: dict):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([tool("mlp-train"), *QUICK, *LEAN, "trainer.epochs=400",
                             f"trainer.checkpoint_dir={ckpt}"], cwd=tmp_path, env=run_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for((ckpt / "last.npz").exists)
    proc.kill()
    proc.wait()
    _, runs = runs_of(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs] == ["RUNNING"]
    # the epoch's record (metrics and heartbeat) is stored before its checkpoint is written
    assert liveness.HEARTBEAT_TAG in runs[0].data.tags
    out = mlp_train([*QUICK, *LEAN, "trainer.epochs=1"], tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = runs_of(tmp_path / "mlflow.db")
    killed = client.get_run(runs[-1].info.run_id)
    assert killed.info.status == "KILLED"
    assert f"process {proc.pid}" in killed.data.tags[liveness.REASON_TAG]
    assert "marked KILLED" in out.stdout + out.stderr  # Hydra logs to stdout


# -- 6. a config too large for the machine ----------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    ([*QUICK, "model.hidden_sizes=[10000000]"], "model.hidden_sizes=[10000000] is not allowed"),
    (["trainer.batch_size=100000"], "at most the 45000 images of the training split"),
])
def test_a_config_too_large_is_refused_before_any_work(tmp_path: Path, run_env: dict,
                                                       args: list[str], says: str):
    """Before any data is loaded (the second runs on the full CIFAR-10, not at hand)."""
    out = mlp_train(args, tmp_path, run_env)
    assert out.returncode == 2
    assert says in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


# -- 7. reproducing a run from its record -----------------------------------------------------


@pytest.mark.parametrize("value", [None, True, False, 0, 7, 0.1, 1e-5, 5e-4, 2.0 / 3, -1.5,
                                   [], [1024, 1024], "relu", "a b,c", "it's", "/x/y=z.tar.gz",
                                   "123"])
def test_override_values_read_back_as_the_very_same_value(value):
    parsed = OverridesParser.create().parse_overrides(
        [f"key={reproduce.override_value(value)}"])[0].value()
    assert parsed == value and type(parsed) is type(value)


def _run_with(client: MlflowClient, experiment: str, points: dict[str, list[float]]) -> str:
    run_id = client.create_run(experiment).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 1000 + i, i + 1)
                                      for k, vs in points.items() for i, v in enumerate(vs)])
    return run_id


def test_compare_finds_every_different_or_missing_point(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("compare")
    timing = metrics.EPOCH_TIME
    a = _run_with(client, experiment, {"val": [0.1, 0.2, 0.3], "nan": [float("nan")],
                                       timing: [1.0]})
    b = _run_with(client, experiment, {"val": [0.1, 0.25], "nan": [float("nan")],
                                       timing: [2.0]})
    compared, diffs = reproduce.compare_runs(client, a, b)
    assert compared == 4  # val x 3 steps, nan x 1; timing is not compared
    assert diffs == [reproduce.Difference("val", 2, 0.2, 0.25),
                     reproduce.Difference("val", 3, 0.3, None)]
    table = reproduce.difference_table(diffs)
    assert "val     2     0.2       0.25          +0.05\n" in table
    assert "(missing)" in table
    assert reproduce.compare_runs(client, a, a) == (4, [])


def test_a_trial_is_reproduced_as_a_run_of_its_own_and_a_parent_is_refused(tmp_path: Path):
    """An Optuna trial's recorded `trial.*` (its study) are not passed on: the
    reproduction reports to no study; a sweep's parent says how to run the sweep again."""
    resolved = OmegaConf.to_container(OmegaConf.structured(configlib.Config))
    resolved["trial"] = {"study": "s", "storage": "sqlite:///o.db", "id": 3}
    args = reproduce.overrides_for(resolved, "sqlite:///x.db", "e", tmp_path)
    assert not [a for a in args if a.startswith("trial.")] and "optim.lr=0.01" in args
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("e"), tags={
        metrics.SWEEP_TAG: "true", "mlp.sweep.overrides": "optim.lr=0.01,0.1"}).info.run_id
    with pytest.raises(reproduce.ReproduceError,
                       match=r"sweep's parent.*mlp-train -m optim.lr=0.01,0.1"):
        reproduce.reproduce(client, parent, tmp_path, tmp_path)


@pytest.mark.slow
def test_mlp_reproduce_on_a_real_run(tmp_path: Path, run_env: dict):
    out = mlp_train([*QUICK, "tracking.plots=false", "tracking.log_model=false"], tmp_path,
                    run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    client, (original,) = runs_of(tmp_path / "mlflow.db")
    run_id = original.info.run_id
    done = subprocess.run([tool("mlp-reproduce"), run_id], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "data.archive_sha256: same" in done.stdout
    _, runs = runs_of(tmp_path / "mlflow.db")
    copy = next(r for r in runs if r.info.run_id != run_id)
    assert copy.data.tags[reproduce.REPRODUCES_TAG] == run_id
    compared, _ = reproduce.compare_runs(client, run_id, copy.info.run_id)
    assert f"all {compared} metric points are equal" in done.stdout and compared > 20
    # a run whose record was changed afterwards no longer reproduces: exit 1 and a table
    client.log_metric(run_id, logged_key(original, metrics.ACC_VAL), 0.123456, step=1,
                      timestamp=1)
    again = subprocess.run([tool("mlp-reproduce"), run_id], cwd=tmp_path, env=run_env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "0.123456" in again.stdout and "(missing)" in again.stdout
    assert subprocess.run([tool("mlp-reproduce"), "0" * 32], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True).returncode == 2


# -- 9. what holds today and must keep holding ------------------------------------------------


@pytest.mark.parametrize("bad", [
    [(member("cifar-10-batches-py/../../escaped"), b"x")],
    [(member("cifar-10-batches-py/link", b"2", "../.."), None),
     (member("cifar-10-batches-py/link/escaped"), b"x")],
])
def test_an_archive_that_escapes_is_refused_by_load_cifar10(tmp_path: Path, bad: list):
    genuine = data.make_synthetic_archive(tmp_path / "genuine.tar.gz", n_train=50, n_test=10)
    import tarfile

    with tarfile.open(genuine) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    archive = write_tar(tmp_path / "evil.tar.gz", members + bad)
    root = tmp_path / "deep" / "er" / "root"
    root.mkdir(parents=True)
    before = listing(tmp_path)
    with pytest.raises(data.DataError, match="refusing to extract"):
        data.load_cifar10(root, archive, data.file_digest(archive), progress=False)
    assert not any("escaped" in p for p in listing(tmp_path) - before)


@pytest.mark.slow
def test_sigterm_and_resume_give_the_numbers_of_an_uninterrupted_run(tmp_path: Path,
                                                                      run_env: dict):
    ckpt = tmp_path / "ckpt"
    args = [*QUICK, *LEAN, "trainer.prefetch=false", "tracking.log_every_steps=1"]
    proc = subprocess.Popen([tool("mlp-train"), *args, "trainer.epochs=400",
                             f"trainer.checkpoint_dir={ckpt}"], cwd=tmp_path, env=run_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for((ckpt / "last.npz").exists)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    # where the signal landed depends on the machine's speed: compare with an
    # uninterrupted run that ends two epochs after it
    with np.load(ckpt / "last.npz", allow_pickle=False) as f:
        epochs = json.loads(f["meta"].item())["epoch"] + 2
    assert mlp_train([*args, f"trainer.epochs={epochs}"], tmp_path, run_env).returncode == 0
    out = mlp_train([*args, f"trainer.epochs={epochs}", f"trainer.checkpoint_dir={ckpt}",
                     f"trainer.resume={ckpt / 'last.npz'}"], tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = runs_of(tmp_path / "mlflow.db")
    (whole,) = [r for r in runs if r.data.params["trainer.epochs"] == str(epochs)]
    (resumed,) = [r for r in runs if r.info.run_id != whole.info.run_id]
    compared, diffs = reproduce.compare_runs(client, whole.info.run_id, resumed.info.run_id)
    assert diffs == [] and compared > 50


def _new_checkpoint(path: Path, since: int, proc: subprocess.Popen) -> int | None:
    """Wait until `path` is written again after mtime `since`; its new mtime, or None when
    the process ended first."""
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            mtime = path.stat().st_mtime_ns
            if mtime != since:
                return mtime
        time.sleep(0.002)
    return None


@pytest.mark.slow
def test_sigkill_at_any_moment_and_resume_lose_nothing_and_double_nothing(tmp_path: Path,
                                                                          run_env: dict):
    """SIGKILL 0-300 ms after a checkpoint is written, six times in a row, each attempt
    resumed from the last checkpoint as the README says (`trainer.resume=`): the run
    ends with the very keys, steps and number of points per key of an uninterrupted run
    of the same seed (values too, except the timings), gradient check included. Synthetic
    data; ~1-2 min."""
    epochs, ckpt = 80, tmp_path / "ckpt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*QUICK, "tracking.plots=false", "tracking.log_model=false",
            "trainer.prefetch=false", "tracking.log_every_steps=1", f"trainer.epochs={epochs}",
            f"tracking.uri={uri}"]
    whole = mlp_train(args, tmp_path, run_env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    client, (reference,) = runs_of(tmp_path / "mlflow.db")
    mtime = 0
    for attempt, delay in enumerate((0.0, 0.3, 0.01, 0.1, 0.05, 0.2)):
        resume = [f"trainer.resume={ckpt / 'last.npz'}"] if attempt else []
        proc = subprocess.Popen([tool("mlp-train"), *args, f"trainer.checkpoint_dir={ckpt}",
                                 *resume], cwd=tmp_path, env=run_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mtime = _new_checkpoint(ckpt / "last.npz", mtime, proc)
        assert mtime is not None, "the run ended before it could be killed: raise epochs"
        time.sleep(delay)
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
    last = mlp_train([*args, f"trainer.checkpoint_dir={ckpt}",
                      f"trainer.resume={ckpt / 'last.npz'}"], tmp_path, run_env)
    assert last.returncode == 0, last.stderr[-3000:]
    _, runs = runs_of(tmp_path / "mlflow.db")
    (resumed,) = [r for r in runs if r.info.run_id != reference.info.run_id]
    assert resumed.info.status == "FINISHED"

    def points(run) -> dict[str, list[int]]:
        return {key: sorted(p.step for p in client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics if not key.startswith(metrics.SYSTEM_PREFIX)}

    expected, got = points(reference), points(resumed)
    assert got.keys() == expected.keys()
    assert {k for k in got if k.startswith(metrics.GRADCHECK_PREFIX)}
    lost_or_doubled = {k: (len(expected[k]), len(got[k])) for k in expected
                       if got[k] != expected[k]}
    assert lost_or_doubled == {}
    compared, diffs = reproduce.compare_runs(client, reference.info.run_id,
                                             resumed.info.run_id)
    assert diffs == [] and compared > 1000


# mlp-train with a store that fails at chosen calls: `python -c FAULTY <fault> overrides...`
FAULTY = """
import errno, sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlp.tracking import recorder, spool

def refuse(*args, **kwargs):
    raise MlflowException("API request failed: 503 Service Unavailable")

def failing(name, when):
    real = getattr(MlflowClient, name)
    def call(self, *args, **kwargs):
        return refuse() if when(*args, **kwargs) else real(self, *args, **kwargs)
    setattr(MlflowClient, name, call)

def once(test):
    left = [1]
    return lambda *a, **k: bool(left and test(*a, **k) and left.pop())

fault = sys.argv.pop(1)
recorder.OPEN_WAIT = 0.0
if fault == "create":  # the run cannot be created
    failing("create_run", lambda *a, **k: True)
elif fault == "start":  # the first write after creating it, the config files, the datasets
    failing("log_batch", once(lambda *a, **k: True))
    failing("log_dict", lambda *a, **k: True)
    failing("log_inputs", lambda *a, **k: True)
elif fault == "disk":  # epoch 2's points are refused and the disk under the spool is full
    failing("log_batch", once(lambda *a, metrics=(), **k: any(
        m.key == "acc/val" and m.step == 2 for m in metrics)))
    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device")
    spool.Spool._append = full
from mlp.cli.train import train_main
sys.argv[0] = "mlp-train"
train_main()
"""


def _faulty_train(fault: str, args: list[str], cwd: Path, env: dict
                  ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAULTY, fault, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_a_run_the_store_cannot_create_exits_2_before_training(tmp_path: Path,
                                                              run_env: dict):
    ckpt = tmp_path / "ckpt"
    out = _faulty_train("create", [*QUICK, *LEAN, f"trainer.checkpoint_dir={ckpt}"],
                        tmp_path, run_env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not answer: could not create the run after" in out.stderr
    assert "nothing was trained" in out.stderr and "Traceback" not in out.stderr
    assert not (ckpt / "last.npz").exists()


@pytest.mark.e2e
def test_a_store_failing_as_the_run_starts_does_not_stop_training(tmp_path: Path,
                                                                  run_env: dict):
    """Params, tags and the gradient check's points refused at the start are spooled, the
    config files and the gradient check's table kept beside the spool, all sent at the
    end (the record complete, exit 0); the datasets are named in a warning."""
    out = _faulty_train("start", [*QUICK, "tracking.plots=false", "tracking.log_model=false"],
                        tmp_path, run_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "does not answer" in out.stderr
    assert "the datasets not recorded" in out.stderr and "Traceback" not in out.stderr
    client, (run,) = runs_of(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_sizes"] == "[32]"
    assert metrics.GRADCHECK_MAX in run.data.metrics
    assert steps(client, run, metrics.ACC_VAL) == [1, 2]
    assert run.data.tags[metrics.RECORD_TAG] == "complete"
    assert {"config/resolved.yaml", "config/overrides.txt", "gradcheck/table.json",
            "gradcheck/report.json"} <= set(_files(client, run.info.run_id))


@pytest.mark.e2e
def test_a_full_disk_under_the_spool_ends_the_run_with_a_message_and_its_checkpoint(
        tmp_path: Path, run_env: dict):
    ckpt = tmp_path / "ckpt"
    out = _faulty_train("disk", [*QUICK, *LEAN, "trainer.epochs=3",
                                 f"trainer.checkpoint_dir={ckpt}"], tmp_path, run_env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "the disk is full" in out.stderr and "Traceback" not in out.stderr
    assert f"trainer.resume={ckpt / 'last.npz'}" in out.stderr
    client, (run,) = runs_of(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED" and run.data.tags["error.type"] == "SpoolError"
    assert steps(client, run, metrics.ACC_VAL) == [1]  # epoch 2 is neither stored nor done
    assert (ckpt / "last.npz").exists()
