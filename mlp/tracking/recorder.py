"""MLflow tracking: the store, the run's lifecycle, and everything a run records.

This module records what it is given (configs, histories, gradient-check reports,
figures, the trained model, the data splits); it trains nothing and checks nothing. The
metric keys are the contract of `mlp/metrics.py` (learning curves `acc/*`, `loss/*` first,
then the learning rate, the gradient check `rel_error/*`, speed and health); params are the
config keys that act in the run (`config.applies`), and the bookkeeping keys are tags.

Metrics are buffered and sent with `log_batch` at the end of every epoch (one call per
epoch instead of one per point: per-point calls cost ~4 ms each on SQLite), by a
background thread so that the training loop never waits for the store. A failed send
keeps its metrics for a later one, so a tracking server that blips or dies does not stop
training: `mlp-train`'s runs keep them in a spool file beside the checkpoint (`mlp.spool`,
sent when the store answers again or with `mlp-sync`), and every HTTP call gives up
within a bounded time (`mlp.store.HTTP_POLICY`).
"""

from __future__ import annotations

import os

# Before mlflow is imported: no usage telemetry unless the user asks for it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# mlp-train prints its own links (with any password masked), not MLflow's.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import contextlib
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mlp.config import schema as configlib
from mlp.core.gradcheck import GradcheckReport
from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.tracking import keys, liveness, masking, serving, store
from mlp.tracking import spool as spoollib

Array = np.ndarray

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
FINGERPRINT_TAGS = ("archive_sha256", "n_train", "n_val", "n_test")
MODEL_STEP = -1  # the step a model is logged at: one where the run logs no metric
TRAINING_KIND = "custom_model_development"  # the MLflow UI's model-training view
DATASET_TRIES = 3  # log_inputs under parallel jobs: see RunRecorder.log_datasets


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
    view = "workflowType=machine_learning"
    run = f"#/experiments/{experiment_id}/runs/{run_id}?{view}"
    table = (f"#/experiments/{experiment_id}/runs?{view}"
             "&orderByKey=metrics.%60acc%2Fbest_val%60&orderByAsc=false")
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        return f"open {base}/{run}\n  all runs, best first: {base}/{table}"
    return (f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{run}\n"
            f"  all runs, best first: http://127.0.0.1:5000/{table}")


def run_params(resolved: Mapping[str, Any]) -> dict[str, str]:
    """The params of a run: the keys of the resolved config that act in it (an Adam beta
    is not a param of an SGD run, nor `data.synthetic.*` of a run on CIFAR-10), without
    the bookkeeping keys; values as strings ("[100, 100]", "null")."""
    flat = configlib.flatten(resolved)
    return {k: _text(v) for k, v in flat.items()
            if not configlib.is_bookkeeping(k) and configlib.applies(k, flat)}


def bookkeeping_tags(resolved: Mapping[str, Any]) -> dict[str, str]:
    """The bookkeeping keys set to something else than their default (where the data and
    the store are, a resume, reporting switches) as `mlp.<key>` tags."""
    flat, defaults = configlib.flatten(resolved), configlib.schema_keys()
    return {f"mlp.{k}": masking.mask(_text(v)) for k, v in flat.items()
            if configlib.is_bookkeeping(k) and k in defaults and v != defaults[k]}


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


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


