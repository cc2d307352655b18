"""The training loop: batches, forward/backward, update, evaluation, checkpoints.

`Trainer.fit` is one loop, readable top to bottom: train an epoch (`_train_epoch`: shuffle,
then for every minibatch, gathered, augmented and normalized by `data.batches` one batch
ahead on a helper thread, the step: backward pass, divergence guard, update), keep the
best parameters, checkpoint, report, maybe stop early. After the last epoch the best
parameters are restored (as cs231n's Solver does) and the test set is evaluated once.

With `ema` > 0 the weights that are evaluated, kept when best and tested are the moving
average of the trained ones (`mlp.ema`), updated after each step: the model then ends
with the best epoch's average. Losses reported for evaluation are the model's plain
`eval_loss_fn` (cross-entropy without label smoothing); the step's loss is the one trained.

Progress goes out through an `Observer` (plain numbers), never through MLflow calls:
tracking is wired in by the caller. The checkpoint format, and its validation before a
resume changes anything, is `mlp.checkpoint`'s.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from mlp.core.layers import Activation
from mlp.core.model import MLP
from mlp.core.optim import Optimizer, Schedule
from mlp.core.step import step
from mlp.data.batches import batches
from mlp.data.normalize import Normalizer
from mlp.data.splits import Splits
from mlp.training import checkpoint, inference
from mlp.training.ema import EMA

Array = np.ndarray


class DivergenceError(RuntimeError):
    """The loss became NaN/inf or exploded past the bound: training cannot go on."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class Observer(Protocol):
    """What the loop reports. Implementations must not raise on transient trouble.

    `on_epoch` is called before the epoch's checkpoint is written: what an observer keeps
    of the epoch when it returns is kept whatever happens to the process afterwards."""

    def on_step(self, step: int, loss: float, lr: float) -> None: ...

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


def train_eval_count(train_eval_size: int | None, n_val: int, n_train: int) -> int:
    """How many training images the train metrics are measured on each epoch: the
    setting, else (None) as many as validation, so that both sides of the gap are equally
    precise; at least 1, at most the training split."""
    return min(train_eval_size or max(n_val, 1), n_train)


@dataclass
class TrainSettings:
    """The loop's knobs (see `conf/config.yaml`, group `trainer`)."""

    epochs: int = 10
    batch_size: int = 200
    dtype: str = "float32"
    train_eval_size: int | None = None  # None: as many images as the validation split
    eval_batch_size: int = 1000
    patience: int | None = None
    diverge_factor: float = 100.0
    augment_pad: int = 0
    augment_flip: bool = False
    test_flip: bool = False  # every evaluation: each image and its mirror image
    test_shift: int = 0      # the test's (and the served model's): shifted views too
    prefetch: bool = True
    checkpoint_dir: Path | None = None
    progress: bool = True
    health: bool = True
    seed: int = 0
    ema: float = 0.0      # decay of the weights' moving average (0: none)
    ema_every: int = 1    # update the average every this many steps (with decay**k)


@dataclass
class TrainResult:
    """What a finished run produced."""

    history: dict[str, list[float]]
    best_epoch: int
    best_val_acc: float
    test_loss: float
    test_acc: float
    test_pred: Array
    epochs_run: int
    stopped_early: bool
    checkpoint: Path | None


@dataclass
class _State:
    """Everything that changes during training besides params and optimizer state."""

    epoch: int = 0           # completed epochs
    step: int = 0            # completed updates
    batch: int = 0           # completed batches of the current epoch
    order: Array | None = None
    first_loss: float | None = None
    best_val_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)


HISTORY_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc", "gap_acc", "gap_loss", "lr",
                "epoch_time", "images_per_sec")


