"""Secrets kept out of everything mlp-train writes: log lines, Hydra's files, MLflow records.

The secrets are those `mlp.secrets` finds in the environment (MLFLOW_TRACKING_PASSWORD,
PGPASSWORD, a password inside MLFLOW_TRACKING_URI, ...) and in the command line (a
`tracking.uri=http://user:password@host` override); any URI's password is masked too.
`install` makes every log record masked (Hydra's launcher prints the jobs' overrides, and
its job log files hold what the run logs); `MaskHydraFiles`, a Hydra callback
(`conf/config.yaml`), rewrites the files Hydra saved for a job (`.hydra/config.yaml`,
`hydra.yaml`, `overrides.yaml`) and the sweep's `multirun.yaml` before the job runs; and
`mask` / `mask_tree` are applied by `tracking` to every param, tag and config artifact.

`install` also masks what is printed rather than logged: warnings (the recorder's "the
MLflow store does not answer (... http://user:pw@...)"), the traceback of an uncaught
exception, and every write to `sys.stdout` / `sys.stderr`, where Hydra prints a job's
exception itself (`hydra._internal.utils.run_and_report`: `traceback.print_exception`)
and MLflow its "View run ... at: <URI>" lines (`TrackingServiceClient._log_url`:
`sys.stdout.write`). A secret split across two writes is not recognized; a URI written
whole (print, traceback lines) is.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mlp.tracking import secrets

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


@functools.cache
def _secrets() -> tuple[str, ...]:
    found = secrets.env_secrets()
    for arg in sys.argv[1:]:
        found += secrets.uri_secrets(arg)
    return tuple(found)


def mask(text: str) -> str:
    """`text` with the process's secrets and every URI's password replaced by `***`."""
    return secrets.mask_text(text, _secrets())


def mask_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, strings, numbers) with its strings masked."""
    if isinstance(tree, dict):
        return {key: mask_tree(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [mask_tree(value) for value in tree]
    return mask(tree) if isinstance(tree, str) else tree


def mask_file(path: Path) -> None:
    """Rewrite a text file with its secrets masked (nothing when it holds none)."""
    text = path.read_text(encoding="utf-8")
    masked = mask(text)
    if masked != text:
        path.write_text(masked, encoding="utf-8")


def install() -> None:
    """Mask what this process writes from now on (idempotent): every log record, whoever
    logs it and wherever it goes; every warning; an uncaught exception's traceback; and
    whatever is written to sys.stdout and sys.stderr. The warning and traceback hooks hold
    also when the streams are replaced later (a test's capture, `redirect_stderr`)."""
    _mask_log_records()
    _mask_warnings()
    _mask_excepthook()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, MaskedStream):
            setattr(sys, name, MaskedStream(stream))


def _mask_log_records() -> None:
    factory = logging.getLogRecordFactory()
    if getattr(factory, "masks_secrets", False):
        return

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = mask(record.getMessage())
        if message != record.getMessage():
            record.msg, record.args = message, None
        return record

    masked_record.masks_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked_record)


def _mask_warnings() -> None:
    # warnings.showwarning (to stderr) and logging.captureWarnings both format through
    # warnings.formatwarning: masking there masks a warning wherever it goes.
    formatwarning = warnings.formatwarning
    if getattr(formatwarning, "masks_secrets", False):
        return

    def masked_formatwarning(*args: Any, **kwargs: Any) -> str:
        return mask(formatwarning(*args, **kwargs))

    masked_formatwarning.masks_secrets = True  # type: ignore[attr-defined]
    warnings.formatwarning = masked_formatwarning


def _mask_excepthook() -> None:
    if getattr(sys.excepthook, "masks_secrets", False):
        return

    def masked_excepthook(kind: type[BaseException], value: BaseException,
                          tb: TracebackType | None) -> None:
        sys.stderr.write(mask("".join(traceback.format_exception(kind, value, tb))))

    masked_excepthook.masks_secrets = True  # type: ignore[attr-defined]
    sys.excepthook = masked_excepthook


class MaskedStream:
    """A text stream that masks each text written before passing it to `stream`; every
    other attribute (flush, fileno, isatty, encoding, ...) is the stream's."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(mask(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class MaskHydraFiles(Callback):
    """Mask the files Hydra saved for a job (and a sweep) before the job runs."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        install()
        paths = [Path(config.hydra.sweep.dir) / "multirun.yaml"]
        if config.hydra.output_subdir is not None:
            output = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir
            paths += [output / name for name in HYDRA_FILES]
        for path in paths:
            if path.is_file():
                mask_file(path)
