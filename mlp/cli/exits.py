"""What the console commands exit with, and the messages that go with it: 0 success,
1 failure (a run that diverged or crashed; a sweep with any failed job), 2 a config (or
data, or store, or a checkpoint) refused before work, 3 a failed gradient check, 130
interrupted (a sweep too)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from mlp.config.command_line import OverrideError, check_command_line
from mlp.tracking import masking
from mlp.tracking import recorder as tracking

EXIT_FAILED = 1  # a run failed; a sweep any of whose jobs failed (its last line names them)


EXIT_CONFIG = 2


EXIT_GRADCHECK = 3


EXIT_INTERRUPTED = 130


class GradcheckFailed(RuntimeError):
    """The run's own gradient check failed and gradcheck.stop_on_fail is set."""


def config_error(e: ValueError) -> None:
    print(masking.mask(f"mlp-lab: invalid configuration: {e}"), file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def connect(cfg: DictConfig, launch_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment id), or exit with a clear message when unusable."""
    uri = tracking.resolve_uri(cfg.tracking.uri, launch_dir)
    try:
        return uri, tracking.connect(uri, cfg.tracking.experiment)
    except tracking.TrackingError as e:
        print(masking.mask(f"mlp-lab: {e}"), file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def check_command_line_or_exit() -> None:
    """Refuse a mistyped or ill-typed override before Hydra starts (exit 2)."""
    try:
        check_command_line(sys.argv[1:])
    except OverrideError as e:
        config_error(e)
