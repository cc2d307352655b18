"""The record of a run in MLflow: the store, its one URI and the client every command
passes down (`store`), what a run logs (`recorder`, `keys`, `plots`), how its points
get there (`sink`) and the spool that keeps what the store did not take (`spool`),
liveness of runs (`liveness`), secrets kept out of the record (`secrets`, `masking`),
the served model (`serving`) and reproducing a run (`reproduce`).

May import: `mlp.config`, `mlp.training`, `mlp.data`, `mlp.core`, `mlp.errors`, MLflow.
"""
