"""Shared fixtures: isolated data/tracking locations, the project's command-line tools, a
free port; the real engines' fixtures (SLURM, PostgreSQL, MLflow servers) come from
engine_fixtures.py, a plugin of this suite."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

pytest_plugins = ["engine_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """The console script `name` of the environment running the tests."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test reads the user's data cache, writes to their MLflow store or into the
    checkout (MLflow puts a SQLite store's artifacts under ./mlruns), or phones home."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    for var in ("MLFLOW_TRACKING_URI", "MLP_LAB_ARCHIVE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLP_LAB_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running mlp-train in a subprocess inside tmp_path."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OPENBLAS_NUM_THREADS"] = env.get("OPENBLAS_NUM_THREADS", "1")
    return env


@pytest.fixture
def mlp_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
            ) -> pytest.LogCaptureFixture:
    """caplog at WARNING and above for the "mlp" logger, which reaches it whatever logging
    config an earlier in-process run (Hydra's dictConfig) left behind."""
    logger = logging.getLogger("mlp")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "disabled", False)
    caplog.set_level(logging.WARNING, logger="mlp")
    return caplog
