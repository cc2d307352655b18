"""What a run records in MLflow: its params, config, datasets, metrics per epoch, gradient
check, figures, model, description, tags and status.

This module records what it is given (configs, histories, gradient-check reports,
figures, the trained model, the data splits); it trains nothing and checks nothing. The
metric keys are the contract of `mlp.tracking.keys` (learning curves `acc/*`, `loss/*`
first, then the learning rate, the gradient check `rel_error/*`, speed and health); params
are the config keys that act in the run (`config.applies`), and the bookkeeping keys are
tags. How metric points, tags and the status get to the store (buffer, sender thread,
spool, back-off) is the `sink`'s business; everything here goes through the client the
command opened (`store.connect`).

A run's status and its record are two things. The status says how training ended:
FINISHED, FAILED (with `error.type` / `error.message`) or KILLED (interrupted, pruned, or
found dead by `liveness`). The tag `mlp.record` says whether the store holds everything the
run produced: at its end the run reads the store back and compares (`receipt`): `complete`,
or `incomplete: <n> points, <m> tags, <k> files, <j> models in <spool file>`, what
`mlp-sync` (or the next `mlp-train` against the store) sends. `mlp-train` exits 4 for a
run that trained but whose record is incomplete (`cli.exits`).

Durable before acknowledged. An epoch's points (its metrics, and the batch losses logged
during it) are in the store or on disk in the run's spool when `on_epoch` returns, which
the trainer calls before it writes the epoch's checkpoint: a process killed at any moment
resumes from a checkpoint whose epochs are all recorded. A kill between the two re-runs an
epoch the record already holds; the resumed run is given the (key, step) points its run
holds, in the store or in the spool (`start_run`), and does not log them again. The
gradient check's points go the same way when the check ends.

What needs the store, and what does not. Creating a run needs it: MLflow gives the run id,
and a run cannot be made locally and handed over later. `start_run` therefore tries to
create (or, on a resume, reopen) the run OPEN_TRIES times with growing waits (~15 s, each
HTTP call bounded by `store.HTTP_POLICY`); if the store still does not answer, it raises
StoreError naming the store, and `mlp-train` exits 2 before training, without a traceback.
(A creation whose answer was lost can leave an extra RUNNING run: it carries the process
tags, and the next command marks it KILLED, `liveness`.) Once the run exists, nothing else
stops training: params and tags go through the sink like metric points (spooled when the
store fails), the run's files (config files, the gradient check's table and report,
figures, the parameters: `log_files`) and its servable model (`log_model`) are kept
beside the spool and sent with it, and what has no place there (the datasets' entries)
is named in a warning when the store does not take it. The receipt counts the files and
the model too: a run whose figures the store did not take says so.

MLflow's system-metrics sampler (`SystemMetricsMonitor`, MLflow 3.17) stops for good at
its first failed call (reading the run's status or logging a sample): after a store
outage a run has no `system/*` points until its end. It is MLflow's code and left as is.
"""

from __future__ import annotations

import os

# Before mlflow is imported: no usage telemetry unless the user asks for it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# mlp-train prints its own links (with any password masked), not MLflow's.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import contextlib
import json
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking.context import registry as context_registry
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_LOGGED_ARTIFACTS,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_RUN_NOTE,
)

from mlp.config import schema as configlib
from mlp.core.gradcheck import GradcheckReport, PrecisionCheck
from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.tracking import glance, keys, liveness, masking, receipt, serving, store
from mlp.tracking import spool as spoollib
from mlp.tracking.names import model_name, short_number
from mlp.tracking.sink import Sink
from mlp.training.inference import PLAIN, Scoring

Array = np.ndarray

FINGERPRINT_TAGS = ("archive_sha256", "n_train", "n_val", "n_test")
MODEL_STEP = -1  # the step a model is logged at: one where the run logs no metric
DATASET_TRIES = 3  # log_inputs under parallel jobs: see RunRecorder.log_datasets
OPEN_TRIES, OPEN_WAIT = 4, 2.0  # creating or reopening a run: waits of 2, 4 and 8 s
STATUSES = ("FINISHED", "FAILED", "KILLED")
EXAMPLE_FILE = "example.npy"  # a kept model's input example, beside its data
GRADCHECK_TABLE = "gradcheck/table.json"


