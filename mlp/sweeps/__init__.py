"""Sweeps (`mlp-train -m`): the parent run and its skip/resume policy (`callback`), the
comparison of its children (`report`, `figures`) and Optuna's pruning (`pruning`).

May import: `mlp.tracking` and everything below it.
"""
