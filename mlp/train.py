"""The training loop: batches, forward/backward, update, evaluation, checkpoints.

`Trainer.fit` is one loop, readable top to bottom: shuffle the epoch, then for every
minibatch (gathered, augmented and normalized by `_batches`, one batch ahead on a helper
thread) forward/backward, guard against divergence, update; at
the end of the epoch evaluate train (a fixed subset) and validation, keep the best
parameters, checkpoint, maybe stop early. After the last epoch the best parameters are
restored (as cs231n's Solver does) and the test set is evaluated once.

Progress goes out through an `Observer` (plain numbers), never through MLflow calls:
tracking is wired in by the caller. Checkpoints are `.npz` files with no pickles,
written atomically, and hold everything needed to continue bit for bit: parameters,
optimizer state, normalizer, RNG state, the epoch's shuffle order and position.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from mlp import data as datalib
from mlp.layers import Activation
from mlp.model import MLP
from mlp.optim import Optimizer, Schedule

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
    """What the loop reports. Implementations must not raise on transient trouble."""

    def on_step(self, step: int, loss: float, lr: float) -> None: ...

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass
class TrainSettings:
    """The loop's knobs (see `conf/config.yaml`, group `trainer`)."""

    epochs: int = 10
    batch_size: int = 200
    dtype: str = "float32"
    train_eval_size: int = 5000
    eval_batch_size: int = 1000
    patience: int | None = None
    diverge_factor: float = 100.0
    augment_pad: int = 0
    augment_flip: bool = False
    prefetch: bool = True
    checkpoint_dir: Path | None = None
    progress: bool = True
    health: bool = True
    seed: int = 0


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
    turns a uint8 batch into the training dtype. `meta` is stored in checkpoints (e.g. the
    tracking run id, so a resumed run continues the same record).
    """

    def __init__(self, model: MLP, optimizer: Optimizer, schedule: Schedule,
                 splits: datalib.Splits, normalizer: datalib.Normalizer,
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
        self.best_params = {n: p.copy() for n, p in model.params.items()}
        self.best_buffers = {n: b.copy() for n, b in model.buffers.items()}
        n_eval = min(settings.train_eval_size, len(splits.y_train))
        eval_rows = np.random.default_rng([settings.seed, 2]).choice(
            len(splits.y_train), n_eval, replace=False)
        self.train_eval = (splits.X_train[np.sort(eval_rows)], splits.y_train[np.sort(eval_rows)])
        self._bufs = [np.empty((settings.batch_size, splits.X_train.shape[1]), self.dtype)
                      for _ in range(2)]
        self._signal: int | None = None

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train for the remaining epochs; raise DivergenceError or Interrupted on trouble."""
        s, st, model = self.s, self.state, self.model
        n, bs = len(self.splits.y_train), s.batch_size
        batches_per_epoch = -(-n // bs)
        stopped_early, checkpoint = False, self.checkpoint_path()
        with self._signals():
            while st.epoch < s.epochs:
                if st.order is None:
                    st.order = self.rng.permutation(n)
                t0, seen = time.perf_counter(), 0
                bar = self._bar(st.epoch, batches_per_epoch)
                for b, Xb, yb in self._batches(st.epoch, st.order, st.batch, batches_per_epoch):
                    if self._signal is not None:
                        bar.close()
                        raise Interrupted(self._signal, self.save_checkpoint())
                    lr = self.schedule(st.step)
                    loss, grads = model.data_loss_and_grads(Xb, yb)
                    self._guard(float(loss))
                    before = self._snapshot() if s.health and b == batches_per_epoch - 1 else None
                    # The L2 term (model.loss_and_grads computes it apart) is left to the
                    # optimizer: it adds the gradient and sums the loss term in the one pass
                    # it makes over the weights.
                    loss += self.optimizer.step(model.params, grads, lr,
                                                l2=model.l2_coefficients())
                    st.step, st.batch, seen = st.step + 1, b + 1, seen + len(yb)
                    for observer in self.observers:
                        observer.on_step(st.step, float(loss), lr)
                    bar.update()
                    if st.step % 20 == 0:
                        bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}")
                bar.close()
                epoch_time = time.perf_counter() - t0
                st.epoch, st.batch, st.order = st.epoch + 1, 0, None
                metrics = self._end_of_epoch(self.schedule(st.step - 1), epoch_time, seen)
                if s.health and before is not None:
                    metrics.update(self._health(grads, before))
                if metrics["val_acc"] > st.best_val_acc:
                    st.best_val_acc, st.best_epoch, st.bad_epochs = metrics["val_acc"], st.epoch, 0
                    for name, p in model.params.items():
                        self.best_params[name][...] = p
                    for name, b in model.buffers.items():
                        self.best_buffers[name][...] = b
                else:
                    st.bad_epochs += 1
                checkpoint = self.save_checkpoint()
                for observer in self.observers:
                    observer.on_epoch(st.epoch, metrics)
                if self._signal is not None:
                    raise Interrupted(self._signal, checkpoint)
                if s.patience is not None and st.bad_epochs >= s.patience:
                    stopped_early = True
                    break
        model.set_params(self.best_params, self.best_buffers)
        test_loss, test_acc, test_pred = self.evaluate(self.splits.X_test, self.splits.y_test)
        return TrainResult(history=st.history, best_epoch=st.best_epoch,
                           best_val_acc=st.best_val_acc, test_loss=test_loss, test_acc=test_acc,
                           test_pred=test_pred, epochs_run=st.epoch,
                           stopped_early=stopped_early, checkpoint=checkpoint)

    def _end_of_epoch(self, lr: float, epoch_time: float, seen: int) -> dict[str, float]:
        """Evaluate, append to the history and return this epoch's metrics."""
        train_loss, train_acc, _ = self.evaluate(*self.train_eval)
        val_loss, val_acc, _ = self.evaluate(self.splits.X_val, self.splits.y_val)
        metrics = {"train_loss": train_loss, "val_loss": val_loss, "train_acc": train_acc,
                   "val_acc": val_acc, "gap_acc": train_acc - val_acc,
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
        if not np.isfinite(loss) or loss > self.s.diverge_factor * max(st.first_loss, 1.0):
            raise DivergenceError(
                f"training diverged at step {st.step + 1} (epoch {st.epoch + 1}): batch loss "
                f"{loss:.4g} (first batch {st.first_loss:.4g}, bound x{self.s.diverge_factor}). "
                "Lower optim.lr or raise model.reg; the last epoch's checkpoint can be resumed "
                "with trainer.resume=...")

    # -- evaluation and health ------------------------------------------------------------

    def evaluate(self, X: Array, y: Array) -> tuple[float, float, Array]:
        """Mean data loss, accuracy and predictions (N,) of the current params on uint8 X."""
        total, preds = 0.0, np.empty(len(y), dtype=np.int64)
        out = None
        for i in range(0, len(y), self.s.eval_batch_size):
            chunk = X[i:i + self.s.eval_batch_size]
            if out is None or len(out) != len(chunk):
                out = np.empty((len(chunk), chunk.shape[1]), dtype=self.dtype)
            scores = self.model.scores(self.normalizer(chunk, self.dtype, out=out))
            total += float(self.model.loss_fn(scores, y[i:i + len(chunk)])[0]) * len(chunk)
            preds[i:i + len(chunk)] = scores.argmax(axis=1)
        n = max(len(y), 1)
        return total / n, float(np.mean(preds == y)) if len(y) else 0.0, preds

    def _batches(self, epoch: int, order: Array, first: int,
                 count: int) -> Iterator[tuple[int, Array, Array]]:
        """(b, normalized X (B, D), y (B,)) for batches first..count-1 of the epoch's order.

        Batch b is gathered from the uint8 images, augmented with its own generator, seeded
        by (seed, epoch, b), so it is the same batch whenever and on whichever thread it is
        prepared (and after a resume), and normalized into one of two reused arrays. With
        `prefetch`, batch b+1 is prepared on a helper thread while the caller trains on
        batch b (NumPy releases the GIL in the copies and ufuncs); the two arrays alternate,
        so a batch stays valid until the caller asks for the next one.
        """
        s, bs = self.s, self.s.batch_size
        X, y = self.splits.X_train, self.splits.y_train

        def prepare(b: int) -> tuple[int, Array, Array]:
            idx = order[b * bs:(b + 1) * bs]
            Xb = X[idx]
            if s.augment_pad or s.augment_flip:
                rng = np.random.default_rng([s.seed, 3, epoch, b])
                Xb = datalib.augment(Xb, rng, s.augment_pad, s.augment_flip)
            return b, self.normalizer(Xb, self.dtype, out=self._bufs[b % 2][:len(idx)]), y[idx]

        if not s.prefetch:
            yield from map(prepare, range(first, count))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="mlp-batches") as pool:
            pending = pool.submit(prepare, first) if first < count else None
            for b in range(first, count):
                batch = pending.result()
                pending = pool.submit(prepare, b + 1) if b + 1 < count else None
                yield batch

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
        d = self.s.checkpoint_dir
        return None if d is None else Path(d) / "last.npz"

    def save_checkpoint(self) -> Path | None:
        """Write the full training state to <checkpoint_dir>/last.npz atomically."""
        path = self.checkpoint_path()
        if path is None:
            return None
        st = self.state
        meta = {"epoch": st.epoch, "step": st.step, "batch": st.batch,
                "first_loss": st.first_loss, "best_val_acc": st.best_val_acc,
                "best_epoch": st.best_epoch, "bad_epochs": st.bad_epochs,
                "history": st.history, "rng": self.rng.bit_generator.state,
                "dropout_rng": self.model.dropout_rng.bit_generator.state,
                "arch": _arch_dict(self.model), "optimizer": self.optimizer.name,
                "dtype": self.s.dtype, "extra": self.meta}
        arrays = {"meta": np.array(json.dumps(meta))}
        arrays |= {f"param/{n}": p for n, p in self.model.params.items()}
        arrays |= {f"best/{n}": p for n, p in self.best_params.items()}
        arrays |= {f"buffer/{n}": b for n, b in self.model.buffers.items()}
        arrays |= {f"bestbuffer/{n}": b for n, b in self.best_buffers.items()}
        arrays |= {f"optim/{k}": v for k, v in self.optimizer.state_dict().items()}
        arrays |= {f"norm/{k}": v for k, v in self.normalizer.state_dict().items()}
        if st.order is not None:
            arrays["order"] = st.order
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore the state saved by `save_checkpoint`; returns its `meta["extra"]`.

        The checkpoint must come from the same architecture, optimizer and dtype."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trainer.resume={str(path)!r}: no such checkpoint file")
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        for key, mine in (("arch", _arch_dict(self.model)), ("optimizer", self.optimizer.name),
                          ("dtype", self.s.dtype)):
            if meta[key] != mine:
                raise ValueError(f"trainer.resume={str(path)!r} was written for {key} "
                                 f"{meta[key]!r}, this run has {mine!r}")
        group = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items()  # noqa: E731
                                if k.startswith(prefix)}
        self.model.set_params(group("param/"), group("buffer/"))
        for name, value in group("best/").items():
            self.best_params[name][...] = value
        for name, value in group("bestbuffer/").items():
            self.best_buffers[name][...] = value
        self.model.dropout_rng.bit_generator.state = meta["dropout_rng"]
        self.optimizer.load_state_dict(group("optim/"))
        self.normalizer.load_state_dict(group("norm/"))
        self.rng.bit_generator.state = meta["rng"]
        st = self.state
        st.epoch, st.step, st.batch = meta["epoch"], meta["step"], meta["batch"]
        st.first_loss, st.best_val_acc = meta["first_loss"], meta["best_val_acc"]
        st.best_epoch, st.bad_epochs = meta["best_epoch"], meta["bad_epochs"]
        st.history = meta["history"]
        st.order = arrays.get("order")
        return meta["extra"]


def _arch_dict(model: MLP) -> dict:
    arch = vars(model.arch).copy()
    arch["hidden_sizes"] = list(arch["hidden_sizes"])
    arch.pop("reg")  # reg may change between resumes without changing the shapes
    return arch
