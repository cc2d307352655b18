"""The training loop (`trainer.Trainer`: batch, step, evaluate, early stop, checkpoint),
the moving average of the weights (`ema`), the checkpoint format (`checkpoint`), the
console's epoch lines (`console`) and the memory estimate of a config (`budget`).

May import: `mlp.core`, `mlp.data`, `mlp.errors`, NumPy, tqdm.
"""
