"""MLflow tracking: the store, the run's lifecycle, and everything a run records.

This module records what it is given (configs, histories, gradient-check reports,
figures, the trained model); it trains nothing and checks nothing. Names follow the
MLflow contract of ARCHITECTURE.md: params are the flattened resolved config
(`model.hidden_sizes`, `optim.lr`, ...), per-epoch metrics `train_loss`, `val_loss`,
`train_acc`, `val_acc`, `gap_acc`, `gap_loss`, `lr`, per-step `batch_loss`, final
`test_loss`, `test_acc`, `best_val_acc`, `best_epoch`, and `gradcheck/*`.

Metrics are buffered and sent with `log_batch` at the end of every epoch (one call per
epoch instead of one per point: per-point calls cost ~4 ms each on SQLite), by a
background thread so that the training loop never waits for the store. A failed send
puts its metrics back into the buffer for the next flush, so a tracking server that
blips does not stop training.
"""

from __future__ import annotations

import os

# Before mlflow is imported: no usage telemetry unless the user asks for it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import contextlib
import json
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from mlp import liveness, store
from mlp import spool as spoollib
from mlp.gradcheck import GradcheckReport
from mlp.model import MLP

Array = np.ndarray

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the MLflow UI's model-training view


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


def resolve_uri(configured: str | None, launch_dir: str | Path) -> str:
    """The tracking URI: $MLFLOW_TRACKING_URI, else `tracking.uri`, else a SQLite file
    `mlflow.db` in the directory the command was launched from, as an absolute path so
    that every job of a sweep writes to one store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(Path(launch_dir) / 'mlflow.db').resolve()}"


def connect(uri: str, experiment: str) -> str:
    """Point MLflow at `uri`, make sure the store and the experiment exist, and return
    the experiment id. A server that does not answer raises TrackingError at once
    (before any training), instead of MLflow's minutes of retries; so does a store that
    cannot be opened (a SQLite store is created under a lock: `store.open_client`)."""
    mlflow.set_tracking_uri(uri)
    store.apply_http_policy()
    try:
        client = store.open_client(uri)
    except store.StoreError as e:
        raise TrackingError(str(e)) from e
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = client.create_experiment(
                    experiment, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
            except MlflowException:
                # another job created it between our lookup and our create
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
            if found.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    except MlflowException as e:
        raise TrackingError(f"cannot use the MLflow tracking store at {uri}: {e}. Check "
                            "tracking.uri / MLFLOW_TRACKING_URI and that the server is up.") from e
    except OSError as e:
        raise TrackingError(f"cannot reach the MLflow tracking store at {uri}: {e}") from e
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def how_to_view(uri: str, experiment_id: str, run_id: str) -> str:
    """What to run and open to see a run in the MLflow UI. `workflowType=machine_learning`
    opens the model-training view: MLflow 3.17's UI starts in its GenAI view whatever the
    experiment's kind tag says."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{page}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"reg": 0.1}} -> {"model.reg": "0.1"}; lists stay whole ("[100, 100]")."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def short_number(x: float) -> str:
    """1e-3 -> '1e-3', 0.0005 -> '5e-4', 0 -> '0', 0.5 -> '0.5'."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.0e}".split("e")
    if float(f"{x:.0e}") == x and not 0.1 <= abs(x) < 1000:
        return f"{mantissa}e{int(exponent)}"
    return f"{x:g}"


def run_name(cfg: Mapping[str, Any]) -> str:
    """A run name that says what the run is, e.g. `relu-h100-lr1e-3-reg1e-4`, with `-bn`
    or `-ln` (a norm), `-drop0.5` (dropout) and the loss when it is not softmax."""
    m, o = cfg["model"], cfg["optim"]
    hidden = "h" + "x".join(str(h) for h in m["hidden_sizes"]) if m["hidden_sizes"] else "linear"
    lr, reg = short_number(o["lr"]), short_number(m["reg"])
    name = f"{m['activation']}-{hidden}-lr{lr}-reg{reg}"
    if m.get("norm") not in (None, "none"):
        name += {"batch": "-bn", "layer": "-ln"}.get(m["norm"], f"-{m['norm']}")
    if m.get("dropout"):
        name += f"-drop{m['dropout']:g}"
    if m["loss"] != "softmax":
        name += f"-{m['loss']}"
    return name


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_tags(launch_dir: Path, overrides: list[str], fingerprint: Mapping[str, Any]
                     ) -> dict[str, str]:
    """Tags that say where a run came from: git commit and dirty flag, overrides, command,
    host, versions and BLAS, the dataset fingerprint, and the Docker image when set."""
    tags = {
        "mlp.overrides": " ".join(overrides),
        "mlp.command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "mlp.host": socket.gethostname(),
        "mlp.python": platform.python_version(),
        "mlp.numpy": np.__version__,
        "mlp.blas": _blas(),
        "mlp.version": _package_version(),
    }
    commit = _git("rev-parse", "HEAD", cwd=launch_dir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["mlp.git.dirty"] = str(bool(_git("status", "--porcelain", cwd=launch_dir)))
    for key, value in fingerprint.items():
        tags[f"data.{key}"] = str(value)
    for env, tag in (("MLP_LAB_IMAGE", "docker.image"), ("MLP_LAB_IMAGE_DIGEST", "docker.digest"),
                     ("MLP_LAB_LOCK_HASH", "docker.lock_hash")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _package_version() -> str:
    try:
        return version("mlp-lab")
    except PackageNotFoundError:
        return "unknown"


def _blas() -> str:
    config = np.show_config(mode="dicts") or {}
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


class RunRecorder:
    """Records one run: an `Observer` for the training loop plus the run's artifacts.

    Per-step `batch_loss` is kept every `log_every_steps` steps; everything is buffered
    and flushed with `log_batch` once per epoch, from a background thread, with the
    heartbeat tag (`liveness`). With a `spool_path`, what the store does not take is kept
    in that file (`mlp.spool`) and the store is left alone for RETRY_AFTER seconds, so a
    dead server costs each call a bounded time (`store.HTTP_POLICY`) and the run's end
    one more try; what is still in the spool then is named in a warning.
    """

    RETRY_AFTER = 30.0  # seconds without trying the store after a failed send

    def __init__(self, run_id: str, log_every_steps: int = 10,
                 spool_path: Path | None = None) -> None:
        self.run_id = run_id
        self.client = MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        self.log_every_steps = log_every_steps
        self.spool = None if spool_path is None else spoollib.Spool(spool_path)
        self._buffer: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlp-tracking")
        self._sending: Future | None = None
        self._offline_until = 0.0  # time.monotonic() before which the store is not tried

    # -- Observer ---------------------------------------------------------------------------

    def on_step(self, step: int, loss: float, lr: float) -> None:
        if step % self.log_every_steps == 0:
            self._add({"batch_loss": loss}, step)

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._add(metrics, epoch)
        with self._lock:
            self._tags |= liveness.heartbeat()
        self.flush()

    # -- metrics ------------------------------------------------------------------------

    def _add(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        points = [Metric(key=k, value=float(v), timestamp=now, step=step)
                  for k, v in metrics.items()]
        with self._lock:
            self._buffer += points

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Record metrics now (final numbers), waiting until they are stored."""
        self._add(metrics, step)
        self.flush(wait=True)

    def flush(self, wait: bool = False, strict: bool = False) -> None:
        """Hand the buffered metrics and tags to the sender thread; with `wait`, block until
        they are stored (or spooled), and with `strict` also retry what failed once more
        now: without a spool raising on error, with one sending the spool."""
        with self._lock:
            points, self._buffer = self._buffer, []
            tags, self._tags = self._tags, {}
        if points or tags:
            self._sending = self._sender.submit(self._send, points, tags)
        if wait and self._sending is not None:
            self._sending.result()
            if strict:
                with self._lock:
                    points, self._buffer = self._buffer, []
                    tags, self._tags = self._tags, {}
                self._send(points, tags, strict=True)

    def _send(self, points: list[Metric], tags: Mapping[str, str] | None = None,
              strict: bool = False) -> None:
        """The spool first (oldest first), then log_batch in chunks of 1000 (MLflow's
        limit), the tags with the first. On failure what is left goes to the spool, or
        without one back to the front of the buffer, for the next flush (one sender thread
        keeps the order)."""
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        if self.spool is not None and not strict and time.monotonic() < self._offline_until:
            self._keep(points, tag_list)
            return
        try:
            if self.spool is not None and self.spool.pending():
                self.spool.send()
        except store.STORE_ERRORS as e:
            self._keep(points, tag_list, e)
            return
        starts = range(0, len(points), 1000) if points else range(1 if tag_list else 0)
        for i in starts:
            try:
                self.client.log_batch(self.run_id, metrics=points[i:i + 1000],
                                      tags=tag_list if i == 0 else [])
            except store.STORE_ERRORS as e:
                if strict and self.spool is None:
                    raise
                self._keep(points[i:], tag_list if i == 0 else [], e)
                return

    def _keep(self, points: list[Metric], tags: list[RunTag],
              error: BaseException | None = None) -> None:
        """Keep what could not be sent: in the spool (and stay away from the store for
        RETRY_AFTER seconds), or without one in the buffer."""
        if self.spool is None:
            with self._lock:
                self._buffer[:0] = points
                self._tags = {t.key: t.value for t in tags} | self._tags
            warnings.warn(f"MLflow logging failed, will retry at the next flush: {error}",
                          stacklevel=3)
            return
        self.spool.append(spoollib.metric_records(self.uri, self.run_id, points)
                          + spoollib.tag_records(self.uri, self.run_id,
                                                 {t.key: t.value for t in tags}))
        if error is not None:
            if time.monotonic() >= self._offline_until:
                warnings.warn(f"the MLflow store does not answer ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); training "
                              f"goes on, what is not sent is kept in {self.spool.path}",
                              stacklevel=3)
            self._offline_until = time.monotonic() + self.RETRY_AFTER

    # -- artifacts ------------------------------------------------------------------------

    def log_config(self, resolved: Mapping[str, Any], overrides: list[str],
                   hydra_dir: Path | None) -> None:
        """The resolved config as params and under config/, with Hydra's own files."""
        params = flatten(resolved)
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]), run_id=self.run_id)
        self.client.log_dict(self.run_id, dict(resolved), "config/resolved.yaml")
        self.client.log_text(self.run_id, "\n".join(overrides) + "\n", "config/overrides.txt")
        if hydra_dir is not None and hydra_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(hydra_dir), "config/hydra")

    def log_gradcheck(self, report: GradcheckReport) -> None:
        """gradcheck/max_rel_error, gradcheck/<param>, tag gradcheck.passed, and the
        per-parameter table (viewable in the UI) plus the full report as JSON."""
        metrics = {"gradcheck/max_rel_error": report.max_rel_error,
                   "gradcheck/kinks": report.kinks}
        metrics |= {f"gradcheck/{name}": err for name, err in report.max_by_param("total").items()}
        self.log_metrics(metrics)
        self.client.set_tag(self.run_id, "gradcheck.passed", str(report.passed).lower())
        self.client.set_tag(self.run_id, "gradcheck.verdict", report.verdict)
        rows = report.table()
        table = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        self.client.log_table(self.run_id, table, "gradcheck/table.json")
        self.client.log_dict(self.run_id, report.to_dict(), "gradcheck/report.json")

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure as plots/<name>.png."""
        self.client.log_figure(self.run_id, figure, f"plots/{name}.png")

    def log_model(self, model: MLP, normalizer_state: Mapping[str, Array],
                  classes: tuple[str, ...]) -> None:
        """The parameters (.npz) and an MLflow pyfunc model that predicts class ids from raw
        N x 3072 pixels (uint8, or floats on the same 0-255 scale)."""
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "mlp"
            data.mkdir()
            model.save(data / "model.npz")
            np.savez(data / "normalizer.npz", **normalizer_state)
            (data / "classes.json").write_text(json.dumps(list(classes)))
            self.client.log_artifact(self.run_id, str(data / "model.npz"), "model_npz")
            mlflow.pyfunc.log_model(name="model", loader_module="mlp.tracking",
                                    data_path=str(data),
                                    pip_requirements=[f"mlp-lab=={_package_version()}"])

    # -- status -----------------------------------------------------------------------------

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags now, with any buffered metrics (kept like them when the store fails)."""
        with self._lock:
            self._tags |= tags
        self.flush(wait=True)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """End the run FINISHED, FAILED (with the error as tags) or KILLED. With a spool and
        a store that still does not answer, the end goes to the spool too, and a warning
        says what is kept where and how to send it (`mlp-sync`)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r}: expected FINISHED, FAILED or KILLED")
        if error is not None:
            with self._lock:
                self._tags |= {"error.type": type(error).__name__,
                               "error.message": str(error)[:5000]}
        try:
            self.flush(wait=True, strict=status == "FINISHED" or self.spool is not None)
        finally:
            self._sender.shutdown(wait=True)
            active = mlflow.active_run()
            try:
                if self.spool is not None and self.spool.pending():
                    raise store.StoreError("the spool could not be sent")
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status=status)  # leaves the fluent run even when it fails
                else:
                    self.client.set_terminated(self.run_id, status=status)
            except store.STORE_ERRORS:
                if self.spool is None:
                    raise
                if active is not None and active.info.run_id == self.run_id:
                    with contextlib.suppress(*store.STORE_ERRORS):
                        mlflow.end_run(status=status)
                self._spool_end(status)

    def _spool_end(self, status: str) -> None:
        """Keep the run's final status in the spool (after its last points) and say so."""
        assert self.spool is not None
        self.spool.append([spoollib.status_record(self.uri, self.run_id, status,
                                                  int(time.time() * 1000))])
        records = [r for r in self.spool.read() if r["run_id"] == self.run_id]
        counts = {kind: sum(r["kind"] == kind for r in records)
                  for kind in ("metric", "tag", "status")}
        warnings.warn(f"the MLflow store {self.uri} does not answer: run {self.run_id} ended "
                      f"{status}, but {counts['metric']} metric points, {counts['tag']} tags "
                      f"and its final status are kept in {self.spool.path}. Send them when "
                      f"the store is back with: mlp-sync {self.spool.path}", stacklevel=3)


