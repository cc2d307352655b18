"""mlp-lab's Optuna sweeper for Hydra: `mlp-train -m hydra/sweeper=mlp_optuna ...`.

`config.py` registers the sweeper's config in Hydra's ConfigStore (group `hydra/sweeper`,
name `mlp_optuna`); `mlp_optuna_sweeper.py` is the sweeper and documents its settings and
the search-space syntax. Hydra finds both by scanning the `hydra_plugins` namespace package.
"""