def how_to_view(uri: str, experiment_id: str, run_id: str, children: bool = False) -> str:
    """What to run and open to see a run in the MLflow UI, and the experiment's runs best
    first, or with `children` (a sweep's parent) the chart view of its children's curves
    overlaid (`glance.page`: the model-training view)."""
    run = glance.page(experiment_id, f"runs/{run_id}")
    if children:
        what = "its children's curves overlaid"
        others = glance.children_chart(experiment_id, run_id)
    else:
        what = "all runs, best first"
        others = glance.page(experiment_id, query="orderByKey=metrics.%60acc%2Fbest_val%60"
                                                  "&orderByAsc=false")
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        return f"open {base}/{run}\n  {what}: {base}/{others}"
    return (f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{run}\n"
            f"  {what}: http://127.0.0.1:5000/{others}")


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


def describe_run(resolved: Mapping[str, Any], result: Any, tags: Mapping[str, str],
                 widths: list[int], figures: tuple[str, str] | None = None) -> str:
    """The run's description, its glance (`glance.band`, all of it on the Overview's first
    screen): the result in four lines (test accuracy, best validation accuracy and its
    epoch, the train - validation gap there, the gradient check's verdict) and what was
    trained on what in a fifth, beside the small train vs validation figure
    (`glance.PATH`, a link to the full curves) when the run has figures: `figures` is then
    its (experiment id, run id)."""
    m, o, d = resolved["model"], resolved["optim"], resolved["data"]
    extras = [x for x in (m["norm"] and f"{m['norm']} norm",
                          m["dropout"] and f"dropout {m['dropout']:g}") if x]
    history = result.history
    best = result.best_epoch - 1
    gap = history["train_acc"][best] - history["val_acc"][best]
    check = tags.get("gradcheck.passed")
    check_text = ("not run" if check is None else
                  f"{'<b>passed</b>' if check == 'true' else '<b>FAILED</b>'} (max relative "
                  f"error {float(tags['gradcheck.max_rel_error']):.1e})")
    lines = [f"Test accuracy <b>{result.test_acc:.2%}</b>",
             f"best validation {result.best_val_acc:.2%} at epoch {result.best_epoch} of "
             f"{result.epochs_run}{' (stopped early)' if result.stopped_early else ''}",
             f"train - validation gap {gap * 100:+.1f} points there",
             f"gradient check {check_text}",
             glance.escape(f"{m['activation']} {'-'.join(str(w) for w in widths)}"
                           + "".join(f", {x}" for x in extras)
                           + f", L2 {short_number(m['reg'])}, {o['name']} lr "
                           f"{short_number(o['lr'])}, {tags.get('data.n_train', '?')} "
                           f"{d['name']} images")]
    if figures is None:
        return "<br>".join(lines)
    experiment_id, run_id = figures
    return glance.band("<br>".join(lines), glance.image(run_id, glance.PATH), glance.page(
        experiment_id, f"runs/{run_id}/artifacts/plots/curves.png"))


class ModelRefused(RuntimeError):
    """The store refused a model (HTTP 4xx: an invalid name, a missing permission): an
    error in what was sent, reported as such, not as an outage of the store."""


def refused(error: MlflowException) -> bool:
    """Whether the store answered `error` with a 4xx refusal rather than failing."""
    return 400 <= error.get_http_status_code() < 500


def log_servable(client: MlflowClient, run_id: str, data: Path, name: str,
                 example: Array) -> str:
    """Log the servable MLflow pyfunc model `name` of run `run_id` from `data` (the folder
    `serving.save` wrote): raw N x 3072 pixels on the 0-255 scale in, N x 10 class
    probabilities out (`mlp.tracking.serving`), with a float64 tensor signature
    (`serving.SIGNATURE_DTYPE` says why) and `example` (a few images) as its input
    example; it carries the `mlp` package as code and requires NumPy only. Returns the
    logged model's id; `ModelRefused` for a 4xx, the store's error otherwise."""
    probs = serving._load_pyfunc(str(data)).predict(example)
    signature = ModelSignature(
        Schema([TensorSpec(np.dtype(serving.SIGNATURE_DTYPE), (-1, example.shape[1]))]),
        Schema([TensorSpec(probs.dtype, (-1, probs.shape[1]))]))
    # What mlflow.pyfunc.log_model does inside a fluent run, with this run and client:
    # the logged model is created here (in the run's experiment, with its params),
    # Model.log fills it and links it to the run.
    run = client.get_run(run_id)
    try:
        logged = client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params,
            tags=context_registry.resolve_tags())
        with store.process_uri(client):
            Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=logged.model_id, loader_module="mlp.tracking.serving",
                data_path=str(data), code_paths=[str(Path(serving.__file__).parents[1])],
                signature=signature, input_example=example,
                pip_requirements=[f"numpy=={np.__version__}"],
                # No metric is logged at this step: the model's metrics are the ones
                # logged with its id (log_metrics(model_id=...)), not the run's at 0.
                step=MODEL_STEP)
    except MlflowException as e:
        if refused(e):
            raise ModelRefused(f"the store refused the model {name!r}: "
                               f"{e.error_code}: {e.message}") from e
        raise
    return logged.model_id


