"""Stage 1, fetch and verify: the official download (resumed, retried, checked against
its md5) or a local archive, and the digests that name it.

Every problem a user can fix (no network, a missing or corrupt archive, a checksum
mismatch) raises `DataError` saying what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlp.data.cifar import DataError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
_CHUNK = 1 << 20

_ATTEMPTS = 4
_TIMEOUT = 30.0
_RETRY_WAIT = 1.0  # seconds before the 2nd attempt, doubled for each further one


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


def digests(path: Path, root: Path) -> dict:
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
def locked(path: Path) -> Iterator[None]:
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
    # Imported here: a served model carries mlp.data, and must load where only mlflow and
    # NumPy are installed (mlp.tracking.serving).
    from tqdm import tqdm

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
        with locked(dest.with_suffix(".lock")):
            if not (dest.is_file() and digests(dest, root)["md5"] == OFFICIAL_MD5):
                download(OFFICIAL_URL, dest, OFFICIAL_MD5, progress)
        return dest
    path = Path(archive).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.archive={archive}: no such file. Give the path of a cifar-10-python.tar.gz, "
            f"or leave data.archive unset to download the official one from {OFFICIAL_URL}."
        )
    actual = digests(path, root)["md5"]
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

