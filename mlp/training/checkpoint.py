"""The checkpoint format: the full training state in one `.npz` file, and its validation.

A checkpoint holds everything needed to continue a run bit for bit, as plain arrays (no
pickles): "meta", a 0-d string array holding a JSON object (the loop counters, the best
epoch so far, the history, the states of both random generators, the architecture,
optimizer name and dtype it was written for, and the caller's `extra`), then one array
per entry of each group, "<group>/<name>" for the groups in `GROUPS` (parameters, best
parameters, buffers, best buffers, optimizer state, normalizer state, and the moving
average of the weights, parameters and buffers, empty when the run keeps none), and
"order", the epoch's shuffle order, when the run stopped inside an epoch.

`save` writes atomically (a crash leaves the previous file); `load` reads and validates
the whole file against a template, the `Checkpoint` of the run that resumes, before the
caller changes anything: format, keys, shapes, dtypes, the values of every array and
meta field. Every problem raises `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Array = np.ndarray

GROUPS = ("param", "best", "buffer", "bestbuffer", "optim", "norm", "ema")
COUNTERS = ("epoch", "step", "batch", "best_epoch", "bad_epochs")
MATCHING = ("arch", "optimizer", "dtype")  # must equal the resuming run's
META_KEYS = (*COUNTERS, "first_loss", "best_val_acc", "history", "rng", "dropout_rng",
             *MATCHING, "extra")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A checkpoint in memory: `meta` (the keys of META_KEYS), `groups` (group of GROUPS ->
    name -> array) and the epoch's shuffle order (n_train,) or None between epochs."""

    meta: dict
    groups: dict[str, dict[str, Array]] = field(default_factory=dict)
    order: Array | None = None


