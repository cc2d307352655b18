"""The console entry points, each a thin composition: `mlp-train` (`train`),
`mlp-gradcheck` (`gradcheck`), `mlp-report` (`report`), `mlp-sync` (`sync`),
`mlp-reproduce` (`reproduce`); the objects of a run built from its config (`build`) and
the exit codes (`exits`).

May import: everything.
"""
