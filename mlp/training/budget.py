"""How much memory a run needs, estimated from its config before any work starts.

A config with `model.hidden_sizes=[10000000]` or a batch of millions used to fail only at
allocation, after the data was loaded, with a raw `_ArrayMemoryError`. `estimate` adds up
what a run holds at its peak, in the training dtype unless said otherwise:

- parameters (weights, biases, norm scale/shift, norm running statistics) and their
  gradients;
- the optimizer's state: per parameter one array per buffer of the rule (none for SGD,
  one for momentum, Nesterov and RMSProp, two for Adam), plus the copy a checkpoint takes;
- the best parameters kept for the end, and the health snapshot of the epoch's last step;
- the activations of one minibatch and their gradients (each hidden layer's outputs,
  norm caches, dropout masks, the scores), and the forward pass of one evaluation batch;
- the two prefetched input batches (training dtype) and the gathered uint8 batch, and
  with whitening their pixels before the projection;
- whitening's projection (float64 and the training dtype) and its fit: the float64
  covariance and what `eigh` adds to it (a copy, work arrays, the eigenvectors: about 5
  x 3072^2 doubles, 0.35 GiB), counted as if held throughout although the fit ends
  before the model exists;
- the data as uint8 rows: train, validation and test splits and the fixed train subset;
- what the interpreter and its libraries (NumPy, MLflow, Hydra) take before any of it.

`check` refuses (ConfigError, exit 2) a config whose estimate exceeds the memory the
machine has available, naming the key that contributes most, and a batch larger than the
training split. This module allocates nothing and imports no tracking.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlp.core import optim
from mlp.data.normalize import output_dim
from mlp.errors import ConfigError
from mlp.training.trainer import train_eval_count

CIFAR10_TRAIN, CIFAR10_TEST = 50_000, 10_000  # images in the official archive
INPUT_DIM, NUM_CLASSES = 3072, 10
# RSS of `mlp-train` before its first array: Python, NumPy/OpenBLAS, MLflow, Hydra (a
# 3072-100-10 run on 600 synthetic images peaks at ~0.3 GB, nearly all of it this).
RUNTIME_BYTES = 300 * 2**20


@dataclass(frozen=True)
class Estimate:
    """Bytes per part of a run (`parts`, in the order of the module docstring) and their
    total."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'2.1 GiB: parameters 1.2 GiB, optimizer state ...' (the larger parts first)."""
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return f"{gib(self.total)}: " + ", ".join(f"{k} {gib(v)}" for k, v in big if v)


def gib(n: int) -> str:
    """Bytes as GiB with 3 significant digits, e.g. '114 GiB', '0.25 GiB'."""
    return f"{n / 2**30:.3g} GiB"


def estimate(hidden_sizes: Sequence[int], *, batch_size: int, n_train: int, n_val: int,
             n_test: int, dtype: str = "float32", optimizer: str = "momentum",
             eval_batch_size: int = 1000, train_eval_size: int | None = None,
             activation: str = "relu", maxout_pieces: int = 2, norm: str | None = None,
             dropout: float = 0.0, health: bool = True, input_dim: int = INPUT_DIM,
             num_classes: int = NUM_CLASSES, whiten: str = "none",
             components: int | None = None) -> Estimate:
    """The memory a run of that shape needs at its peak, part by part (see the module
    docstring). hidden_sizes: widths H1..HL; n_*: images per split (the train split
    excludes validation); dtype: the training dtype; optimizer: one of optim.OPTIMIZERS;
    input_dim: pixels per image; whiten, components: the Normalizer's whitening, which
    sets the model's input width."""
    item = np.dtype(dtype).itemsize
    k = maxout_pieces if activation == "maxout" else 1
    with_norm = norm not in (None, "none")
    features = output_dim(whiten, components, input_dim)
    whitening = whiten != "none"
    dims = [features, *hidden_sizes]
    params = stats = acts = 0  # elements
    for fan_in, width in itertools.pairwise(dims):
        # weights and biases; a norm's scale and shift (and BatchNorm's running mean/var)
        params += (fan_in + 1) * width * k + (2 * width * k if with_norm else 0)
        stats += 2 * width * k if norm == "batch" else 0
        # linear output; norm output and normalized cache; activation output (+ the
        # maxout winner); dropout mask and output
        acts += width * k + (2 * width * k if with_norm else 0) + width + (
            width if k > 1 else 0) + (2 * width if dropout else 0)
    params += (dims[-1] + 1) * num_classes
    acts += 2 * num_classes  # scores and their softmax / margins
    buffers = len(optim.make_optimizer(optimizer, {}).buffers)
    pixel_rows = n_train + n_val + n_test + train_eval_count(train_eval_size, n_val, n_train)
    parts = {
        "parameters and gradients": (2 * params + stats) * item,
        "optimizer state": 2 * buffers * params * item,
        "best parameters and health snapshot": ((1 + int(health)) * params + stats) * item,
        "activations and gradients": (2 * acts * batch_size
                                      + acts * eval_batch_size) * item,
        "input batches": 2 * batch_size * (features + whitening * input_dim) * item
                         + 2 * batch_size * input_dim,
        "whitening": whitening * (5 * input_dim**2 * 8 + input_dim * features * (8 + item)),
        "data (uint8)": pixel_rows * input_dim,
        "runtime": RUNTIME_BYTES,
    }
    return Estimate(parts)


