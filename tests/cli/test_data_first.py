"""A single run's data is loaded before Hydra starts (a data problem exits 2 with nothing
created), from the config the command-line check composed: the run then finds the same
splits, not loaded twice, only when both configs name the same data."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from mlp.cli import build
from mlp.config import schema
from mlp.config.command_line import check_command_line


@pytest.mark.parametrize("argv", [
    [], ["data=synthetic"], ["experiment=best_mlp"], ["experiment=cs231n_two_layer"],
    ["data.limit=1000", "data.val_size=100", "seed=3"],
])
def test_the_checked_config_names_the_data_the_run_loads(argv, monkeypatch, tmp_path):
    monkeypatch.setenv("MLP_LAB_DATA", str(tmp_path))
    checked = check_command_line(argv)
    assert checked is not None and checked.runs and not checked.sweep
    schema.register()
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        run = compose(config_name="config", overrides=argv)
    assert build.data_key(checked.config) == build.data_key(run)


def test_printing_the_config_loads_nothing():
    assert not check_command_line(["--cfg", "job"]).runs
    assert check_command_line(["--help"]) is None
    assert check_command_line(["-m", "optim.lr=1e-3,1e-2"]).sweep
