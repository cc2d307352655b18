"""The console entry points, each a thin composition: `mlp-train` (`train`),
`mlp-gradcheck` (`gradcheck`), `mlp-report` (`report`), `mlp-sync` (`sync`),
`mlp-reproduce` (`reproduce`); the objects of a run built from its config (`build`) and
the exit codes (`exits`).

May import: everything.
"""

import os

# Before any command imports mlflow, which sets its loggers' level once, at import: its INFO
# lines (database tables created, migrations) would drown the command's own output.
# MLFLOW_LOGGING_LEVEL=INFO brings them back.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
