"""The training loop (`trainer.Trainer`: batch, step, evaluate, early stop, checkpoint),
a model's scores over test-time views (`inference`, which the served model imports too),
the moving average of the weights (`ema`), the checkpoint format (`checkpoint`), the
console's epoch lines (`console`) and the memory estimate of a config (`budget`).

May import: `mlp.core`, `mlp.data`, `mlp.errors`, NumPy, tqdm.
"""
