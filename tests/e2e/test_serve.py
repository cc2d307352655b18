"""The best model of a sweep, registered as @champion, loads and serves where only mlflow and
NumPy are installed: a fresh virtualenv with exactly those two and what they require (made
offline from the installed distributions: no mlp-lab, no tqdm), from a directory outside
the repository. Over REST it answers pixels on the 0-255 scale (whole numbers or floats)
with class probabilities, and refuses floats on a 0-1 scale with a 400 naming the scale."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, tool
from helpers import FAST, overriding
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = [pytest.mark.e2e, pytest.mark.serve]

# the model logged this time (FAST leaves it out)
SWEEP = overriding(FAST, "tracking.log_model=true", "optim.lr=0.01,0.03")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with exactly mlflow (this version), NumPy and what they require: no
    mlp-lab, no tqdm. Made offline from this interpreter's installed distributions."""
    python = bare_venv(tmp_path_factory.mktemp("bare") / "venv", ["mlflow", "numpy"])
    missing = subprocess.run([str(python), "-c", "import tqdm"], capture_output=True)
    assert missing.returncode != 0, "the bare venv must not have tqdm"
    return python


def bare_venv(where: Path, requirements: list[str]) -> Path:
    """A venv at `where` holding `requirements` and their dependency closure (markers
    evaluated here, no extras): each distribution's top-level entries symlinked from this
    interpreter's site-packages, its console scripts written for the venv's python.
    Returns that python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(where)}))
    python = where / "bin" / "python"
    for dist in _closure(requirements):
        for top in sorted({Path(f).parts[0] for f in dist.files or ()} - {".."}):
            _link(Path(dist.locate_file(top)), site / top, dist)
        for entry in dist.entry_points.select(group="console_scripts"):
            script = where / "bin" / entry.name
            script.write_text(f"#!{python}\nimport sys\nfrom importlib.metadata import "
                              f"EntryPoint\nsys.exit(EntryPoint({entry.name!r}, "
                              f"{entry.value!r}, 'console_scripts').load()())\n")
            script.chmod(0o755)
    return python


def _closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions that `requirements` need, transitively."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen[name] = metadata.distribution(name)
        todo += [Requirement(r) for r in seen[name].requires or ()]
    return list(seen.values())


def _link(src: Path, dst: Path, dist: metadata.Distribution, depth: int = 1) -> None:
    """Symlink `src` at `dst`; a directory two distributions may share (a namespace package
    such as `opentelemetry/util`) is made real, and only this distribution's entries under
    it are linked in. `depth`: how many parts of the distribution's paths `src` spans."""
    if not src.exists():
        return
    shared = src.is_dir() and not (src / "__init__.py").exists() and not (
        src.suffix == ".libs" or src.name.endswith(".dist-info"))
    if not shared:
        if not dst.exists():
            dst.symlink_to(src)
        return
    dst.mkdir(exist_ok=True)
    below = {Path(f).parts[depth] for f in dist.files or ()
             if len(Path(f).parts) > depth and Path(f).parts[depth - 1] == src.name
             and dist.locate_file(Path(*Path(f).parts[:depth])) == src}
    for name in sorted(below):
        _link(src / name, dst / name, dist, depth + 1)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_champion_loads_and_serves_with_only_mlflow_and_numpy(tmp_path: Path, run_env: dict,
                                                                  bare_python: Path):
    out = subprocess.run([tool("mlp-train"), "-m", *SWEEP], cwd=tmp_path, env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = next(r for r in client.search_runs(["1"]) if r.data.tags.get("mlp.sweep"))
    name = parent.data.tags["mlp.sweep.registered_model"].split("@")[0]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == parent.data.tags["mlp.sweep.best_run_id"]

    elsewhere = tmp_path / "serving"  # no mlp-lab source here: the model carries its code
    elsewhere.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3072))
    np.save(elsewhere / "x.npy", pixels.astype(np.float64))
    bin_dir = bare_python.parent
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONSAFEPATH": "1"}
    loaded = subprocess.run(
        [str(bare_python), "-c", "import sys, numpy as np, mlflow\n"
         "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
         "np.save('probs.npy', model.predict(np.load('x.npy')))\n", f"models:/{name}@champion"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    in_python = np.load(elsewhere / "probs.npy")
    assert in_python.shape == (3, 10)

    port = free_port()
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(1)
        whole = _post(url, {"inputs": pixels.tolist()})
        floats = _post(url, {"inputs": (pixels + 0.25).clip(0, 255).tolist()})
        unit_scale = _post(url, {"inputs": (pixels / 255).tolist()})
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    assert whole[0] == 200 and floats[0] == 200, (whole, floats)
    probs = np.asarray(whole[1]["predictions"])
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(probs, in_python, rtol=1e-12)
    assert np.asarray(floats[1]["predictions"]).shape == (3, 10)
    assert unit_scale[0] == 400
    assert "expected the 0-255 scale" in json.dumps(unit_scale[1])
