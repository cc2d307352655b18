"""CIFAR-10: fetch the archive, verify it, cache it as arrays, split, normalize, augment, batch.

The flow of one run: `load_cifar10` fetches the archive (the official download, checked
against its md5, or a local file), decodes it once into a cache of uint8 `.npy` files keyed
by the archive's sha256 and memory-maps that cache on every later run. `split` holds a seeded
validation set out of the training images, a `Normalizer` fitted on the training split turns
uint8 rows into floats, and `batches` yields one shuffled (and optionally augmented) epoch.

Images are rows of 3072 uint8 values, as in the archive: the R, G and B planes of a 32x32
image one after the other. Every problem a user can fix (a missing or corrupt archive, a
checksum mismatch, a bad split size) raises `DataError` saying what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import DTypeLike
from tqdm import tqdm

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

ARCHIVE_NAME = "cifar-10-python.tar.gz"
IMAGE_SIZE = 32
DIM = 3 * IMAGE_SIZE * IMAGE_SIZE

_BATCH_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_ARRAYS = ("X_train", "y_train", "X_test", "y_test")
_MARKER = "complete.json"
_CHUNK = 1 << 20
_FIT_ROWS = 1024  # rows per float64 chunk in Normalizer.fit: 25 MB, not a copy of the split

_ATTEMPTS = 4
_TIMEOUT = 30.0
_RETRY_WAIT = 1.0  # seconds before the 2nd attempt, doubled for each further one

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


class DataError(ValueError):
    """A data problem the user can fix; the message says which file, what is wrong, what to do."""


def default_root() -> Path:
    """Directory for the downloaded archive and the array cache.

    `$MLP_LAB_DATA` if set, else `$XDG_CACHE_HOME/mlp-lab` (when that is an absolute path, as
    the XDG spec requires), else `~/.cache/mlp-lab`.
    """
    if os.environ.get("MLP_LAB_DATA"):
        return Path(os.environ["MLP_LAB_DATA"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "mlp-lab"


def _hash_file(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of the file at `path` with a `hashlib` algorithm, read in 1 MiB chunks."""
    return _hash_file(Path(path), (algorithm,))[algorithm]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _digests(path: Path, root: Path) -> dict:
    """md5 and sha256 of `path` in one pass, remembered in root/cache/digests.json.

    Hashing the full archive takes most of a second, so the result is reused while the
    file's (resolved path, size, mtime_ns) is unchanged. A missing or damaged index only
    costs a rehash; parallel writers replace it atomically, the last one wins.
    """
    index_path = root / "cache" / "digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    stat = path.stat()
    key = str(path.resolve())
    entry = index.get(key)
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entry.update(_hash_file(path, ("md5", "sha256")))
    index[key] = entry
    _write_atomic(index_path, json.dumps(index, indent=1).encode())
    return entry


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path`, released when the block ends or the process dies.

    Parallel sweep jobs share one root: the first downloads or builds the cache, the others
    wait and then find it done instead of writing the same `.part` file together.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _download_once(url: str, part: Path, progress: bool, desc: str) -> None:
    """One request: append to `part` from where it ends (HTTP Range) or rewrite it whole."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "mlp-lab"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
        resumed = getattr(response, "status", None) == 206 and response.headers.get(
            "Content-Range", ""
        ).startswith(f"bytes {offset}-")
        if not resumed:  # 200, or file://: the whole file comes again
            offset = 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        show = progress and sys.stderr is not None and sys.stderr.isatty()
        with (
            part.open("ab" if resumed else "wb") as f,
            tqdm(total=expected, initial=offset, unit="B", unit_scale=True,
                 unit_divisor=1024, desc=desc, disable=not show) as bar,
        ):
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            size = f.tell()
    # http.client returns a short body without complaint when the connection drops
    if expected is not None and size != expected:
        raise ConnectionError(f"connection closed after {size} of {expected} bytes")


def download(url: str, dest: Path, md5: str | None, progress: bool = True) -> Path:
    """Download `url` to `dest` and return `dest`.

    Bytes go to `dest.with_suffix(".part")`; an existing `.part` is resumed with an HTTP Range
    request when the server answers 206, and rewritten otherwise. Timeouts and dropped
    connections are retried a few times with growing pauses, resuming each time. When `md5`
    is given the finished file must match it, or it is deleted and DataError raised; `dest`
    appears only by an atomic rename after that check, so a partial or corrupt download is
    never used. A tqdm progress bar is shown when `progress` is true and stderr is a terminal.
    Not safe for two processes on one `dest` at once: `fetch_archive` serializes them.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            _download_once(url, part, progress, dest.name)
            break
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:  # the .part is longer than the file: not a prefix of it
                part.unlink(missing_ok=True)
            elif e.code < 500 and e.code not in (408, 429):
                raise DataError(
                    f"{url}: HTTP {e.code} {e.reason}. The file cannot be downloaded from there: "
                    "get it by other means and pass its path as data.archive."
                ) from e
            error: Exception = e
        except (OSError, http.client.HTTPException) as e:
            error = e
        if attempt < _ATTEMPTS:
            time.sleep(_RETRY_WAIT * 2 ** (attempt - 1))
    else:
        raise DataError(
            f"could not download {url} after {_ATTEMPTS} attempts (last error: {error}). Check "
            f"the network and run again (the partial file {part} will be resumed), or get the "
            "file by other means and pass its path as data.archive."
        )
    if md5 is not None:
        actual = file_digest(part, "md5")
        if actual != md5.lower():
            part.unlink()
            raise DataError(
                f"{url}: the downloaded file has md5 {actual}, expected {md5}; it was deleted. "
                "Run again to download it afresh. If the mismatch persists, something between "
                "you and the server alters the file: get it by other means, check it with "
                "`md5sum` and pass its path as data.archive."
            )
    os.replace(part, dest)
    return dest


def fetch_archive(
    root: Path, archive: str | Path | None = None, md5: str | None = None, progress: bool = True
) -> Path:
    """Path of a usable CIFAR-10 archive.

    `archive` None: the official archive cached at root/"cifar-10-python.tar.gz", downloaded
    when absent or when its md5 is not OFFICIAL_MD5 (`md5` must then be None). `archive` given:
    that local file, which must exist; it must match `md5` when one is given, otherwise a
    UserWarning says it is unverified (unless it is the official file). Digests are
    remembered under root/cache, so a second call does not rehash.
    """
    root = Path(root).expanduser()
    if archive is None:
        if md5 is not None:
            raise DataError(
                f"data.md5={md5} is set but data.archive is not: the official download is always "
                "checked against its own md5. Set data.archive to the file that md5 belongs to, "
                "or unset data.md5."
            )
        dest = root / ARCHIVE_NAME
        with _locked(dest.with_suffix(".lock")):
            if not (dest.is_file() and _digests(dest, root)["md5"] == OFFICIAL_MD5):
                download(OFFICIAL_URL, dest, OFFICIAL_MD5, progress)
        return dest
    path = Path(archive).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.archive={archive}: no such file. Give the path of a cifar-10-python.tar.gz, "
            f"or leave data.archive unset to download the official one from {OFFICIAL_URL}."
        )
    actual = _digests(path, root)["md5"]
    if md5 is not None and actual != md5.lower():
        raise DataError(
            f"{path}: md5 is {actual}, expected {md5} (data.md5). The file is damaged or not the "
            "one meant: fetch it again, or correct data.md5."
        )
    if md5 is None and actual != OFFICIAL_MD5:
        warnings.warn(
            f"{path}: using an unverified archive (no md5 given, and it is not the official "
            f"file). Set data.md5 to its md5 (`md5sum {path.name}`) to verify it.",
            UserWarning,
            stacklevel=2,
        )
    return path


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` could write outside the destination or make a special file."""
    name = PurePosixPath(member.name)
    if name.is_absolute():
        return "absolute path"
    if ".." in name.parts:
        return "path with '..'"
    if member.issym() or member.islnk():
        return "link"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    return None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract the tar (optionally compressed) `archive` into `dest`.

    Every member is checked before anything is written: an absolute path, '..', a link or a
    device / fifo raises DataError naming the member, and then nothing has been extracted.
    Extraction also uses tarfile's "data" filter. A corrupt or truncated archive raises
    DataError.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe(member)
                if reason is not None:
                    raise DataError(
                        f"{archive}: refusing to extract member {member.name!r} ({reason}); "
                        "nothing was extracted. This is not a genuine CIFAR-10 archive: use the "
                        "official one."
                    )
            dest.mkdir(parents=True, exist_ok=True)
            # The "data" filter exists from Python 3.11.4 on (Debian 12 ships 3.11.2); the
            # members were already checked one by one above, so it is a second line of defense.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **extra)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{archive}: cannot extract ({type(e).__name__}: {e}). If the archive is corrupt or "
            "truncated, delete it and fetch it again."
        ) from e


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _unpickle(path: Path, archive: Path) -> object:
    where = f"{archive}: {_BATCH_DIR}/{path.name}"
    if not path.is_file():
        raise DataError(
            f"{where} is missing: this is not a CIFAR-10 python archive (expected "
            f"{_BATCH_DIR}/data_batch_1..5, test_batch, batches.meta). Use the official archive."
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
    where = f"{archive}: {_BATCH_DIR}/{name}"
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
    train = [_read_batch(directory, name, archive) for name in _TRAIN_BATCHES]
    X_test, y_test = _read_batch(directory, "test_batch", archive)
    meta = _unpickle(directory / "batches.meta", archive)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == len(CLASSES)
            and all(isinstance(n, bytes) for n in names)):
        raise DataError(
            f"{archive}: {_BATCH_DIR}/batches.meta has no list of {len(CLASSES)} "
            "b'label_names'; the archive is damaged or not CIFAR-10: fetch it again."
        )
    arrays = {
        "X_train": np.concatenate([X for X, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "X_test": X_test,
        "y_test": y_test,
    }
    return arrays, [n.decode("utf-8", "replace") for n in names]


def _build_cache(archive: Path, cache_dir: Path, root: Path) -> None:
    """Extract and decode `archive` once, then move the finished arrays into `cache_dir`."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        work = Path(tmp)
        safe_extract(archive, work / "archive")
        arrays, classes = _decode(work / "archive" / _BATCH_DIR, archive)
        build = work / "cache"
        build.mkdir()
        for name, array in arrays.items():
            np.save(build / f"{name}.npy", array)
        (build / _MARKER).write_text(json.dumps({"archive": str(archive), "classes": classes}))
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
    Returns X_train (50000, 3072), y_train (50000,), X_test (10000, 3072), y_test (10000,)
    for the real archive.
    """
    root = Path(root).expanduser()
    path = fetch_archive(root, archive, md5, progress)
    sha256 = _digests(path, root)["sha256"]
    cache_dir = root / "cache" / sha256[:16]
    if not (cache_dir / _MARKER).is_file():
        with _locked(root / "cache" / ".lock"):
            if not (cache_dir / _MARKER).is_file():
                _build_cache(path, cache_dir, root)
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
    parts = np.array_split(y_train, len(_TRAIN_BATCHES))
    members = {
        name: _synthetic_batch(y, rng, f"training batch {i} of {len(parts)}")
        for i, (name, y) in enumerate(zip(_TRAIN_BATCHES, parts, strict=True), 1)
    }
    members["test_batch"] = _synthetic_batch(y_test, rng, "testing batch 1 of 1")
    members["batches.meta"] = {
        b"num_cases_per_batch": len(parts[0]),
        b"label_names": [c.encode() for c in CLASSES],
        b"num_vis": DIM,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # gzip's header holds a timestamp and tar entries an mtime: both fixed for equal bytes
    with (
        path.open("wb") as f,
        gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        folder = tarfile.TarInfo(_BATCH_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{_BATCH_DIR}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test sets: X uint8 (N, 3072) rows, y int64 (N,) labels.

    `fingerprint` identifies the split for tracking: archive_sha256, n_train, n_val, n_test,
    limit, val_size, seed.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    fingerprint: dict


def split(data: Cifar10, val_size: int = 5000, limit: int | None = None, seed: int = 0) -> Splits:
    """Hold `val_size` images out of the first `limit` training images (all when None).

    The validation images are chosen by `np.random.default_rng(seed).permutation`; train and
    validation rows keep their archive order. The test set is passed through untouched. X_train
    (limit - val_size, 3072) and X_val (val_size, 3072) are in-memory copies (one read of the
    memory-mapped cache); y_* int64. val_size may be 0 (an empty validation set) and must be
    smaller than the number of images used; otherwise DataError.
    """
    available = len(data.y_train)
    n = available if limit is None else limit
    if not 1 <= n <= available:
        raise DataError(
            f"data.limit={limit}: must be between 1 and the {available} training images."
        )
    if not 0 <= val_size < n:
        raise DataError(
            f"data.val_size={val_size}: must be at least 0 and smaller than the {n} training "
            f"images used (data.limit={limit}). Lower data.val_size or raise data.limit."
        )
    order = np.random.default_rng(seed).permutation(n)
    # sorted indices read the memory-mapped cache front to back; batches() shuffles anyway
    val_idx = np.sort(order[:val_size])
    train_idx = np.sort(order[val_size:])
    fingerprint = {
        "archive_sha256": data.digest,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(data.y_test),
        "limit": limit,
        "val_size": val_size,
        "seed": seed,
    }
    return Splits(
        X_train=data.X_train[train_idx],
        y_train=np.asarray(data.y_train[train_idx]),
        X_val=data.X_train[val_idx],
        y_val=np.asarray(data.y_train[val_idx]),
        X_test=data.X_test,
        y_test=data.y_test,
        classes=data.classes,
        fingerprint=fingerprint,
    )


def _check_mode(mode: str) -> str:
    if mode not in Normalizer.MODES:
        raise DataError(
            f"data.normalize={mode!r}: unknown mode; choose one of {', '.join(Normalizer.MODES)}."
        )
    return mode


class Normalizer:
    """Preprocessing fitted on the training split: X uint8 (B, 3072) -> (X - mean) / scale.

    Modes: "mean_image" subtracts the per-pixel mean image of the training split (cs231n);
    "channel" subtracts the per-channel mean and divides by the per-channel std; "none" keeps
    the raw pixel values 0..255, as floats. `mean` and `scale` are float64 (3072,) arrays
    (scale is all ones except in "channel" mode), saved by `state_dict`.
    """

    MODES = ("mean_image", "channel", "none")

    def __init__(self, mode: str = "channel") -> None:
        self.mode = _check_mode(mode)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, X: np.ndarray) -> Normalizer:
        """Compute mean and scale from X uint8 (N, 3072), in float64 chunks; returns self."""
        n, d = X.shape
        if self.mode == "none":
            self.mean, self.scale = np.zeros(d), np.ones(d)
            return self
        if n == 0:
            raise DataError("cannot fit the normalizer on an empty training split.")
        total, squares = np.zeros(d), np.zeros(d)
        for start in range(0, n, _FIT_ROWS):
            chunk = X[start : start + _FIT_ROWS].astype(np.float64)
            total += chunk.sum(axis=0)
            if self.mode == "channel":
                squares += np.einsum("ij,ij->j", chunk, chunk)
        if self.mode == "mean_image":
            self.mean, self.scale = total / n, np.ones(d)
            return self
        count = n * (d // 3)
        mean = total.reshape(3, -1).sum(axis=1) / count
        std = np.sqrt(np.maximum(squares.reshape(3, -1).sum(axis=1) / count - mean**2, 0.0))
        std[std == 0] = 1.0  # a constant channel: nothing to scale, and no division by zero
        self.mean, self.scale = np.repeat(mean, d // 3), np.repeat(std, d // 3)
        return self

    def __call__(
        self, X: np.ndarray, dtype: DTypeLike = np.float32, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalize X uint8 (B, 3072) into a new float (B, 3072) array of `dtype`.

        With `out` (a float (B, 3072) buffer to reuse) the result is written there, in out's
        dtype, and `out` is returned.
        """
        if self.mean is None or self.scale is None:
            raise RuntimeError("Normalizer: call fit() or load_state_dict() first.")
        if out is None:
            out = np.empty(X.shape, dtype=dtype)
        np.subtract(X, self.mean.astype(out.dtype), out=out)
        np.multiply(out, (1.0 / self.scale).astype(out.dtype), out=out)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"mode": 0-d str array, "mean": (3072,), "scale": (3072,)}: plain arrays for .npz."""
        if self.mean is None or self.scale is None:
            raise RuntimeError("Normalizer: nothing to save before fit().")
        return {"mode": np.array(self.mode), "mean": self.mean.copy(), "scale": self.scale.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore mode, mean and scale from `state_dict()` output."""
        self.mode = _check_mode(str(state["mode"]))
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.scale = np.array(state["scale"], dtype=np.float64)


