"""The one way to the MLflow tracking store: which store (`resolve_uri`), a client for it
(`open_client`, `connect`), made once by each command and passed down to everything that
talks to the store. Nothing in `mlp` reads or sets MLflow's process-wide tracking URI
(`mlflow.set_tracking_uri`), except `process_uri` around the one MLflow call that has no
other way (logging a model).

Which store: the command's own option (`tracking.uri=...` of mlp-train, mlp-gradcheck and a
sweep; `--uri` of mlp-report; `--tracking-uri` of mlp-reproduce), else
$MLFLOW_TRACKING_URI, else `sqlite:///<launch dir>/mlflow.db`: what is typed for this
command beats the shell's environment, which beats the default.

Opening a SQLite store safely: one process at a time creates it.

MLflow creates (or migrates) the tables of a SQLite store the first time a process opens
it, with Alembic migrations that are not safe to run from several processes at once: four
`mlp-train` started together on a fresh store crashed 3 of 4 times (`table
_alembic_tmp_params already exists`, `duplicate column name: step`) and could leave a
temporary migration table behind. `open_client` therefore takes an exclusive `fcntl` lock
on a file beside the database (`<db>.lock`) while MLflow opens the store, so the first
process creates the tables and the others wait, then find them. The lock is held only for
opening: writers afterwards share the store as SQLite allows.

It also sets the HTTP retry policy for a tracking server (`HTTP_POLICY`), so that every
call of a run, not only the first, gives up within a bounded time: MLflow's defaults (7
retries, back-off factor 2, 120 s timeout) kept a process retrying for minutes after its
server died. A user's own `MLFLOW_HTTP_REQUEST_*` settings win.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

URI_VAR = "MLFLOW_TRACKING_URI"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the MLflow UI's model-training view

# Worst case per call against a server that refuses connections: 2 retries with back-off
# 1 s, 2 s (+ jitter up to 1 s each) ~ 5 s; against one that accepts and hangs: 3 x 10 s.
HTTP_POLICY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class StoreError(RuntimeError):
    """The tracking store cannot be used (bad path, broken database, no server)."""


# What a store that cannot be used raises: ours, MLflow's errors (an HTTP call that gave
# up included), the database's, the OS's.
STORE_ERRORS = (StoreError, MlflowException, SQLAlchemyError, OSError)


def resolve_uri(option: str | None, launch_dir: str | Path) -> str:
    """The tracking URI of a command: `option` (the command's own: `tracking.uri=`, `--uri`,
    `--tracking-uri`) when given, else $MLFLOW_TRACKING_URI, else a SQLite file
    `mlflow.db` in `launch_dir` (the directory the command was launched from). A SQLite
    path that is relative is taken from `launch_dir` and made absolute, so that every job
    of a sweep, whatever its working directory, writes to one store."""
    uri = option or os.environ.get(URI_VAR) or "sqlite:///mlflow.db"
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[1:]
    return f"sqlite:///{(Path(launch_dir) / path).resolve()}{''.join(query)}"


def apply_http_policy() -> None:
    """Set HTTP_POLICY in the environment, keeping any value the user set."""
    for key, value in HTTP_POLICY.items():
        os.environ.setdefault(key, value)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for other stores and in-memory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextmanager
def file_lock(path: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `<path>.lock` (created beside `path`) until the block
    ends; other processes asking for it wait. Yields the lock file's path."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield lock
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_client(uri: str, create: bool = True) -> MlflowClient:
    """An MlflowClient for `uri` whose store exists and has MLflow's current schema.

    For a SQLite URI the store is created or migrated under `file_lock`, so any number of
    processes may call this at once on a fresh file; with `create=False` (commands that
    only read, where a typo must not create an empty store) a missing SQLite file is an
    error. Any failure raises StoreError with a message that names the store and what to
    check.
    """
    db = sqlite_path(uri)
    if db is not None and not create and not db.is_file():
        raise StoreError(f"no MLflow store at {db}: run mlp-train there first, or name the "
                         f"store with the command's option or ${URI_VAR}")
    if db is not None and not db.parent.is_dir():
        raise StoreError(f"cannot create the MLflow store {db}: the directory {db.parent} "
                         "does not exist")
    try:
        if db is None:
            return MlflowClient(uri)
        with file_lock(db):
            return MlflowClient(uri)
    except STORE_ERRORS as e:
        hint = ""
        if "_alembic_tmp_" in str(e):
            hint = (" A table `_alembic_tmp_*` was left by an interrupted schema migration "
                    "(MLflow run without this lock): restore the store from a copy or start "
                    "a new one.")
        raise StoreError(f"cannot open the MLflow tracking store {uri}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}."
                         f"{hint}") from e


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client for `uri` (`open_client`, after `apply_http_policy`) and the id of
    `experiment` there, created when missing and tagged for the UI's model-training view.
    A server that does not answer raises StoreError at once (before any training),
    instead of MLflow's minutes of retries; so does a store that cannot be opened."""
    apply_http_policy()
    client = open_client(uri)
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
        raise StoreError(f"cannot use the MLflow tracking store at {uri}: {e}. Check "
                         f"tracking.uri / {URI_VAR} and that the server is up.") from e
    except OSError as e:
        raise StoreError(f"cannot reach the MLflow tracking store at {uri}: {e}") from e
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return client, experiment_id


@contextmanager
def process_uri(client: MlflowClient) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to the client's for the block, then unset
    again (and $MLFLOW_TRACKING_URI, which `mlflow.set_tracking_uri` also writes, restored).

    Only for an MLflow call that takes neither a client nor a URI: `Model.log` (behind
    `mlflow.pyfunc.log_model`) in MLflow 3.17 finds its store only through the global.
    Nothing else in `mlp` sets or reads the global (tests/tracking/test_store.py), so
    there is nothing to restore but the unset state."""
    saved = os.environ.get(URI_VAR)
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if saved is not None:
            os.environ[URI_VAR] = saved
