"""How much does MLflow tracking slow training down?

Trains the same net on the same data twice per repetition, in one process and
alternating: once with no observer, once recording into a fresh MLflow run with per-step
`batch_loss` (every step, the worst case) plus the per-epoch metrics and health numbers.
Prints the median wall times, their difference in percent (noisy on a shared machine),
and the time the training thread itself spent in tracking calls (the recorder's
on_step/on_epoch and the final finish), which is what the < 3% target is about.

    python experiments/bench_tracking.py --archive ../shared/data/cifar-10-python.tar.gz
    python experiments/bench_tracking.py --quick          # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mlp import data as datalib
from mlp.core import optim
from mlp.core.model import MLP
from mlp.tracking import recorder as tracking
from mlp.tracking import store
from mlp.training.trainer import Trainer, TrainSettings


def load(args: argparse.Namespace, root: Path) -> datalib.Splits:
    if args.quick:
        archive = datalib.make_synthetic_archive(root / "synthetic.tar.gz", 2000, 200)
        raw = datalib.load_cifar10(root, archive, datalib.file_digest(archive), progress=False)
        return datalib.split(raw, val_size=200)
    raw = datalib.load_cifar10(Path(args.root) if args.root else datalib.default_root(),
                               args.archive, args.md5, progress=False)
    return datalib.split(raw, val_size=5000, limit=args.limit)


class Timed:
    """Wraps a recorder and adds up the time the training thread spends in it."""

    def __init__(self, inner: tracking.RunRecorder) -> None:
        self.inner, self.seconds = inner, 0.0

    def on_step(self, step: int, loss: float, lr: float) -> None:
        start = time.perf_counter()
        self.inner.on_step(step, loss, lr)
        self.seconds += time.perf_counter() - start

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        self.inner.on_epoch(epoch, metrics)
        self.seconds += time.perf_counter() - start

    def finish(self, status: str) -> None:
        start = time.perf_counter()
        self.inner.finish(status)
        self.seconds += time.perf_counter() - start


def fit(splits: datalib.Splits, normalizer: datalib.Normalizer, epochs: int,
        observer: Timed | None) -> float:
    model = MLP(3072, [100], 10, reg=5e-3, dtype="float32", seed=0)
    opt = optim.make_optimizer("momentum", model.params)
    batch = 200
    schedule = optim.Schedule("exponential", 1e-2, math.ceil(len(splits.y_train) / batch), epochs)
    settings = TrainSettings(epochs=epochs, batch_size=batch, progress=False, seed=0)
    trainer = Trainer(model, opt, schedule, splits, normalizer, settings,
                      observers=[observer] if observer else [])
    start = time.perf_counter()
    trainer.fit()
    if observer is not None:
        observer.finish("FINISHED")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", help="a local cifar-10-python.tar.gz")
    parser.add_argument("--md5", help="its md5, to verify it")
    parser.add_argument("--root", help="data root (default: ~/.cache/mlp-lab)")
    parser.add_argument("--limit", type=int, default=None, help="first N training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="synthetic data, 1 epoch, 1 rep")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.reps = 1, 1

    with tempfile.TemporaryDirectory() as tmp:
        splits = load(args, Path(tmp))
        normalizer = datalib.Normalizer("channel").fit(splits.X_train)
        client, experiment = store.connect(f"sqlite:///{tmp}/mlflow.db", "bench-tracking")
        plain, tracked, inside = [], [], []
        for rep in range(args.reps):
            plain.append(fit(splits, normalizer, args.epochs, None))
            recorder = Timed(tracking.start_run(client, experiment, f"rep{rep}", {},
                                                 log_every_steps=1))
            tracked.append(fit(splits, normalizer, args.epochs, recorder))
            inside.append(recorder.seconds / tracked[-1])
    base, with_tracking = statistics.median(plain), statistics.median(tracked)
    steps = args.epochs * math.ceil(len(splits.y_train) / 200)
    print(f"{len(splits.y_train)} training images, {args.epochs} epochs, {steps} steps, "
          f"{args.reps} repetitions (medians)")
    print(f"  without tracking  {base:7.2f} s   runs: {np.round(plain, 2).tolist()}")
    print(f"  with tracking     {with_tracking:7.2f} s   runs: {np.round(tracked, 2).tolist()}")
    print(f"  difference        {100 * (with_tracking - base) / base:+6.2f} % of the wall time")
    print(f"  tracking calls    {100 * statistics.median(inside):6.2f} % of the wall time, in "
          "the training thread (batch_loss every step, metrics + health every epoch)")


if __name__ == "__main__":
    main()