def available_bytes() -> int:
    """Memory the machine can give a new process now: MemAvailable of /proc/meminfo, else
    free physical pages (os.sysconf)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def split_sizes(flat: Mapping[str, Any]) -> tuple[int, int, int]:
    """(train, validation, test) images of a flattened config (`config.flatten`), as
    `data.split` will make them."""
    if flat["data.name"] == "synthetic":
        total, test = flat["data.synthetic.n_train"], flat["data.synthetic.n_test"]
    else:
        total, test = CIFAR10_TRAIN, CIFAR10_TEST
    if flat["data.limit"] is not None:
        total = min(total, flat["data.limit"])
    return total - flat["data.val_size"], flat["data.val_size"], test


def estimate_config(flat: Mapping[str, Any]) -> Estimate:
    """`estimate` for a flattened config (`config.flatten`: "model.hidden_sizes" -> ...)."""
    n_train, n_val, n_test = split_sizes(flat)
    return estimate(flat["model.hidden_sizes"], batch_size=flat["trainer.batch_size"],
                    n_train=n_train, n_val=n_val, n_test=n_test, dtype=flat["trainer.dtype"],
                    optimizer=flat["optim.name"], eval_batch_size=flat["trainer.eval_batch_size"],
                    train_eval_size=flat["trainer.train_eval_size"],
                    activation=flat["model.activation"],
                    maxout_pieces=flat["model.maxout_pieces"], norm=flat["model.norm"],
                    dropout=flat["model.dropout"], health=flat["tracking.health"],
                    whiten=flat["data.whiten.name"], components=flat["data.whiten.components"])


# The key a user changes to shrink each part.
_KEY_OF_PART = {"parameters and gradients": "model.hidden_sizes",
                "optimizer state": "model.hidden_sizes",
                "best parameters and health snapshot": "model.hidden_sizes",
                "activations and gradients": "trainer.batch_size",
                "input batches": "trainer.batch_size",
                "whitening": "data.whiten.name",
                "data (uint8)": "data.limit"}


def check(flat: Mapping[str, Any], available: int | None = None) -> Estimate:
    """Refuse a flattened config that cannot run on this machine; return its estimate.

    Raises mlp.errors.ConfigError naming trainer.batch_size when the batch is larger than
    the training split, or the key behind the largest part of the estimate when the total
    exceeds `available` bytes (default: `available_bytes()`)."""
    n_train = split_sizes(flat)[0]
    if flat["trainer.batch_size"] > n_train:
        raise ConfigError("trainer.batch_size", flat["trainer.batch_size"],
                                    f"at most the {n_train} images of the training split")
    found = estimate_config(flat)
    limit = available_bytes() if available is None else available
    if found.total > limit:
        part = max((p for p in found.parts if p in _KEY_OF_PART), key=found.parts.__getitem__)
        key = _KEY_OF_PART[part]
        raise ConfigError(
            key, flat[key], f"a run that fits in the {gib(limit)} of memory available; this one "
            f"needs about {found.describe()}")
    return found
