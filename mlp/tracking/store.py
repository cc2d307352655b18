"""Opening the MLflow tracking store safely: one process at a time creates a SQLite store.

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

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

# Worst case per call against a server that refuses connections: 2 retries with back-off
# 1 s, 2 s (+ jitter up to 1 s each) ~ 5 s; against one that accepts and hangs: 3 x 10 s.
HTTP_POLICY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class StoreError(RuntimeError):
    """The tracking store cannot be opened (bad path, broken database, no server)."""


# What a store that cannot be used raises: ours, MLflow's errors (an HTTP call that gave
# up included), the database's, the OS's.
STORE_ERRORS = (StoreError, MlflowException, SQLAlchemyError, OSError)


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


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient for `uri` whose store exists and has MLflow's current schema.

    For a SQLite URI the store is created or migrated under `file_lock`, so any number of
    processes may call this at once on a fresh file. Any failure raises StoreError with a
    message that names the store and what to check.
    """
    db = sqlite_path(uri)
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
