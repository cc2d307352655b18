"""The grid sweeper `mlp-train -m` uses (`hydra/sweeper=mlp_grid`, conf/config.yaml):
Hydra's basic sweeper, grid and batches alike, without `validate_batch_is_legal`.

Hydra's sweeper composes every job's config before it launches a batch, to fail before
any job runs; the launcher then composes each job's config again to run it. mlp-train
has done that check already, and more: before Hydra starts, `mlp.config.check_command_line`
composes the sweep's every combination and checks it against the schema (exit 2,
nothing created). The second composition cost 0.29 s per job on 2 cores (a sweep of 4
jobs: 1.2 s of its 55 s; `experiments/bench_sweep.py`). `hydra/sweeper=basic` still
picks Hydra's own. (No `from __future__ import annotations`: Hydra's plugin scan runs this
module before it is in sys.modules, where dataclasses would look string annotations up.)
"""

from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore


class MlpGridSweeper(BasicSweeper):
    """Hydra's basic sweeper; each job's config is composed once, by the launcher."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Checked before Hydra started (`mlp.config.check_command_line`)."""


@dataclass
class MlpGridSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.mlp_grid_sweeper.mlp_grid_sweeper.MlpGridSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="mlp_grid", node=MlpGridSweeperConf,
                             provider="mlp-lab")
