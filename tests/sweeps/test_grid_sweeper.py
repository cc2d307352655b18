"""The default grid sweeper (`hydra/sweeper=mlp_grid`): Hydra's basic sweeper, without its
second composition of every job (mlp-train composed and checked them before Hydra began)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from omegaconf import OmegaConf

from mlp.config import schema

# Hydra's plugin scan executes the sweepers' modules again (once per process): the classes
# to test are the ones it leaves, as Hydra instantiates them.
Plugins.instance()
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: E402

from hydra_plugins.mlp_grid_sweeper.mlp_grid_sweeper import MlpGridSweeper  # noqa: E402


class _Loader:
    """A config loader that counts the jobs composed through it."""

    def __init__(self) -> None:
        self.composed: list[list[str]] = []

    def load_sweep_config(self, master_config: object, sweep_overrides: list[str]) -> None:
        self.composed.append(list(sweep_overrides))


def test_mlp_train_sweeps_with_the_grid_sweeper_by_default():
    schema.register()  # what mlp-train does before Hydra composes
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
        basic = compose(config_name="config", overrides=["hydra/sweeper=basic"],
                        return_hydra_config=True)
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "mlp_grid"
    assert cfg.hydra.sweeper._target_.endswith("mlp_grid_sweeper.MlpGridSweeper")
    assert basic.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@pytest.mark.parametrize("kind, composed", [(BasicSweeper, 4), (MlpGridSweeper, 0)])
def test_the_grid_is_hydras_and_no_job_is_composed_before_the_launch(kind, composed):
    loader = _Loader()
    sweeper = kind(max_batch_size=None)
    sweeper.hydra_context = HydraContext(config_loader=loader, callbacks=None)
    sweeper.config = OmegaConf.create({})
    parsed = OverridesParser.create().parse_overrides(["optim.lr=0.1,0.2", "model.reg=0,0.001"])
    batch = BasicSweeper.split_arguments(parsed, None)[0]
    assert [list(job) for job in batch] == [
        ["optim.lr=0.1", "model.reg=0"], ["optim.lr=0.1", "model.reg=0.001"],
        ["optim.lr=0.2", "model.reg=0"], ["optim.lr=0.2", "model.reg=0.001"]]
    sweeper.validate_batch_is_legal(batch)
    assert len(loader.composed) == composed
