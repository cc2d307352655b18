"""Fixtures that start the real engines of a team setup for the tests marked `slurm` and
`server`, through the scripts in engines/ (the ones a developer and .ci/run use), and stop
them afterwards. Each skips with the reason when its engine cannot be had here (no sbatch,
no PostgreSQL and not root to install it, no PostgreSQL driver). Everything listens on
127.0.0.1, on ports free at the time. A test module imports the `fixture_<name>` functions
it needs; its tests ask for `<name>`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, free_port, tool

ENGINES = ROOT / "engines"
START_TIMEOUT = 300  # seconds for a script to install (apt) and start its engine
STOP_TIMEOUT = 60




def script(name: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = START_TIMEOUT) -> None:
    """Run engines/<name> with `args`; a failure shows the script's output."""
    done = subprocess.run(["bash", str(ENGINES / name), *args], env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"engines/{name} failed:\n{done.stdout}\n{done.stderr}"


def _root() -> bool:
    return os.geteuid() == 0


def _postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


def _skip_without_postgres() -> None:
    if not _postgres_installed() and not (_root() and shutil.which("apt-get")):
        pytest.skip("PostgreSQL is not installed and cannot be (needs root and apt-get): "
                    "apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the PostgreSQL driver is missing: pip install -e '.[server]'")


def _engine_dir(prefix: str) -> Path:
    """A fresh directory for an engine's files. Under /tmp, not pytest's tmp_path: as root,
    PostgreSQL runs as the `postgres` user, who cannot enter root's 0700 pytest directory."""
    return Path(tempfile.mkdtemp(prefix=f"mlp-lab-{prefix}-", dir="/tmp"))


# -- SLURM ---------------------------------------------------------------------------------------

def _slurm_node_up() -> bool:
    done = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True,
                          text=True, timeout=30)
    return done.returncode == 0 and any(
        s.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing")
        for s in done.stdout.splitlines())


@pytest.fixture(scope="module", name="slurm_cluster")
def fixture_slurm_cluster() -> Iterator[None]:
    """A SLURM cluster that takes jobs: the one that runs, or a one-node cluster started by
    engines/slurm-up.sh (as root) and stopped again after the module."""
    if not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed (no sbatch): as root, engines/slurm-up.sh "
                    "installs and starts a one-node cluster")
    if _slurm_node_up():
        yield
        return
    if not _root():
        pytest.skip("SLURM is installed but no node takes jobs, and starting the daemons "
                    "needs root: sudo engines/slurm-up.sh")
    script("slurm-up.sh")
    try:
        yield
    finally:
        script("slurm-down.sh", timeout=STOP_TIMEOUT)


# -- PostgreSQL and the MLflow server ------------------------------------------------------------

@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL of engines/postgres-up.sh: its role can create databases."""
    dir: Path
    port: int
    user: str
    password: str

    def uri(self, database: str, driver: str = "postgresql+psycopg",
            with_password: bool = False) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"{driver}://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database `name` owned by the role; returns its URI (no password:
        clients take it from PGPASSWORD)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                             password=self.password, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


def _pg_env(port: int) -> dict[str, str]:
    return dict(os.environ, MLP_LAB_PG_PORT=str(port), MLP_LAB_PG_USER="mlflow")


@pytest.fixture(scope="module", name="postgres")
def fixture_postgres() -> Iterator[Postgres]:
    """A private PostgreSQL (engines/postgres-up.sh in a fresh directory, a free port),
    stopped and deleted after the module."""
    _skip_without_postgres()
    where, port = _engine_dir("postgres"), free_port()
    try:
        script("postgres-up.sh", str(where), env=_pg_env(port))
        yield Postgres(where, port, "mlflow", (where / "password").read_text().strip())
    finally:
        script("postgres-down.sh", str(where), env=_pg_env(port), timeout=STOP_TIMEOUT)
        shutil.rmtree(where, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server` of engines/mlflow-server-up.sh."""
    dir: Path
    url: str
    postgres: Postgres
    admin_password: str | None  # basic auth: the admin's password

    def call(self, method: str, endpoint: str, body: dict | None = None,
             auth: tuple[str, str] | None = None) -> tuple[int, dict]:
        """(HTTP status, JSON answer) of the REST API's `endpoint` (after /api/2.0/mlflow/),
        as user `auth` = (name, password) when given."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=data,
                                         method=method,
                                         headers={"Content-Type": "application/json"})
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, {}


def _start_server(auth: str | None) -> Iterator[MlflowServer]:
    _skip_without_postgres()
    where, pg_port, port = _engine_dir("server"), free_port(), free_port()
    env = dict(_pg_env(pg_port), MLP_LAB_MLFLOW_PORT=str(port), MLFLOW=tool("mlflow"))
    if auth:
        env["MLP_LAB_MLFLOW_AUTH"] = auth
    try:
        script("mlflow-server-up.sh", str(where), env=env)
        postgres = Postgres(where / "postgres", pg_port, "mlflow",
                            (where / "postgres" / "password").read_text().strip())
        admin = where / "admin-password"
        yield MlflowServer(where, f"http://127.0.0.1:{port}", postgres,
                           admin.read_text().strip() if auth else None)
    finally:
        script("mlflow-server-down.sh", str(where), env=env, timeout=STOP_TIMEOUT)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module", name="mlflow_server")
def fixture_mlflow_server() -> Iterator[MlflowServer]:
    """`mlflow server` on a private PostgreSQL, artifacts served from its directory."""
    yield from _start_server(None)


@pytest.fixture(scope="module", name="mlflow_auth_server")
def fixture_mlflow_auth_server() -> Iterator[MlflowServer]:
    """The same with MLflow's basic-auth app (users in PostgreSQL too)."""
    yield from _start_server("basic")