class Trainer:
    """Trains `model` on `splits` with `optimizer` and `schedule`.

    splits: uint8 images (N, 3072) and labels; `normalizer` (fitted on the training split)
    turns a uint8 batch into the model's input, (B, normalizer.out_dim) floats of the
    training dtype. `meta` is stored in checkpoints (e.g. the tracking run id, so a
    resumed run continues the same record).
    """

    def __init__(self, model: MLP, optimizer: Optimizer, schedule: Schedule,
                 splits: Splits, normalizer: Normalizer,
                 settings: TrainSettings, observers: Sequence[Observer] = (),
                 meta: dict | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.splits = splits
        self.normalizer = normalizer
        self.s = settings
        self.observers = list(observers)
        self.meta = dict(meta or {})
        self.dtype = np.dtype(settings.dtype)
        self.rng = np.random.default_rng([settings.seed, 1])
        self.state = _State(history={k: [] for k in HISTORY_KEYS})
        self.ema = EMA(model, settings.ema, settings.ema_every) if settings.ema else None
        # the weights evaluated each epoch, kept when best and tested
        self.evaluated = self.ema.model if self.ema else model
        self.best_params = {n: p.copy() for n, p in model.params.items()}
        self.best_buffers = {n: b.copy() for n, b in model.buffers.items()}
        n_eval = train_eval_count(settings.train_eval_size, len(splits.y_val),
                                  len(splits.y_train))
        eval_rows = np.random.default_rng([settings.seed, 2]).choice(
            len(splits.y_train), n_eval, replace=False)
        self.train_eval = (splits.X_train[np.sort(eval_rows)], splits.y_train[np.sort(eval_rows)])
        self._bufs = tuple(np.empty((settings.batch_size, normalizer.out_dim), self.dtype)
                           for _ in range(2))
        self._signal: int | None = None
        self._saved: tuple[Path, str] | None = None  # the last checkpoint, and where it is

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train for the remaining epochs; raise DivergenceError or Interrupted on trouble."""
        st, stopped_early = self.state, False
        with self._signals():
            while st.epoch < self.s.epochs:
                metrics = self._train_epoch()
                self._keep_if_best(metrics["val_acc"])
                # Observers first: the epoch's record is durable before the checkpoint that
                # marks the epoch done, so a crash between them re-runs an epoch already
                # recorded (the recorder does not log its points twice), never skips one.
                for observer in self.observers:
                    observer.on_epoch(st.epoch, metrics)
                saved = self.save_checkpoint()
                if self._signal is not None:
                    raise Interrupted(self._signal, saved)
                if self.s.patience is not None and st.bad_epochs >= self.s.patience:
                    stopped_early = True
                    break
        self.model.set_params(self.best_params, self.best_buffers)
        test_loss, test_acc, test_pred = self.evaluate(self.splits.X_test, self.splits.y_test,
                                                       self.model, self.test_scoring)
        return TrainResult(history=st.history, best_epoch=st.best_epoch,
                           best_val_acc=st.best_val_acc, test_loss=test_loss, test_acc=test_acc,
                           test_pred=test_pred, epochs_run=st.epoch,
                           stopped_early=stopped_early, checkpoint=self.checkpoint_path())

    def _train_epoch(self) -> dict[str, float]:
        """The rest of the current epoch, step by step, then its evaluation: its metrics."""
        st, s = self.state, self.s
        if st.order is None:
            st.order = self.rng.permutation(len(self.splits.y_train))
        count = self._batches_per_epoch()
        t0, seen, grads, before = time.perf_counter(), 0, {}, None
        bar = self._bar(st.epoch, count)
        for b, Xb, yb in self._batches(st.epoch, st.order, st.batch):
            if self._signal is not None:
                bar.close()
                raise Interrupted(self._signal, self.save_checkpoint())
            lr = self.schedule(st.step)
            before = self._snapshot() if s.health and b == count - 1 else None
            # The health numbers read this step's gradients: the reference path keeps them.
            loss, grads = self._step(Xb, yb, lr, fused=before is None)
            if self.ema is not None:
                self.ema.update(self.model, b, last=b == count - 1)
            st.step, st.batch, seen = st.step + 1, b + 1, seen + len(yb)
            for observer in self.observers:
                observer.on_step(st.step, loss, lr)
            bar.update()
            if st.step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        bar.close()
        epoch_time = time.perf_counter() - t0
        st.epoch, st.batch, st.order = st.epoch + 1, 0, None
        metrics = self._end_of_epoch(self.schedule(st.step - 1), epoch_time, seen)
        if before is not None:
            metrics.update(self._health(grads, before))
        return metrics

    def _step(self, Xb: Array, yb: Array, lr: float, fused: bool = True
              ) -> tuple[float, dict[str, Array]]:
        return step(self.model, self.optimizer, Xb, yb, lr, fused=fused, guard=self._guard)

    def _keep_if_best(self, val_acc: float) -> None:
        """Copy the evaluated params and buffers aside when val_acc is the best so far; else
        count a bad epoch (for early stopping)."""
        st = self.state
        if val_acc <= st.best_val_acc:
            st.bad_epochs += 1
            return
        st.best_val_acc, st.best_epoch, st.bad_epochs = val_acc, st.epoch, 0
        for name, p in self.evaluated.params.items():
            self.best_params[name][...] = p
        for name, b in self.evaluated.buffers.items():
            self.best_buffers[name][...] = b

    def _batches_per_epoch(self) -> int:
        return -(-len(self.splits.y_train) // self.s.batch_size)

    def _end_of_epoch(self, lr: float, epoch_time: float, seen: int) -> dict[str, float]:
        """Evaluate, append to the history and return this epoch's metrics."""
        train_loss, train_acc, _ = self.evaluate(*self.train_eval)
        val_loss, val_acc, _ = self.evaluate(self.splits.X_val, self.splits.y_val)
        # The gap to 6 decimals: the difference of two fractions carries float noise
        # (0.28800000000000003) that the record would show digit for digit.
        metrics = {"train_loss": train_loss, "val_loss": val_loss, "train_acc": train_acc,
                   "val_acc": val_acc, "gap_acc": round(train_acc - val_acc, 6),
                   "gap_loss": val_loss - train_loss, "lr": lr, "epoch_time": epoch_time,
                   "images_per_sec": seen / max(epoch_time, 1e-9)}
        for key in HISTORY_KEYS:
            self.state.history[key].append(metrics[key])
        return metrics

    def _guard(self, loss: float) -> None:
        """Stop on NaN/inf, or a data loss beyond diverge_factor x the first batch's."""
        st = self.state
        if st.first_loss is None:
            st.first_loss = loss
        if np.isfinite(loss) and loss <= self.s.diverge_factor * max(st.first_loss, 1.0):
            return
        if self._saved is not None:
            path, where = self._saved
            resume = f"the checkpoint {where}, {path}, can be resumed with trainer.resume={path}"
        else:
            resume = "no checkpoint was written" + (
                " (trainer.checkpoint_dir is not set)" if self.checkpoint_path() is None
                else " (the first is written when the first epoch ends)")
        raise DivergenceError(
            f"training diverged at step {st.step + 1} (epoch {st.epoch + 1}): batch loss "
            f"{loss:.4g} (first batch {st.first_loss:.4g}, bound x{self.s.diverge_factor}). "
            f"Lower optim.lr or raise model.reg; {resume}.")

    # -- evaluation and health ------------------------------------------------------------

    @property
    def test_scoring(self) -> inference.Scoring:
        """How the test split and the served model score images: every view."""
        return inference.Scoring(self.s.test_flip, self.s.test_shift)

    def evaluate(self, X: Array, y: Array, model: MLP | None = None,
                 scoring: inference.Scoring | None = None) -> tuple[float, float, Array]:
        """Mean data loss (`eval_loss_fn`), accuracy and predictions (N,) on uint8 X (N, D),
        y (N,) of `model`'s current params (default: `evaluated`), scores averaged over
        `scoring`'s views (default: the epochs' evaluation, with `test_flip` but no shift:
        shifted views would cost 5x as much each epoch)."""
        model = self.evaluated if model is None else model
        scoring = inference.Scoring(self.s.test_flip) if scoring is None else scoring
        total, preds = 0.0, np.empty(len(y), dtype=np.int64)
        out = None
        for i in range(0, len(y), self.s.eval_batch_size):
            chunk = X[i:i + self.s.eval_batch_size]
            if out is None or len(out) != len(chunk):
                out = np.empty((len(chunk), self.normalizer.out_dim), dtype=self.dtype)
            scores = inference.scores(model, self.normalizer, chunk, self.dtype, scoring,
                                      out=out)
            total += float(model.eval_loss_fn(scores, y[i:i + len(chunk)])[0]) * len(chunk)
            preds[i:i + len(chunk)] = scores.argmax(axis=1)
        n = max(len(y), 1)
        return total / n, float(np.mean(preds == y)) if len(y) else 0.0, preds

    def _batches(self, epoch: int, order: Array, first: int
                 ) -> Iterator[tuple[int, Array, Array]]:
        """`data.batches` of the training split from batch `first` on, normalized into the
        trainer's two reused arrays (a batch is valid until the next one is asked for)."""
        s = self.s
        return batches(self.splits.X_train, self.splits.y_train, order, s.batch_size,
                               self.normalizer, self.dtype, first=first, seed=s.seed,
                               epoch=epoch, augment_pad=s.augment_pad,
                               augment_flip=s.augment_flip, prefetch=s.prefetch, out=self._bufs)

    def _snapshot(self) -> dict[str, Array]:
        return {name: p.copy() for name, p in self.model.params.items()}

    def _health(self, grads: dict[str, Array], before: dict[str, Array] | None
                ) -> dict[str, float]:
        """cs231n's training-health numbers from the epoch's last step, per parameter:
        weight norm, gradient norm, update/weight ratio (healthy near 1e-3); per hidden
        layer of the ReLU family: the fraction of units dead on the train subset."""
        out: dict[str, float] = {}
        for name, p in self.model.params.items():
            w_norm = float(np.linalg.norm(p))
            out[f"health/{name}/norm"] = w_norm
            out[f"health/{name}/grad_norm"] = float(np.linalg.norm(grads[name]))
            if before is not None:
                step = float(np.linalg.norm(p - before[name]))
                out[f"health/{name}/update_ratio"] = step / max(w_norm, 1e-12)
        if self.model.arch.activation in ("relu", "leaky_relu", "elu"):
            Xs = self.train_eval[0][:self.s.eval_batch_size]
            self.model.scores(self.normalizer(Xs, self.dtype))
            acts = [layer for layer in self.model.layers if isinstance(layer, Activation)]
            for i, layer in enumerate(acts, start=1):
                out[f"health/layer{i}/dead_frac"] = float(np.mean(~(layer.x > 0).any(axis=0)))
        return out

    # -- progress, signals, checkpoints -------------------------------------------------------

    def _bar(self, epoch: int, total: int) -> tqdm:
        return tqdm(total=total, initial=self.state.batch,
                    desc=f"epoch {epoch + 1}/{self.s.epochs}", unit="batch", leave=False,
                    dynamic_ncols=True,
                    disable=not (self.s.progress and sys.stderr.isatty()))

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is
        written from a consistent state (only the main thread may install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            self._signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def checkpoint_path(self) -> Path | None:
        """<checkpoint_dir>/last.npz, or None without a checkpoint_dir."""
        d = self.s.checkpoint_dir
        return None if d is None else Path(d) / "last.npz"

    def save_checkpoint(self) -> Path | None:
        """Write the full training state to `checkpoint_path()` (see mlp.checkpoint)."""
        path = self.checkpoint_path()
        if path is None:
            return None
        checkpoint.save(path, self._checkpoint())
        self._saved = path, self._position()
        return path

    def load_checkpoint(self, path: str | Path, run_id: str | None = None) -> dict:
        """Restore the state saved by `save_checkpoint`; returns its `meta["extra"]`.

        The whole file is validated first (`checkpoint.load`, against this trainer's own
        state: same architecture, optimizer, dtype, training split and batch size; written
        by `run_id` when given, the run this resume continues): a problem raises
        CheckpointError (a ValueError) naming it, and nothing is changed.
        """
        ck = checkpoint.load(path, self._checkpoint(), len(self.splits.y_train),
                             self._batches_per_epoch(),
                             checks={"optim": self.optimizer.check_state_dict,
                                     "norm": self.normalizer.check_state_dict},
                             run_id=run_id)
        groups, meta = ck.groups, ck.meta
        if meta["epoch"] > self.s.epochs:
            # Continuing would train past the asked-for end and record epochs no
            # uninterrupted run of this config has.
            raise checkpoint.CheckpointError(
                f"{path}: holds {meta['epoch']} completed epochs, more than "
                f"trainer.epochs={self.s.epochs}; resume with trainer.epochs of at least "
                f"{meta['epoch'] + (meta['batch'] > 0)}")
        self.model.set_params(groups["param"], groups["buffer"])
        for name, value in groups["best"].items():
            self.best_params[name][...] = value
        for name, value in groups["bestbuffer"].items():
            self.best_buffers[name][...] = value
        self.model.dropout_rng.bit_generator.state = meta["dropout_rng"]
        self.optimizer.load_state_dict(groups["optim"])
        if self.ema is not None:
            self.ema.load_state_dict(groups["ema"])
        self.normalizer.load_state_dict(groups["norm"])
        self.rng.bit_generator.state = meta["rng"]
        st = self.state
        st.epoch, st.step, st.batch = meta["epoch"], meta["step"], meta["batch"]
        st.first_loss, st.best_val_acc = meta["first_loss"], meta["best_val_acc"]
        st.best_epoch, st.bad_epochs = meta["best_epoch"], meta["bad_epochs"]
        st.history = meta["history"]
        st.order = ck.order
        self._saved = Path(path), self._position()
        return meta["extra"]

    def _position(self) -> str:
        st = self.state
        return (f"at batch {st.batch} of epoch {st.epoch + 1}" if st.batch
                else f"after epoch {st.epoch}")

    def _checkpoint(self) -> checkpoint.Checkpoint:
        """The trainer's state as a Checkpoint (its arrays, not copies)."""
        st = self.state
        meta = {"epoch": st.epoch, "step": st.step, "batch": st.batch,
                "first_loss": st.first_loss, "best_val_acc": st.best_val_acc,
                "best_epoch": st.best_epoch, "bad_epochs": st.bad_epochs,
                "history": st.history, "rng": self.rng.bit_generator.state,
                "dropout_rng": self.model.dropout_rng.bit_generator.state,
                "arch": _arch_dict(self.model), "optimizer": self.optimizer.name,
                "dtype": self.s.dtype, "extra": self.meta}
        groups = {"param": self.model.params, "best": self.best_params,
                  "buffer": self.model.buffers, "bestbuffer": self.best_buffers,
                  "optim": self.optimizer.state_dict(), "norm": self.normalizer.state_dict(),
                  "ema": self.ema.state_dict() if self.ema else {}}
        return checkpoint.Checkpoint(meta, groups, st.order)


def _arch_dict(model: MLP) -> dict:
    arch = vars(model.arch).copy()
    arch["hidden_sizes"] = list(arch["hidden_sizes"])
    arch.pop("reg")  # reg may change between resumes without changing the shapes
    return arch