def describe_run(resolved: Mapping[str, Any], result: Any, tags: Mapping[str, str],
                 widths: list[int]) -> str:
    """The run's description (Markdown): what was trained (layer widths, input to
    classes) on what, the result, and the gradient check's verdict."""
    m, o, d, t = resolved["model"], resolved["optim"], resolved["data"], resolved["trainer"]
    widths = "-".join(str(w) for w in widths)
    extras = [x for x in (m["norm"] and f"{m['norm']} norm",
                          m["dropout"] and f"dropout {m['dropout']:g}") if x]
    history = result.history
    best = result.best_epoch - 1
    gap = history["train_acc"][best] - history["val_acc"][best]
    check = tags.get("gradcheck.passed")
    check_text = ("not run" if check is None else
                  f"{'**passed**' if check == 'true' else '**FAILED**'} (max relative error "
                  f"{float(tags['gradcheck.max_rel_error']):.1e})")
    return (
        f"Test accuracy **{result.test_acc:.2%}** · best validation {result.best_val_acc:.2%} "
        f"at epoch {result.best_epoch} of {result.epochs_run}"
        f"{' (stopped early)' if result.stopped_early else ''} · train - validation gap "
        f"{gap * 100:+.1f} points there · gradient check {check_text}\n\n"
        f"{m['activation']} {widths}{', ' + ', '.join(extras) if extras else ''}, "
        f"{m['loss']} loss, L2 reg {short_number(m['reg'])}; {o['name']} lr "
        f"{short_number(o['lr'])} ({o['schedule']['name']} schedule), batch {t['batch_size']}; "
        f"{tags.get('data.n_train', '?')} {d['name']} training images (validation "
        f"{tags.get('data.n_val', '?')}, test {tags.get('data.n_test', '?')}).")


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
        "mlp.overrides": masking.mask(" ".join(overrides)),
        "mlp.command": masking.mask(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])),
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
    for key in FINGERPRINT_TAGS:  # the split's other numbers are params
        if key in fingerprint:
            tags[f"data.{key}"] = str(fingerprint[key])
    for env, tag in (("MLP_LAB_IMAGE", "docker.image"), ("MLP_LAB_IMAGE_DIGEST", "docker.digest"),
                     ("MLP_LAB_LOCK_HASH", "docker.lock_hash")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def sci(x: float) -> str:
    """A number in scientific notation to 8 significant digits: 5.9876543e-12."""
    return f"{x:.7e}"


def _log10(x: float) -> float:
    """log10 of an error, with exact zeros drawn at -20 (below any float64 error)."""
    return float(np.log10(x)) if x > 0 else -20.0


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
        self._deferred: list[Metric] = []  # the gradient check's metrics (log_gradcheck)

    # -- Observer ---------------------------------------------------------------------------

    def on_step(self, step: int, loss: float, lr: float) -> None:
        if step % self.log_every_steps == 0:
            self._add({keys.LOSS_BATCH: loss}, step)

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._add({keys.mlflow_key(k): v for k, v in metrics.items()}, epoch)
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

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0,
                    model_id: str | None = None, dataset: Any = None) -> None:
        """Record metrics now (final numbers), waiting until they are stored; linked to a
        logged model and the dataset they were measured on when given."""
        if model_id is None and dataset is None:
            self._add(metrics, step)
            self.flush(wait=True)
            return
        self.flush(wait=True)
        try:
            if self._offline():
                raise store.StoreError("the store failed a moment ago")
            mlflow.log_metrics(dict(metrics), step=step, run_id=self.run_id, model_id=model_id,
                               dataset=dataset)
        except store.STORE_ERRORS:
            if self.spool is None:
                raise
            self._add(metrics, step)  # kept (in the spool), without the link
            self.flush(wait=True)

    def _offline(self) -> bool:
        """Whether the store failed less than RETRY_AFTER seconds ago (with a spool only)."""
        return self.spool is not None and time.monotonic() < self._offline_until

    @contextlib.contextmanager
    def unless_offline(self, what: str) -> Iterator[None]:
        """Run the block; when the store fails in it and the run has a spool, warn that
        `what` is not recorded instead of failing a run whose training is done."""
        try:
            yield
        except store.STORE_ERRORS as e:
            if self.spool is None:
                raise
            self._offline_until = time.monotonic() + self.RETRY_AFTER
            warnings.warn(f"{what} not recorded: the MLflow store does not answer "
                          f"({type(e).__name__}); the trained parameters are in the "
                          f"checkpoint beside {self.spool.path}", stacklevel=3)

    def flush(self, wait: bool = False, strict: bool = False) -> None:
        """Hand the buffered metrics and tags to the sender thread; with `wait`, block until
        they are stored (or spooled), and with `strict` also retry what failed once more
        now: without a spool raising on error, with one sending the spool."""
        with self._lock:
            points, self._buffer = self._buffer, []
            tags, self._tags = self._tags, {}
        # MLflow lists a run's metrics in the order their keys first arrive: send them in
        # the order a reviewer reads them (a stable sort keeps each key's steps in order).
        points.sort(key=lambda point: keys.reading_order(point.key))
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
        if not strict and self._offline():
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
        """The config keys that act in the run as params, the bookkeeping keys as tags, and
        the whole resolved config under config/ with Hydra's own files (secrets masked:
        `masking`)."""
        items = [(k, masking.mask(v)) for k, v in run_params(resolved).items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]), run_id=self.run_id)
        self.set_tags(bookkeeping_tags(resolved))
        self.client.log_dict(self.run_id, masking.mask_tree(dict(resolved)),
                             "config/resolved.yaml")
        self.client.log_text(self.run_id, masking.mask("\n".join(overrides) + "\n"),
                             "config/overrides.txt")
        if hydra_dir is not None and hydra_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(hydra_dir), "config/hydra")

    def log_datasets(self, datasets: Mapping[str, Any]) -> None:
        """The splits as the run's inputs: {context ("train", "validation", "test"): an
        `mlflow.data` dataset}."""
        inputs = [DatasetInput(dataset._to_mlflow_entity(),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for context, dataset in datasets.items()]
        # The store checks whether a dataset exists, then inserts it: parallel jobs of a
        # sweep that log the same splits at the same moment collide on its key (the server
        # answers BAD_REQUEST, "duplicate key ... dataset_pk"). The loser's transaction is
        # rolled back whole, and its next try finds the winner's datasets.
        for attempt in range(DATASET_TRIES):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException:
                if attempt == DATASET_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_gradcheck(self, report: GradcheckReport) -> None:
        """The gradient check at its real values: metrics `rel_error/max` and
        `rel_error/<param>` (step 0), their log10 for charts that stay readable at 1e-12,
        tags `gradcheck.passed` and `gradcheck.max_rel_error` (scientific notation), the
        per-parameter table with errors as scientific strings (the UI's table shows them
        as written; numbers would be rounded to 10 decimals, i.e. to 0) and the report as
        JSON at full precision."""
        errors = {f"{keys.GRADCHECK_PREFIX}{name}": err
                  for name, err in report.max_by_param("total").items()}
        errors[keys.GRADCHECK_MAX] = report.max_rel_error
        metrics = errors | {k + keys.LOG10: _log10(v) for k, v in errors.items()}
        metrics[keys.GRADCHECK_KINKS] = report.kinks
        # Sent when the run ends, after the learning curves, so that they do not head the
        # run's metrics table; the tags and artifacts below hold the values meanwhile.
        self._deferred += [Metric(k, float(v), int(time.time() * 1000), 0)
                           for k, v in metrics.items()]
        self.set_tags({"gradcheck.passed": str(report.passed).lower(),
                       "gradcheck.verdict": report.verdict,
                       "gradcheck.max_rel_error": sci(report.max_rel_error)})
        rows = [{k: sci(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in report.table()]
        table = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        self.client.log_table(self.run_id, table, "gradcheck/table.json")
        self.client.log_dict(self.run_id, report.to_dict(), "gradcheck/report.json")

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure as plots/<name>.png."""
        self.client.log_figure(self.run_id, figure, f"plots/{name}.png")

    def log_model(self, model: MLP, normalizer: Normalizer, classes: tuple[str, ...],
                  name: str, example: Array) -> str:
        """The parameters (.npz) and a servable MLflow pyfunc model named `name`: raw
        N x 3072 pixels in (uint8, or floats on the same scale), N x 10 class
        probabilities out, with a signature and `example` (a few uint8 images) as its
        input example; it carries the `mlp` package as code and needs NumPy only
        (`mlp.serving`). Returns the logged model's id."""
        with tempfile.TemporaryDirectory() as tmp:
            data = serving.save(Path(tmp) / "mlp", model, normalizer, classes)
            self.client.log_artifact(self.run_id, str(data / "model.npz"), "model_npz")
            probs = serving._load_pyfunc(str(data)).predict(example)
            info = mlflow.pyfunc.log_model(
                name=name, loader_module="mlp.tracking.serving", data_path=str(data),
                code_paths=[str(Path(serving.__file__).parents[1])],
                signature=infer_signature(example, probs), input_example=example,
                pip_requirements=[f"numpy=={np.__version__}", f"tqdm=={version('tqdm')}"],
                # No metric is logged at this step: the model's metrics are the ones
                # logged with its id (log_metrics(model_id=...)), not the run's at step 0.
                step=MODEL_STEP)
        return info.model_id

    def describe(self, text: str) -> None:
        """The run's description (the Overview tab's Description: `mlflow.note.content`)."""
        self.client.set_tag(self.run_id, "mlflow.note.content", text)

    # -- status -----------------------------------------------------------------------------

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags now, with any buffered metrics (kept like them when the store fails)."""
        with self._lock:
            self._tags |= {key: masking.mask(value) for key, value in tags.items()}
        self.flush(wait=True)

    @contextlib.contextmanager
    def finishing(self, killed: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
                  ) -> Iterator[RunRecorder]:
        """The run's life as a block: it ends FINISHED when the block does, KILLED when an
        exception of a `killed` type (an interruption) leaves it, FAILED with the error's
        tags for any other exception, which goes on propagating."""
        try:
            yield self
        except killed as e:
            self.finish("KILLED", e)
            raise
        except BaseException as e:
            self.finish("FAILED", e)
            raise
        self.finish("FINISHED")

    def clear_tags(self, keys_: tuple[str, ...]) -> None:
        """Delete these tags where the run has them (an earlier attempt's error, when a
        resume continues the run)."""
        present = self.client.get_run(self.run_id).data.tags
        for key in keys_:
            if key in present:
                self.client.delete_tag(self.run_id, key)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """End the run FINISHED, FAILED (with the error as tags) or KILLED. With a spool and
        a store that still does not answer, the end goes to the spool too, and a warning
        says what is kept where and how to send it (`mlp-sync`)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status={status!r}: expected FINISHED, FAILED or KILLED")
        with self._lock:
            self._buffer += self._deferred
            self._deferred = []
            if error is not None:
                self._tags |= {"error.type": type(error).__name__,
                               "error.message": masking.mask(str(error)[:5000])}
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
              parent_run_id: str | None = None, system_metrics: bool = False,
              spool_path: Path | None = None) -> RunRecorder:
    """Start a run (or reopen `run_id` to continue it after a resume) as the active run,
    as a child of `parent_run_id` when given, sampling CPU and memory as `system/*`
    metrics when `system_metrics`, and return its recorder (keeping what the store does
    not take in `spool_path`, when given)."""
    tags = {key: masking.mask(value) for key, value in tags.items()}
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=tags, log_system_metrics=system_metrics)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags,
                               log_system_metrics=system_metrics)
    return RunRecorder(run.info.run_id, log_every_steps, spool_path)