def augment(X: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Random crop and horizontal flip: X uint8 (B, 3072) -> new uint8 (B, 3072).

    Each image is zero-padded by `pad` pixels on every side and a 32x32 window taken at a
    random offset (oy, ox) in 0..2*pad, so out[i, j] = image[i + oy - pad, j + ox - pad]
    (the content moves by pad - oy rows and pad - ox columns); pad=0 means no crop. With
    `flip`, each image is then mirrored left-right with probability 1/2. One gather for the
    whole batch; the result depends only on X and the rng state.
    """
    B = len(X)
    images = X.reshape(B, 3, IMAGE_SIZE, IMAGE_SIZE)
    if pad:
        size = IMAGE_SIZE + 2 * pad
        padded = np.zeros((B, 3, size, size), dtype=np.uint8)
        padded[:, :, pad : pad + IMAGE_SIZE, pad : pad + IMAGE_SIZE] = images
        offsets = rng.integers(0, 2 * pad + 1, size=(B, 2))
        # a view of every 32x32 window, (B, 3, 2*pad+1, 2*pad+1, 32, 32): picking one window
        # per image copies 32-byte rows, ten times faster than gathering single pixels
        windows = sliding_window_view(padded, (IMAGE_SIZE, IMAGE_SIZE), axis=(2, 3))
        out = windows[np.arange(B), :, offsets[:, 0], offsets[:, 1]]
    else:
        out = images.copy()
    if flip:
        mirrored = rng.random(B) < 0.5
        out[mirrored] = out[mirrored, :, :, ::-1]
    return out.reshape(B, DIM)


def batches(
    X: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None,
    normalizer: Normalizer,
    dtype: DTypeLike = np.float32,
    augment_pad: int = 0,
    augment_flip: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch over X uint8 (N, 3072), y (N,): yields (normalized float (B, 3072), y (B,)).

    With `rng` the order is `rng.permutation(N)` (every image once, no replacement) and each
    batch is augmented (`augment_pad`, `augment_flip`) before normalizing; without `rng` the
    order is sequential and nothing is augmented (evaluation). The last batch is smaller
    unless `drop_last` drops it. Each batch is a fresh array, safe to keep.
    """
    if len(X) != len(y):
        raise ValueError(f"batches: {len(X)} images but {len(y)} labels")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    n = len(X)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = X[idx]
        if rng is not None and (augment_pad or augment_flip):
            xb = augment(xb, rng, augment_pad, augment_flip)
        yield normalizer(xb, dtype), np.asarray(y[idx])
