"""Stage 3, decode and cache: the archive's pickled batches (unpickled with an allow-list,
so a hostile archive cannot run code) decoded once into uint8 `.npy` files keyed by the
archive's sha256, memory-mapped on every later run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mlp.data.fetch
from mlp.data.cifar import BATCH_DIR, CLASSES, DIM, TRAIN_BATCHES, DataError
from mlp.data.extract import safe_extract
from mlp.data.fetch import digests, fetch_archive, locked

_ARRAYS = ("X_train", "y_train", "X_test", "y_test")
_MARKER = "complete.json"

# What a CIFAR-10 batch pickle may name: numpy array reconstruction, and `_codecs.encode`,
# which protocol 2 uses for bytes. Anything else (os.system, ...) is refused, so a hostile
# archive cannot run code when we unpickle it.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}



class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _unpickle(path: Path, archive: Path) -> object:
    where = f"{archive}: {BATCH_DIR}/{path.name}"
    if not path.is_file():
        raise DataError(
            f"{where} is missing: this is not a CIFAR-10 python archive (expected "
            f"{BATCH_DIR}/data_batch_1..5, test_batch, batches.meta). Use the official archive."
        )
    try:
        with path.open("rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a malformed pickle can raise almost any exception type
        raise DataError(
            f"{where}: cannot unpickle ({type(e).__name__}: {e}). The archive is damaged or not "
            "CIFAR-10: fetch it again."
        ) from e


def _read_batch(directory: Path, name: str, archive: Path) -> tuple[np.ndarray, np.ndarray]:
    """A batch file as (X uint8 (N, 3072), y int64 (N,)), checked."""
    batch = _unpickle(directory / name, archive)
    where = f"{archive}: {BATCH_DIR}/{name}"
    X = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(X, np.ndarray) and X.dtype == np.uint8 and X.ndim == 2
            and X.shape[1] == DIM and labels is not None):
        raise DataError(
            f"{where}: not a CIFAR-10 batch (needs b'data', a uint8 array (N, {DIM}), and "
            "b'labels'). Use the official archive."
        )
    y = np.asarray(labels)
    if y.shape != (len(X),) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(
            f"{where}: {len(X)} images but labels of shape {y.shape} and dtype {y.dtype}; "
            "the archive is damaged or not CIFAR-10: fetch it again."
        )
    if np.any((y < 0) | (y >= len(CLASSES))):
        raise DataError(
            f"{where}: labels outside 0..{len(CLASSES) - 1} (min {y.min()}, max {y.max()}); "
            "the archive is damaged or not CIFAR-10: fetch it again."
        )
    return X, y.astype(np.int64)


def _decode(directory: Path, archive: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The extracted batch files as the four arrays of `Cifar10` and the class names."""
    train = [_read_batch(directory, name, archive) for name in TRAIN_BATCHES]
    X_test, y_test = _read_batch(directory, "test_batch", archive)
    meta = _unpickle(directory / "batches.meta", archive)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == len(CLASSES)
            and all(isinstance(n, bytes) for n in names)):
        raise DataError(
            f"{archive}: {BATCH_DIR}/batches.meta has no list of {len(CLASSES)} "
            "b'label_names'; the archive is damaged or not CIFAR-10: fetch it again."
        )
    arrays = {
        "X_train": np.concatenate([X for X, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "X_test": X_test,
        "y_test": y_test,
    }
    return arrays, [n.decode("utf-8", "replace") for n in names]


def _build_cache(archive: Path, cache_dir: Path, root: Path, archive_digests: dict) -> None:
    """Extract and decode `archive` once, then move the finished arrays into `cache_dir`;
    its marker names the archive, its md5 and sha256, and the classes."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        work = Path(tmp)
        safe_extract(archive, work / "archive")
        arrays, classes = _decode(work / "archive" / BATCH_DIR, archive)
        build = work / "cache"
        build.mkdir()
        for name, array in arrays.items():
            np.save(build / f"{name}.npy", array)
        (build / _MARKER).write_text(json.dumps({
            "archive": str(archive), "md5": archive_digests["md5"],
            "sha256": archive_digests["sha256"], "classes": classes}))
        if cache_dir.exists():  # no marker, so unfinished (e.g. copied by hand): not trusted
            shutil.rmtree(cache_dir)
        os.replace(build, cache_dir)


@dataclass(frozen=True, eq=False)
class Cifar10:
    """The decoded archive: X uint8 (N, 3072) rows (may be np.memmap), y int64 (N,) labels.

    50000 training and 10000 test images for the real archive. `digest` is the archive's
    sha256, `classes` the names from its batches.meta.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    digest: str


def load_cifar10(
    root: Path, archive: str | Path | None = None, md5: str | None = None, progress: bool = True
) -> Cifar10:
    """Load CIFAR-10 as uint8 arrays memory-mapped from a cache under `root`.

    `fetch_archive(root, archive, md5, progress)` provides the archive. The first time an
    archive is seen it is extracted (safely, into a temporary directory under `root`, removed
    after), its batches decoded and checked (labels in 0..9, one per image) and saved as
    `.npy` files under root/cache/<sha256[:16]>/, which appears by an atomic rename with a
    marker file inside. Later calls only memory-map those files, which takes milliseconds.
    Offline first: with neither `archive` nor `md5`, a finished cache of the official
    archive (its marker records the md5) is used as it is, without looking for the archive
    or the network. Returns X_train (50000, 3072), y_train (50000,), X_test (10000, 3072),
    y_test (10000,) for the real archive.
    """
    root = Path(root).expanduser()
    cached = _official_cache(root) if archive is None and md5 is None else None
    if cached is not None:
        cache_dir, sha256 = cached
    else:
        path = fetch_archive(root, archive, md5, progress)
        archive_digests = digests(path, root)
        sha256 = archive_digests["sha256"]
        cache_dir = root / "cache" / sha256[:16]
        if not (cache_dir / _MARKER).is_file():
            with locked(root / "cache" / ".lock"):
                if not (cache_dir / _MARKER).is_file():
                    _build_cache(path, cache_dir, root, archive_digests)
    try:
        classes = json.loads((cache_dir / _MARKER).read_text())["classes"]
        arrays = {
            name: np.load(cache_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in _ARRAYS
        }
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{cache_dir}: the array cache is damaged ({e}). Delete that directory and run "
            "again to rebuild it."
        ) from e
    return Cifar10(**arrays, classes=tuple(classes), digest=sha256)



def _official_cache(root: Path) -> tuple[Path, str] | None:
    """(directory, archive sha256) of a finished cache of the official archive under root,
    recognized by the md5 its marker records; None when there is none."""
    for marker in sorted((root / "cache").glob(f"*/{_MARKER}")):
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue  # damaged: not trusted, the archive route rebuilds it
        official = isinstance(info, dict) and info.get("md5") == mlp.data.fetch.OFFICIAL_MD5
        if official and marker.parent.name == str(info.get("sha256"))[:16]:
            return marker.parent, info["sha256"]
    return None