def split_datasets(splits: Any, name: str, source: str) -> dict[str, Any]:
    """The train / validation / test splits as MLflow datasets (context -> dataset), named
    `<name>-<split>`, with the archive's sha256 and the split in the digest, and `source`
    (the archive) as their source."""
    digest = splits.fingerprint["archive_sha256"][:12]
    parts = {"train": (splits.X_train, splits.y_train), "validation": (splits.X_val, splits.y_val),
             "test": (splits.X_test, splits.y_test)}
    with warnings.catch_warnings():
        # A local path "can be interpreted in multiple ways", all of them the local file.
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        return {context: mlflow.data.from_numpy(X, targets=y, name=f"{name}-{context}",
                                                digest=f"{digest}-{context}-{len(y)}",
                                                source=source)
                for context, (X, y) in parts.items()}


def run_status(run_id: str) -> str:
    """A run's status (RUNNING, FINISHED, FAILED, KILLED) in the current store."""
    return MlflowClient().get_run(run_id).info.status


def start_failed_run(experiment_id: str, name: str, tags: Mapping[str, str],
                     error: BaseException, parent_run_id: str | None = None) -> str:
    """Record a job that could not start (e.g. an invalid combination in a sweep) as a
    FAILED run with its error, so the sweep shows it."""
    recorder = start_run(experiment_id, name, tags, parent_run_id=parent_run_id)
    recorder.finish("FAILED", error)
    return recorder.run_id