def log_kept_model(client: MlflowClient, run_id: str, folder: Path, name: str) -> str:
    """`log_servable` from a folder `RunRecorder.log_model` kept beside a spool (the model's
    data in `mlp/`, its input example): what sending a `model` record does."""
    return log_servable(client, run_id, folder / "mlp", name,
                        np.load(folder / EXAMPLE_FILE, allow_pickle=False))


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
    """log10 of an error to 2 decimals (-9.44: readable in a table cell, where the raw
    error's exponent is cut off), with exact zeros drawn at -20 (below any float64
    error)."""
    return round(float(np.log10(x)), 2) if x > 0 else -20.0


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

    Per-step `batch_loss` is kept every `log_every_steps` steps; each epoch's metrics go to
    the run's `sink` with the heartbeat tag (`liveness`), which sends them once per epoch
    and waits until they are stored or spooled (see the module docstring). `held`: the
    (key, step) points the run already holds (a resumed run), not logged again. Everything
    else is written through `client`, the store the command opened. With `monitor`
    (MLflow's system metrics sampler) running, it is stopped when the run ends.
    """

    def __init__(self, client: MlflowClient, run_id: str, log_every_steps: int = 10,
                 spool_path: Path | None = None, monitor: Any = None,
                 held: set[tuple[str, int]] | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.log_every_steps = log_every_steps
        self.sink = Sink(client, run_id, spool_path, order=keys.reading_order)
        self._monitor = monitor
        self._held = held or set()
        self._earlier: dict[str, int] = {}  # points the store held when the run was reopened
        self._files: set[str] = set()  # the artifact paths of the files it logged
        self._models: set[str] = set()  # the names of the servable models it logged
        self.receipt: receipt.Receipt | None = None  # set by finish

    # -- Observer ---------------------------------------------------------------------------

    def on_step(self, step: int, loss: float, lr: float) -> None:
        if step % self.log_every_steps == 0:
            self.sink.add(self._new(_points({keys.LOSS_BATCH: loss}, step)))

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """The epoch's points and the heartbeat, stored or spooled before returning."""
        self.sink.add(self._new(_points({keys.mlflow_key(k): v for k, v in metrics.items()},
                                        epoch)), liveness.heartbeat())
        self.sink.flush(wait=True)

    def _new(self, points: list[Metric]) -> list[Metric]:
        """The points the run does not hold yet (all of them, but in a resumed run)."""
        if not self._held:
            return points
        return [p for p in points if (p.key, p.step) not in self._held]

    # -- metrics ------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0,
                    model_id: str | None = None, dataset: Any = None) -> None:
        """Record metrics now (final numbers), waiting until they are stored; linked to a
        logged model and the dataset they were measured on when given (the spool keeps
        them without the link)."""
        points = self._new(_points(
            metrics, step, model_id=model_id,
            dataset_name=dataset.name if dataset is not None else None,
            dataset_digest=dataset.digest if dataset is not None else None))
        if model_id is None and dataset is None:
            self.sink.add(points)
            self.sink.flush(wait=True)
        else:
            self.sink.send_now(points)

    # -- artifacts ------------------------------------------------------------------------

    def log_files(self, what: str, files: Mapping[str, bytes | str | Path]) -> None:
        """Files as the run's artifacts, in one upload: {artifact path: its content (bytes,
        or text as UTF-8) or a local file}. The receipt expects each of them. When the
        store fails (or failed a moment ago) and the run has a spool, they are kept beside
        it and sent with it (`Sink.send_or_keep`), `what` named in a warning; without a
        spool the store's error propagates."""
        self._files.update(files)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "files"
            for path, content in files.items():
                target = staged / path
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_bytes(content.encode() if isinstance(content, str) else content)
            self.sink.send_or_keep(lambda: self.client.log_artifacts(self.run_id, str(staged)),
                                   staged, "files", what, paths=sorted(files))

    def log_config(self, resolved: Mapping[str, Any], overrides: list[str],
                   hydra_dir: Path | None) -> None:
        """The config keys that act in the run as params, the bookkeeping keys as tags, and
        the whole resolved config under config/ with Hydra's own files (secrets masked:
        `masking`)."""
        self.sink.add(params={k: masking.mask(v) for k, v in run_params(resolved).items()})
        self.set_tags(bookkeeping_tags(resolved))
        files: dict[str, str | Path] = {
            "config/resolved.yaml": yaml.dump(masking.mask_tree(dict(resolved)), indent=2,
                                              default_flow_style=False),
            "config/overrides.txt": masking.mask("\n".join(overrides) + "\n")}
        if hydra_dir is not None and hydra_dir.is_dir():
            files |= {f"config/hydra/{f.relative_to(hydra_dir).as_posix()}": f
                      for f in sorted(hydra_dir.rglob("*")) if f.is_file()}
        self.log_files("the config files", files)

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
        with self.sink.unless_offline("the datasets", kept="their fingerprint is in the "
                                      "run's data.* tags"):
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
        `rel_error/<param>` (once, at keys.SUMMARY_STEP), their log10 (readable in a table
        cell at 1e-12), tags `gradcheck.passed` and `gradcheck.max_rel_error` (3
        significant digits), the per-parameter table with errors as scientific strings (the
        UI's table shows them as written; numbers would be rounded to 10 decimals, i.e. to
        0) and the report as JSON at full precision."""
        errors = {f"{keys.GRADCHECK_PREFIX}{name}": err
                  for name, err in report.max_by_param("total").items()}
        errors[keys.GRADCHECK_MAX] = report.max_rel_error
        metrics = errors | {k + keys.LOG10: _log10(v) for k, v in errors.items()}
        metrics[keys.GRADCHECK_KINKS] = report.kinks
        # Stored (or spooled) now, with the tags: a resume does not run the check again.
        self.sink.add(_points(metrics, keys.SUMMARY_STEP))
        self.set_tags({"gradcheck.passed": str(report.passed).lower(),
                       "gradcheck.verdict": report.verdict,
                       # short enough for a cell of the runs table (3.61e-10)
                       "gradcheck.max_rel_error": f"{report.max_rel_error:.2e}"})
        rows = [{k: sci(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in report.table()]
        columns = list(rows[0]) if rows else []
        # MLflow's table format (`MlflowClient.log_table`: pandas' "split" JSON, and the
        # tag that shows the file as a table), written here so that it can be kept
        # beside the spool like any other file.
        self.set_tags({MLFLOW_LOGGED_ARTIFACTS: json.dumps([{"path": GRADCHECK_TABLE,
                                                             "type": "table"}])})
        self.log_files("the gradient check's table and report", {
            GRADCHECK_TABLE: json.dumps({"columns": columns,
                                         "data": [[row[c] for c in columns] for row in rows]}),
            "gradcheck/report.json": json.dumps(report.to_dict(), indent=2, default=str)})

    def log_step_precision(self, check: PrecisionCheck) -> None:
        """The training step in its dtype against the float64 step, beside the gradient
        check: metric `rel_error/step_<dtype>` (at SUMMARY_STEP) and its log10, tag
        `gradcheck.step_<dtype>` (passed or failed; the parameter nearest its tolerance,
        its error and that tolerance; the arithmetic's share of it; the kinks, and which
        batch the check ran on when the first ones had kinks), and every parameter's error
        and tolerance as JSON at full precision (`gradcheck/step_<dtype>.json`)."""
        key = keys.STEP_PRECISION_PREFIX + check.dtype
        self.sink.add(_points({key: check.max_rel_error,
                               key + keys.LOG10: _log10(check.max_rel_error)}, keys.SUMMARY_STEP))
        worst = check.worst
        self.set_tags({f"gradcheck.step_{check.dtype}":
                       f"{'passed' if check.passed else 'failed'} {worst} "
                       f"{check.errors.get(worst, 0.0):.2e} (tol {check.tol_of(worst):.2e}, "
                       f"arithmetic {check.tol:.2e}, {check.kinks} kinks"
                       f"{f' on batch {check.batches}' if check.batches > 1 else ''})"})
        self.log_files("the step check's report", {
            f"gradcheck/step_{check.dtype}.json": json.dumps(check.to_dict(), indent=2)})

    def log_png(self, png: bytes, name: str) -> str:
        """A figure drawn already (PNG bytes: `painter.submit`, `plots.png`) as
        plots/<name>.png; returns that path."""
        path = f"plots/{name}.png"
        self.log_files(f"the figure {path}", {path: png})
        return path

    def log_model(self, model: MLP, normalizer: Normalizer, classes: tuple[str, ...],
                  name: str, example: Array, scoring: Scoring = PLAIN) -> str | None:
        """The parameters (.npz) and a servable MLflow pyfunc model named after `name`
        (`model_name`, `log_servable`), scoring images as the run tested them
        (`scoring`); returns the logged model's id. The receipt expects
        both. When the store fails (or failed a moment ago) and the run has a spool, the
        model's data and example are kept beside it and logged when it is sent (None is
        returned); without a spool the error propagates. Raises `ModelRefused` when the
        store refuses the model (a 4xx: nothing a retry or the spool would change)."""
        example = np.asarray(example, dtype=serving.SIGNATURE_DTYPE)
        name = model_name(name)
        self._models.add(name)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "model"
            data = serving.save(staged / "mlp", model, normalizer, classes, scoring)
            np.save(staged / EXAMPLE_FILE, example)
            self.log_files("the parameters", {"model_npz/model.npz": data / "model.npz"})
            return self.sink.send_or_keep(
                lambda: log_servable(self.client, self.run_id, data, name, example), staged,
                "model", f"the model {name!r}", name=name)

    def describe(self, text: str) -> None:
        """The run's description (the Overview tab's Description: `mlflow.note.content`)."""
        self.client.set_tag(self.run_id, MLFLOW_RUN_NOTE, text)

    # -- status -----------------------------------------------------------------------------

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags now, with any buffered metrics (kept like them when the store fails)."""
        self.sink.add(tags={key: masking.mask(value) for key, value in tags.items()})
        self.sink.flush(wait=True)

    @contextlib.contextmanager
    def finishing(self, killed: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
                  ) -> Iterator[RunRecorder]:
        """The run's life as a block: it ends FINISHED when the block does, KILLED when an
        exception of a `killed` type (an interruption) leaves it, FAILED with the error's
        tags for any other exception, which goes on propagating."""
        with self.ending_on_error(killed):
            yield self
        self.finish("FINISHED")

    @contextlib.contextmanager
    def ending_on_error(self, killed: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
                        ) -> Iterator[RunRecorder]:
        """Part of the run's life as a block that ends it only when an exception leaves it
        (KILLED or FAILED, as `finishing`); the run goes on when the block ends."""
        try:
            yield self
        except killed as e:
            self.finish("KILLED", e)
            raise
        except BaseException as e:
            self.finish("FAILED", e)
            raise

    def clear_tags(self, keys_: tuple[str, ...]) -> None:
        """Delete these tags where the run has them (an earlier attempt's error, when a
        resume continues the run); a store that fails leaves them, with a warning."""
        with self.sink.unless_offline("clearing the earlier attempt's tags",
                                      kept=f"{', '.join(keys_)} may stay on the run"):
            present = self.client.get_run(self.run_id).data.tags
            for key in keys_:
                if key in present:
                    self.client.delete_tag(self.run_id, key)

    def count_stored(self) -> None:
        """Count the points the store holds of a run reopened to be continued: its receipt
        expects them besides this attempt's."""
        self._earlier = dict(receipt.stored_points(self.client, self.run_id))

    def expected(self) -> receipt.Expected:
        """What the store must hold of the run: the points counted when it was reopened
        plus what this attempt handed to its sink, the tag keys it set there, and the
        files and models it logged or its spool still keeps for it (an earlier attempt's,
        which a resume could not send)."""
        points = dict(self._earlier)
        for key, n in self.sink.expected().items():
            points[key] = points.get(key, 0) + n
        files, models = set(self._files), set(self._models)
        if self.sink.spool is not None:
            kept_files, kept_models = self.sink.spool.kept(self.run_id)
            files.update(kept_files)
            models.update(kept_models)
        return receipt.Expected(points, tuple(sorted(self.sink.produced_tags)),
                                tuple(sorted(files)), tuple(sorted(models)))

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """End the run FINISHED, FAILED (with the error as tags) or KILLED through the
        sink's end (`Sink.end`: what the store does not take is kept and named), then the
        receipt (`mlp.record`, kept in `receipt`)."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r}: expected FINISHED, FAILED or KILLED")
        self.sink.add(tags=None if error is None else {
            "error.type": type(error).__name__,
            "error.message": masking.mask(str(error)[:5000])})
        try:
            self.sink.end(status)
            spool = self.sink.spool.path if self.sink.spool is not None else None
            self.receipt = receipt.settle(self.client, self.run_id, self.expected(), spool)
        finally:
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None


def _points(metrics: Mapping[str, float], step: int, **link: Any) -> list[Metric]:
    """Metric points stamped now, at `step` (`link`: model_id, dataset_name, dataset_digest)."""
    now = int(time.time() * 1000)
    return [Metric(key=k, value=float(v), timestamp=now, step=step, **link)
            for k, v in metrics.items()]


def start_run(client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, str],
              run_id: str | None = None, log_every_steps: int = 10,
              parent_run_id: str | None = None, system_metrics: bool = False,
              spool_path: Path | None = None) -> RunRecorder:
    """Start a run in `experiment_id` of the client's store (or reopen `run_id` as RUNNING
    to continue it after a resume, with the points it holds), as a child of
    `parent_run_id` when given, sampling CPU and memory as `system/*` metrics when
    `system_metrics`, and return its recorder (keeping what the store does not take in
    `spool_path`, when given). A new run gets MLflow's context tags (user, source, git,
    $MLFLOW_RUN_CONTEXT) as `mlflow.start_run` gives them. StoreError when the store does
    not answer after OPEN_TRIES tries (see the module docstring)."""
    tags = {key: masking.mask(value) for key, value in tags.items()}
    if parent_run_id is not None:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    resumed, held = run_id is not None, set()
    if resumed:
        def reopen() -> str:
            client.update_run(run_id, status="RUNNING")
            held.update(_held_points(client, run_id, spool_path))
            return run_id

        _opening(client, f"reopen run {run_id}", reopen)
    else:
        run_id = _opening(client, "create the run", lambda: client.create_run(
            experiment_id, run_name=name,
            tags=context_registry.resolve_tags(tags | {MLFLOW_RUN_NAME: name})).info.run_id)
    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed,
                                       tracking_uri=client.tracking_uri)
        monitor.start()
    recorder = RunRecorder(client, run_id, log_every_steps, spool_path, monitor, held)
    if resumed:
        recorder.set_tags(tags)
    return recorder


def _opening(client: MlflowClient, what: str, call: Callable[[], str]) -> str:
    """`call()`, tried OPEN_TRIES times with waits of OPEN_WAIT, then twice, four times as
    long while the store fails; then StoreError saying that nothing was trained."""
    for attempt in range(OPEN_TRIES - 1):
        with contextlib.suppress(*store.STORE_ERRORS):
            return call()
        time.sleep(OPEN_WAIT * 2 ** attempt)
    try:
        return call()
    except store.STORE_ERRORS as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise store.StoreError(masking.mask(
            f"the MLflow store {client.tracking_uri} does not answer: could not {what} "
            f"after {OPEN_TRIES} tries ({type(e).__name__}: {first}); nothing was trained: "
            f"run the command again when the store answers")) from e


def _held_points(client: MlflowClient, run_id: str, spool_path: Path | None
                 ) -> set[tuple[str, int]]:
    """The (key, step) points run `run_id` holds: in the store, and in its spool when it
    has one (a resume whose store did not take the spool yet)."""
    stored = client.get_run(run_id).data.metrics
    held = {(m.key, m.step) for key in stored if not key.startswith(keys.SYSTEM_PREFIX)
            for m in client.get_metric_history(run_id, key)}
    if spool_path is not None:
        held |= {(r["key"], r["step"]) for r in spoollib.Spool(spool_path).read()
                 if r["kind"] == "metric" and r["run_id"] == run_id}
    return held


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


def start_failed_run(client: MlflowClient, experiment_id: str, name: str,
                     tags: Mapping[str, str], error: BaseException,
                     parent_run_id: str | None = None) -> str:
    """Record a job that could not start (e.g. an invalid combination in a sweep) as a
    FAILED run with its error, so the sweep shows it."""
    recorder = start_run(client, experiment_id, name, tags, parent_run_id=parent_run_id)
    recorder.finish("FAILED", error)
    return recorder.run_id
