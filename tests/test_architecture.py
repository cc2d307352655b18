"""The house's layers hold: the import-linter contracts of pyproject.toml (cli above sweeps
above tracking above config above training above core and data; the core imports NumPy
and the standard library only), and the public face of `mlp` loads lazily."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from importlinter.cli import lint_imports


def test_the_import_contracts_are_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True,
                        no_logo=True)
    assert code == 0, capsys.readouterr().out


def _printed_by(code: str) -> str:
    """What `code` prints in a fresh interpreter (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_the_core_loads_nothing_but_numpy():
    """`import mlp` and the whole core load no tqdm, MLflow, Hydra or data package."""
    code = ("import sys, mlp, mlp.core.model, mlp.core.gradcheck, mlp.core.step; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'tqdm', 'mlflow', 'hydra', 'omegaconf', 'matplotlib'} or "
            "m.startswith(('mlp.data', 'mlp.training', 'mlp.tracking')))))")
    assert _printed_by(code) == ""


def test_the_served_model_loads_nothing_but_numpy_and_the_standard_library():
    """A model carries the `mlp` package and is served where only mlflow and NumPy are
    installed: the import chain of its loader module may not reach tqdm or anything else."""
    code = ("import sys; before = set(sys.modules); import mlp.tracking.serving; print(' '.join("
            "sorted({m.split('.')[0] for m in set(sys.modules) - before} "
            "- set(sys.stdlib_module_names) - {'mlp', 'numpy'})))")
    assert _printed_by(code) == ""


def test_the_public_face():
    import mlp

    assert mlp.MLP.__module__ == "mlp.core.model"
    assert mlp.Trainer.__module__ == "mlp.training.trainer"
    for name in mlp.__all__:
        assert getattr(mlp, name).__name__ == name
