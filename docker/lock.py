"""Regenerate docker/requirements.lock: every package the image installs, pinned, with hashes.

Run from anywhere, with uv installed (`pip install uv`):

    python3 docker/lock.py

It resolves pyproject.toml's [project.dependencies], the extras the image ships (EXTRAS) and
docker/requirements.in for the image's Python (3.11, Linux) with `uv pip compile
--generate-hashes`, and writes a header line `# dependencies-sha256: ...` with the hash of those
inputs, which tests/engines/test_docker.py recomputes to tell, offline, whether the lock is
older than pyproject.toml.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

DOCKER = Path(__file__).resolve().parent
ROOT = DOCKER.parent
LOCK = DOCKER / "requirements.lock"
EXTRA = DOCKER / "requirements.in"
PYTHON_VERSION = "3.11"  # the Python of the image's base (docker/Dockerfile)
EXTRAS = ("optuna", "server")  # pyproject.toml's optional dependencies that the image has too
HASH_PREFIX = "# dependencies-sha256: "


def dependency_lines(pyproject: Path = ROOT / "pyproject.toml", extra: Path = EXTRA) -> list[str]:
    """The lock's inputs, one requirement a line without spaces, sorted: pyproject.toml's
    [project.dependencies] and EXTRAS, and the non-comment lines of docker/requirements.in."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project["dependencies"])
    for extra_name in EXTRAS:
        lines += project["optional-dependencies"][extra_name]
    for line in extra.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return sorted("".join(line.split()) for line in lines)


def dependencies_sha256(pyproject: Path = ROOT / "pyproject.toml", extra: Path = EXTRA) -> str:
    """sha256 (hex) of `dependency_lines`, joined by newlines: what the lock's header records."""
    text = "\n".join(dependency_lines(pyproject, extra)) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> int:
    if shutil.which("uv"):
        uv = ["uv"]
    elif importlib.util.find_spec("uv"):
        uv = [sys.executable, "-m", "uv"]
    else:
        print("docker/lock.py needs uv: pip install uv", file=sys.stderr)
        return 1
    args = ["pip", "compile", "pyproject.toml", *(f"--extra={name}" for name in EXTRAS),
            "docker/requirements.in", "--generate-hashes", "--python-version", PYTHON_VERSION,
            "--python-platform", "linux", "--no-header", "--quiet"]
    done = subprocess.run(uv + args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    body = done.stdout
    header = (
        "# The Docker image's dependencies, pinned with hashes. Do not edit: regenerate with\n"
        "#   python3 docker/lock.py\n"
        f"# (uv {' '.join(args[:-1])})\n"
        f"{HASH_PREFIX}{dependencies_sha256()}\n"
    )
    LOCK.write_text(header + body)
    print(f"wrote {LOCK.relative_to(ROOT)}: {body.count('==')} pinned packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
