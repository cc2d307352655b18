"""A small CIFAR-10 look-alike archive, byte for byte reproducible: the tests' and the
quick runs' data, in the official file's format."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from mlp.data.cifar import BATCH_DIR, CLASSES, DIM, IMAGE_SIZE, TRAIN_BATCHES


def _synthetic_images(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072) images for labels y (N,): class k has its own colour and stripes."""
    k = y[:, None, None, None].astype(np.float64)
    channel = np.arange(3)[None, :, None, None]
    colour = 128 + 50 * np.cos(2 * np.pi * (k / len(CLASSES) + channel / 3))
    freq = (k // 2 + 1) * np.pi / 16
    rows = np.arange(IMAGE_SIZE)[:, None]
    cols = np.arange(IMAGE_SIZE)[None, :]
    stripes = np.where(k % 2 == 0, np.sin(freq * rows), np.sin(freq * cols))
    noise = rng.normal(0.0, 40.0, size=(len(y), 3, IMAGE_SIZE, IMAGE_SIZE))
    images = np.clip(np.rint(colour + 30 * stripes + noise), 0, 255)
    return images.astype(np.uint8).reshape(len(y), DIM)


def _synthetic_batch(y: np.ndarray, rng: np.random.Generator, label: str) -> dict:
    return {
        b"batch_label": label.encode(),
        b"labels": y.tolist(),
        b"data": _synthetic_images(y, rng),
        b"filenames": [f"{CLASSES[k]}_{i:05d}.png".encode() for i, k in enumerate(y)],
    }


def make_synthetic_archive(
    path: Path, n_train: int = 500, n_test: int = 100, seed: int = 0
) -> Path:
    """Write a small CIFAR-10 look-alike archive to `path` and return `path`.

    Same layout as the official file (data_batch_1..5 sharing n_train images, test_batch with
    n_test, batches.meta; pickled dicts with bytes keys, protocol 2). Each class has its own
    mean colour and stripe pattern under strong pixel noise, so a small MLP learns it far
    above chance. Labels are balanced. The bytes depend only on the arguments.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.arange(n_train) % len(CLASSES))
    y_test = rng.permutation(np.arange(n_test) % len(CLASSES))
    parts = np.array_split(y_train, len(TRAIN_BATCHES))
    members = {
        name: _synthetic_batch(y, rng, f"training batch {i} of {len(parts)}")
        for i, (name, y) in enumerate(zip(TRAIN_BATCHES, parts, strict=True), 1)
    }
    members["test_batch"] = _synthetic_batch(y_test, rng, "testing batch 1 of 1")
    members["batches.meta"] = {
        b"num_cases_per_batch": len(parts[0]),
        b"label_names": [c.encode() for c in CLASSES],
        b"num_vis": DIM,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: parallel jobs of a sweep that find no archive
    # each write one, and none of them reads another's half-written file.
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    # gzip's header holds a timestamp and tar entries an mtime: both fixed for equal bytes
    with (
        part.open("wb") as f,
        gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        folder = tarfile.TarInfo(BATCH_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{BATCH_DIR}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(part, path)
    return path

