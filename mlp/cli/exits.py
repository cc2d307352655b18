"""What the console commands exit with, and the messages that go with it: 0 success,
1 failure (a run that diverged or crashed; a sweep with any failed job), 2 a config (or
data, or store, or a checkpoint) refused before work, 3 a failed gradient check, 4 trained
but the record is incomplete (the store lacks points, tags, files or the model the run
produced: they are in its spool or beside it, and the last line names the `mlp-sync`
command that sends them; a sweep with an incomplete child and no failed one), 130
interrupted (a sweep too)."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from mlp.config.command_line import Checked, check_command_line
from mlp.sweeps import slurm
from mlp.tracking import masking, store
from mlp.tracking.receipt import Receipt

EXIT_FAILED = 1  # a run failed; a sweep any of whose jobs failed (its last line names them)


EXIT_CONFIG = 2


EXIT_GRADCHECK = 3


EXIT_INCOMPLETE = 4  # trained, but the record is incomplete (`mlp.record`, receipt.py)


EXIT_INTERRUPTED = 130


def leave(main: Callable[[], object]) -> NoReturn:
    """Run a command's `main`, then end the process with its exit code without Python's
    teardown of every module it imported (mlflow, SQLAlchemy, pandas, matplotlib: 0.5 s
    after the imports alone, 1 s after a sweep, measured here). What that teardown does
    which matters is done first, in Python's order: the threads that are not daemons are
    stopped and joined, the atexit handlers run (a sweep's parent run ended, the painter stopped,
    logging flushed), stdout and stderr are flushed. An exception other than SystemExit
    with a number takes Python's own way out (its traceback, its exit code)."""
    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    # What Python's own exit calls, in its order: threading's exit callbacks (a thread
    # pool's workers, MLflow's async logging among them, are told to stop), the join of
    # every thread that is not a daemon, then the atexit handlers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a stream closed
            pass
    os._exit(code)


class GradcheckFailed(RuntimeError):
    """The run's own gradient check failed and gradcheck.stop_on_fail is set."""


def incomplete(what: str, receipt: Receipt) -> None:
    """The last line of a run that trained but whose record is incomplete, and exit 4."""
    command = receipt.sync_command()
    print(masking.mask(f"mlp-lab: {what} trained, but its record is {receipt.tag()}"
                       + (f"; send it with: {command}" if command else "")), file=sys.stderr)
    sys.exit(EXIT_INCOMPLETE)


def refused(what: str, error: object) -> NoReturn:
    """A command refused before work: one line, `mlp-lab: <what>: <error>`, and exit 2."""
    print(masking.mask(f"mlp-lab: {what}: {error}"), file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def config_error(e: ValueError) -> NoReturn:
    refused("invalid configuration", e)


def connect(cfg: DictConfig, launch_dir: Path) -> tuple[MlflowClient, str]:
    """(a client for the run's store, the experiment id): the store of `tracking.uri`,
    $MLFLOW_TRACKING_URI or `<launch_dir>/mlflow.db` (`store.resolve_uri`); or exit 2
    with a clear message when it is unusable."""
    uri = store.resolve_uri(cfg.tracking.uri, launch_dir)
    try:
        return store.connect(uri, cfg.tracking.experiment)
    except store.StoreError as e:
        print(masking.mask(f"mlp-lab: {e}"), file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def check_command_line_or_exit(config_name: str = "config") -> Checked | None:
    """Refuse the command line when a config it asks for (every combination of a sweep)
    breaks the schema, or when a sweep's SLURM jobs ask for more than a node of their
    partition has (they would wait forever), before Hydra creates a directory, a store is
    opened or a job is submitted (exit 2). Returns what was checked (`check_command_line`)."""
    try:
        checked = check_command_line(sys.argv[1:], config_name)
        launcher = checked.config.hydra.launcher if checked and checked.sweep else {}
        if slurm.is_slurm(launcher):
            request = OmegaConf.to_container(launcher, resolve=False)
            slurm.check_request(request, slurm.partition(request.get("partition")))
    except ValueError as e:  # OverrideError, ConfigError, the code's own checks
        config_error(e)
    return checked

