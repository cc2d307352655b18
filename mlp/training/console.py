"""What `mlp-train` says while it works: one line per epoch, and the commands that continue
or repeat a run.

The lines go through the `mlp` logger, which Hydra sends to stdout and to the job's log
file, so they show in a terminal, a CI log, `docker logs`, a SLURM output file or a pipe
alike (tqdm's bars, which need a terminal, only add to them there).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable

log = logging.getLogger("mlp")


class EpochPrinter:
    """An `Observer` of the training loop that logs one line per epoch:

    epoch 3/10  loss 1.412 / 1.498 (gap +0.086)  acc 0.512 / 0.471 (gap +0.041)  lr 1.0e-02  4.1 s

    (train / validation, gap = validation - train for the loss, train - validation for the
    accuracy).
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_step(self, step: int, loss: float, lr: float) -> None:
        pass

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        m = metrics
        log.info("epoch %d/%d  loss %.4f / %.4f (gap %+.4f)  acc %.4f / %.4f (gap %+.4f)  "
                 "lr %.2e  %.1f s", epoch, self.epochs, m["train_loss"], m["val_loss"],
                 m["gap_loss"], m["train_acc"], m["val_acc"], m["gap_acc"], m["lr"],
                 m["epoch_time"])


def command(program: str, overrides: Iterable[str], extra: Iterable[str] = ()) -> str:
    """A shell command line: program, the overrides (those naming a key in `extra` are
    replaced by it), then `extra`."""
    extra = list(extra)
    replaced = {e.partition("=")[0] for e in extra}
    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in replaced]
    return shlex.join([program, *kept, *extra])