def save(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` to `path` (an .npz without pickles) atomically; returns path."""
    path = Path(path)
    arrays = {"meta": np.array(json.dumps(checkpoint.meta))}
    for group in GROUPS:
        arrays |= {f"{group}/{name}": a for name, a in checkpoint.groups[group].items()}
    if checkpoint.order is not None:
        arrays["order"] = checkpoint.order
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz")
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


def load(path: str | Path, like: Checkpoint, n_train: int, batches_per_epoch: int,
         checks: Mapping[str, Callable[[dict[str, Array]], None]] | None = None,
         run_id: str | None = None) -> Checkpoint:
    """Read the checkpoint at `path` and validate it completely against `like`.

    `like` is the resuming run's own checkpoint: the file must have its groups, names,
    shapes and dtypes and its `MATCHING` meta fields; the order must be a permutation of
    range(n_train), and the run's `batches_per_epoch` fixes how the counters relate (the
    optimizer's step counter "optim/t", when there is one, is the step). `checks` maps a group
    to a function that raises ValueError on values its owner cannot take (e.g. the
    optimizer's). `run_id`, when the run to continue is known: the checkpoint must have
    been written by that run (its `extra["run_id"]`), not by another one that shared the
    folder or was named by mistake. Raises CheckpointError; nothing outside this function
    is changed.
    """
    path = Path(path)
    try:
        checkpoint = _read(path)
        _validate(checkpoint, like, n_train, batches_per_epoch, checks or {})
        written_by = checkpoint.meta["extra"].get("run_id")
        if run_id is not None and written_by != run_id:
            raise CheckpointError(f"written by run {written_by}, not by run {run_id}, the "
                                  "run to continue")
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except ValueError as e:  # from a group's check
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    return checkpoint


def _read(path: Path) -> Checkpoint:
    """The file's arrays and meta, refusing anything that is not our format."""
    if not path.is_file():
        raise CheckpointError("no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # every .npz is a zip archive
        raise CheckpointError("empty file" if not head else "not an .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise CheckpointError("a single array, not an .npz archive")
            arrays = {k: f[k] for k in f.files}
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        # np.load refuses object arrays (pickles) with a ValueError, as well as truncation
        raise CheckpointError(f"not a readable .npz archive without pickles "
                              f"({type(e).__name__}: {e})") from e
    meta = arrays.pop("meta", None)
    if meta is None or meta.shape != () or meta.dtype.kind != "U":
        raise CheckpointError("no 'meta' entry (a JSON string): not an mlp-lab checkpoint")
    try:
        meta = json.loads(str(meta))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'meta' is not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"'meta' is a {type(meta).__name__}, not a JSON object")
    order = arrays.pop("order", None)
    groups: dict[str, dict[str, Array]] = {g: {} for g in GROUPS}
    for key, array in arrays.items():
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise CheckpointError(f"unexpected entry {key!r}")
        groups[group][name] = array
    return Checkpoint(meta, groups, order)


def _validate(ck: Checkpoint, like: Checkpoint, n_train: int, batches_per_epoch: int,
              checks: Mapping[str, Callable[[dict[str, Array]], None]]) -> None:
    meta = ck.meta
    missing = sorted(set(META_KEYS) - meta.keys())
    unexpected = sorted(meta.keys() - set(META_KEYS))
    if missing or unexpected:
        raise CheckpointError(f"meta keys do not match: missing {missing}, "
                              f"unexpected {unexpected}")
    for key in MATCHING:
        if meta[key] != like.meta[key]:
            raise CheckpointError(f"written for {key} {meta[key]!r}, this run has "
                                  f"{like.meta[key]!r}")
    written, this = ("with" if c.groups["ema"] else "without" for c in (ck, like))
    if written != this:
        raise CheckpointError(f"written by a run {written} a moving average of the weights "
                              f"(trainer.ema), this run is {this} one")
    for group in GROUPS:
        _check_arrays(group, ck.groups[group], like.groups[group])
        if group in checks:
            checks[group](ck.groups[group])
    _check_counters(meta, batches_per_epoch)
    t = ck.groups["optim"].get("t")
    if t is not None and int(t) != meta["step"]:
        raise CheckpointError(f"optimizer step counter t={int(t)} but meta step "
                              f"{meta['step']}")
    _check_order(ck.order, n_train, meta["batch"], meta["epoch"])
    _check_history(meta["history"], like.meta["history"], meta["epoch"])
    for key in ("rng", "dropout_rng"):
        _check_rng_state(key, meta[key], like.meta[key])
    if not isinstance(meta["extra"], dict):
        raise CheckpointError(f"meta 'extra' is {meta['extra']!r}, not an object")


def _check_arrays(group: str, arrays: dict[str, Array], like: dict[str, Array]) -> None:
    missing, unexpected = sorted(like.keys() - arrays.keys()), sorted(arrays.keys() - like)
    if missing or unexpected:
        raise CheckpointError(f"{group} entries do not match this run: missing {missing}, "
                              f"unexpected {unexpected}")
    for name, a in arrays.items():
        want = np.asarray(like[name])
        if want.dtype.kind == "U":  # a setting stored as text (the normalizer's mode)
            if a.shape != () or a.dtype.kind != "U" or str(a) != str(want):
                raise CheckpointError(f"{group}/{name} is {a!r}, this run has {str(want)!r}")
            continue
        if a.shape != want.shape or a.dtype != want.dtype:
            raise CheckpointError(f"{group}/{name} is {a.dtype} {a.shape}, this run needs "
                                  f"{want.dtype} {want.shape}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{group}/{name} holds NaN or infinite values")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_counters(meta: dict, batches_per_epoch: int) -> None:
    for key in COUNTERS:
        if not _is_count(meta[key]):
            raise CheckpointError(f"meta {key!r} is {meta[key]!r}, not an integer >= 0")
    epoch, step, batch = meta["epoch"], meta["step"], meta["batch"]
    if batch >= batches_per_epoch or step != epoch * batches_per_epoch + batch:
        raise CheckpointError(
            f"epoch {epoch}, step {step}, batch {batch} do not add up with this run's "
            f"{batches_per_epoch} batches per epoch (another batch size or training split?)")
    if meta["best_epoch"] > epoch or meta["bad_epochs"] > epoch:
        raise CheckpointError(f"best_epoch {meta['best_epoch']} or bad_epochs "
                              f"{meta['bad_epochs']} beyond epoch {epoch}")
    first = meta["first_loss"]
    if (first is None) != (step == 0) or (first is not None and not _is_finite(first)):
        raise CheckpointError(f"first_loss {first!r} at step {step}: expected a finite "
                              "number once a step was taken, and null before")
    best = meta["best_val_acc"]
    if not (_is_finite(best) and (best == -1.0 if epoch == 0 else 0.0 <= best <= 1.0)):
        raise CheckpointError(f"best_val_acc {best!r} at epoch {epoch}: expected an "
                              "accuracy in [0, 1] (-1 before the first epoch ends)")


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def _check_order(order: Array | None, n: int, batch: int, epoch: int) -> None:
    """Inside an epoch (batch > 0) the order must be there; either way, when it is, it is a
    permutation of the training rows."""
    if order is None:
        if batch:
            raise CheckpointError(f"stopped at batch {batch} of epoch {epoch + 1} but holds "
                                  "no shuffle order")
        return
    if (order.shape != (n,) or order.dtype.kind not in "iu"
            or not np.array_equal(np.sort(order), np.arange(n))):
        raise CheckpointError(f"'order' ({order.dtype} {order.shape}) is not a permutation of "
                              f"the {n} training rows")


def _check_history(history: object, like: dict, epoch: int) -> None:
    if not isinstance(history, dict) or history.keys() != like.keys():
        raise CheckpointError(f"history must have the keys {sorted(like)}")
    for key, values in history.items():
        if not (isinstance(values, list) and len(values) == epoch
                and all(_is_finite(v) for v in values)):
            raise CheckpointError(f"history {key!r} must be {epoch} finite numbers, one per "
                                  "completed epoch")


def _check_rng_state(key: str, state: object, like: dict) -> None:
    """A state a generator of the run's kind accepts (tried on a fresh one)."""
    try:
        if not isinstance(state, dict) or state.get("bit_generator") != like["bit_generator"]:
            raise ValueError(f"expected a {like['bit_generator']} state")
        getattr(np.random, like["bit_generator"])().state = state
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise CheckpointError(f"meta {key!r} is not a random generator state: {e}") from e