def start_run(experiment_id: str, name: str, tags: Mapping[str, str],
              run_id: str | None = None, log_every_steps: int = 10,
              parent_run_id: str | None = None, spool_path: Path | None = None
              ) -> RunRecorder:
    """Start a run (or reopen `run_id` to continue it after a resume) as the active run,
    as a child of `parent_run_id` when given, and return its recorder (keeping what the
    store does not take in `spool_path`, when given)."""
    tags = dict(tags)
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=tags)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
    return RunRecorder(run.info.run_id, log_every_steps, spool_path)


def open_parent_run(experiment_id: str, name: str, tags: Mapping[str, str]) -> str:
    """The parent run of a sweep: the one with the same `mlp.sweep.hash` tag if the sweep
    ran before (reopened as RUNNING), else a new one. Not the fluent active run: the
    jobs' child runs are."""
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlp.sweep.hash` = '{tags['mlp.sweep.hash']}'",
        max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    return client.create_run(experiment_id, run_name=name, tags=dict(tags)).info.run_id


def runs_with_config(experiment_id: str, config_hash: str) -> list:
    """Training runs of the experiment whose `mlp.config_hash` tag is config_hash, newest
    first."""
    return MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`mlp.config_hash` = '{config_hash}'",
        order_by=["attributes.start_time DESC"])


def start_failed_run(experiment_id: str, name: str, tags: Mapping[str, str],
                     error: BaseException, parent_run_id: str | None = None) -> str:
    """Record a job that could not start (e.g. an invalid combination in a sweep) as a
    FAILED run with its error, so the sweep shows it."""
    recorder = start_run(experiment_id, name, tags, parent_run_id=parent_run_id)
    recorder.finish("FAILED", error)
    return recorder.run_id


# -- the pyfunc loader (mlflow.pyfunc.load_model imports this module) ------------------------


class PixelClassifier:
    """What `mlflow.pyfunc.load_model` returns for an mlp-lab model: raw pixels in, class
    ids out."""

    def __init__(self, model: MLP, mean: Array, scale: Array) -> None:
        self.model, self.mean, self.scale = model, mean, scale

    def predict(self, model_input: Any, params: dict | None = None) -> Array:
        """model_input: (N, 3072) uint8 pixels or floats on the 0-255 scale (array, list or
        DataFrame); returns (N,) int64 class ids."""
        X = np.asarray(model_input, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.model.arch.input_dim:
            raise ValueError(f"input has shape {X.shape}: expected (N, "
                             f"{self.model.arch.input_dim}) pixel values")
        return self.model.predict((X - self.mean) / self.scale)


def _load_pyfunc(data_path: str) -> PixelClassifier:
    path = Path(data_path)
    model = MLP.load(path / "model.npz")
    with np.load(path / "normalizer.npz", allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    return PixelClassifier(model, state["mean"], state["scale"])
