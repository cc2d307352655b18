"""mlp-lab's grid sweeper for Hydra, the default of `mlp-train -m` (`hydra/sweeper=mlp_grid`):
Hydra's basic sweeper without its second composition of every job before the launch
(`mlp_grid_sweeper.py` says why). Hydra finds it by scanning the `hydra_plugins`
namespace package.
"""
