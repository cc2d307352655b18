"""mlp.data: archive fetching and verification, safe extraction, the array cache, splits,
normalization, augmentation and batching. Synthetic archives only; downloads go to a local
HTTP server on 127.0.0.1 or to file:// URLs."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tarfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from helpers import listing, member, write_tar

from mlp import data

# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic archive: 200 training images (5 batches of 40), 50 test images."""
    return data.make_synthetic_archive(
        tmp_path_factory.mktemp("archive") / "synthetic.tar.gz", n_train=200, n_test=50
    )


@pytest.fixture(scope="module")
def raw(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> data.Cifar10:
    root = tmp_path_factory.mktemp("root")
    return data.load_cifar10(root, archive, data.file_digest(archive), progress=False)


def indexed(n_train: int = 300, n_test: int = 20) -> data.Cifar10:
    """A Cifar10 whose row i carries i in its first two pixels, to trace rows through a split."""
    X = np.zeros((n_train, data.DIM), np.uint8)
    X[:, 0], X[:, 1] = np.arange(n_train) % 256, np.arange(n_train) // 256
    X_test = np.full((n_test, data.DIM), 7, np.uint8)
    return data.Cifar10(X, np.arange(n_train) % 10, X_test, np.arange(n_test) % 10,
                        data.CLASSES, "0" * 64)


def row_ids(X: np.ndarray) -> np.ndarray:
    return X[:, 0].astype(np.int64) + 256 * X[:, 1].astype(np.int64)


def rewrite(archive: Path, dest: Path, name: str, payload: bytes) -> Path:
    """A copy of `archive` with the batch file `name` replaced by `payload`."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    members = [(m, payload if m.name.endswith("/" + name) else p) for m, p in members]
    return write_tar(dest, members)


def batch_dict(archive: Path, name: str) -> dict:
    with tarfile.open(archive) as tar:
        return pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours Range when server.ranges; can drop or stall a response."""

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if self.headers.get("Range") and srv.ranges:
            start, status = int(self.headers["Range"][len("bytes="):-1]), 206
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.stall:
            self.wfile.flush()
            time.sleep(srv.stall)
            return
        if srv.drops:  # promise the whole body, send half, hang up
            srv.drops -= 1
            payload = payload[: len(payload) // 2]
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    """A threaded HTTP server on 127.0.0.1, stopped after the test; retries do not wait."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(data.fetch, "_RETRY_WAIT", 0.0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.ranges, httpd.drops, httpd.stall = {}, [], True, 0, 0.0
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


# -- locations and digests --------------------------------------------------------------------


def test_default_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MLP_LAB_DATA", str(tmp_path / "d"))
    assert data.default_root() == tmp_path / "d"
    monkeypatch.delenv("MLP_LAB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_root() == tmp_path / "xdg" / "mlp-lab"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_root() == tmp_path / "home" / ".cache" / "mlp-lab"


def test_file_digest_matches_hashlib(archive: Path):
    content = archive.read_bytes()
    assert data.file_digest(archive) == hashlib.md5(content).hexdigest()
    assert data.file_digest(archive, "sha256") == hashlib.sha256(content).hexdigest()


# -- the synthetic archive --------------------------------------------------------------------


def test_synthetic_archive_has_the_official_layout_and_is_deterministic(
        archive: Path, tmp_path: Path):
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    files = ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
    assert names == ["cifar-10-batches-py", *sorted(f"cifar-10-batches-py/{n}" for n in files)]
    batch = batch_dict(archive, "data_batch_3")
    assert set(batch) == {b"data", b"labels", b"filenames", b"batch_label"}
    assert batch[b"data"].shape == (40, 3072) and batch[b"data"].dtype == np.uint8
    assert isinstance(batch[b"labels"], list) and len(batch[b"filenames"]) == 40
    meta = batch_dict(archive, "batches.meta")
    assert meta[b"label_names"] == [c.encode() for c in data.CLASSES]

    same = data.make_synthetic_archive(tmp_path / "same.tar.gz", n_train=200, n_test=50)
    other = data.make_synthetic_archive(tmp_path / "other.tar.gz", 200, 50, seed=1)
    assert same.read_bytes() == archive.read_bytes()
    assert other.read_bytes() != archive.read_bytes()


def test_the_synthetic_archive_appears_whole_or_not_at_all(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    # Parallel sweep jobs that find no archive each write one: none may see a half-written
    # file at the final path, so it is written beside it and renamed into place.
    target = tmp_path / "synthetic.tar.gz"
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((Path(src).parent, target.exists(), Path(src).stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    data.make_synthetic_archive(target, n_train=50, n_test=10)
    assert seen == [(tmp_path, False, target.stat().st_size)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.tar.gz"]


def test_synthetic_classes_are_learnable(raw: data.Cifar10):
    """A nearest-class-mean classifier, fitted on the training images, is far above chance."""
    means = np.stack([raw.X_train[raw.y_train == k].mean(axis=0) for k in range(10)])
    dist = ((raw.X_test[:, None, :].astype(np.float64) - means[None]) ** 2).sum(axis=2)
    assert np.mean(dist.argmin(axis=1) == raw.y_test) > 0.8


# -- load_cifar10 and its cache -----------------------------------------------------------------


def test_load_gives_uint8_rows_and_int64_labels(raw: data.Cifar10, archive: Path):
    assert raw.X_train.shape == (200, 3072) and raw.X_train.dtype == np.uint8
    assert raw.X_test.shape == (50, 3072) and raw.X_test.dtype == np.uint8
    assert raw.y_train.shape == (200,) and raw.y_train.dtype == np.int64
    assert raw.y_test.shape == (50,) and raw.y_test.dtype == np.int64
    assert np.array_equal(np.bincount(raw.y_train), np.full(10, 20))
    assert raw.classes == data.CLASSES
    assert raw.digest == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert isinstance(raw.X_train, np.memmap)
    expected = np.concatenate(
        [batch_dict(archive, f"data_batch_{i}")[b"data"] for i in range(1, 6)])
    assert np.array_equal(raw.X_train, expected)
    assert raw.y_test.tolist() == batch_dict(archive, "test_batch")[b"labels"]


def test_second_load_neither_extracts_unpickles_nor_hashes(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    md5 = data.file_digest(archive)
    first = data.load_cifar10(tmp_path, archive, md5, progress=False)
    (cache_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert cache_dir.name == first.digest[:16] and (cache_dir / "complete.json").is_file()
    assert not list(tmp_path.glob(".extract-*"))

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tarfile, "open", boom)
    monkeypatch.setattr(data.cache._SafeUnpickler, "load", boom)
    monkeypatch.setattr(hashlib, "new", boom)
    second = data.load_cifar10(tmp_path, archive, md5, progress=False)
    assert second.digest == first.digest and second.classes == first.classes
    for name in ("X_train", "y_train", "X_test", "y_test"):
        assert np.array_equal(getattr(second, name), getattr(first, name))


def test_a_replaced_archive_is_not_served_from_the_old_cache(tmp_path: Path):
    path = data.make_synthetic_archive(tmp_path / "a.tar.gz", 50, 10, seed=0)
    first = data.load_cifar10(tmp_path / "root", path, data.file_digest(path), progress=False)
    data.make_synthetic_archive(path, 50, 10, seed=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks
    second = data.load_cifar10(tmp_path / "root", path, data.file_digest(path), progress=False)
    assert second.digest != first.digest
    assert not np.array_equal(second.X_train, first.X_train)


def test_parallel_loads_build_the_cache_once(archive: Path, tmp_path: Path):
    md5, results = data.file_digest(archive), []
    threads = [threading.Thread(target=lambda: results.append(
        data.load_cifar10(tmp_path, archive, md5, progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3
    assert all(np.array_equal(r.X_train, results[0].X_train) for r in results)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


# -- local archives, checksums, corrupt and foreign archives -----------------------------------


def test_local_archive_checksums(archive: Path, tmp_path: Path):
    with pytest.raises(data.DataError, match="0123456789abcdef0123456789abcdef"):
        data.fetch_archive(tmp_path, archive, md5="0123456789abcdef0123456789abcdef")
    with pytest.warns(UserWarning, match="unverified"):
        assert data.fetch_archive(tmp_path, archive) == archive
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.fetch_archive(tmp_path, archive, data.file_digest(archive).upper()) == archive


def test_missing_archive_and_md5_without_archive_are_data_errors(tmp_path: Path):
    with pytest.raises(data.DataError, match=re.escape("/no/such/cifar.tar.gz")):
        data.load_cifar10(tmp_path, "/no/such/cifar.tar.gz")
    with pytest.raises(data.DataError, match=r"data\.md5"):
        data.fetch_archive(tmp_path, None, md5=PAYLOAD_MD5)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_archive_is_a_data_error(archive: Path, tmp_path: Path, damage: str):
    content = archive.read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes({"garbage": os.urandom(5000), "truncated": content[: len(content) // 2],
                     "empty": b""}[damage])
    with pytest.raises(data.DataError, match=r"bad\.tar\.gz"):
        data.load_cifar10(tmp_path / "root", bad, data.file_digest(bad), progress=False)
    assert not list((tmp_path / "root").glob(".extract-*"))
    assert not [p for p in (tmp_path / "root" / "cache").iterdir() if p.is_dir()]


def test_archive_without_cifar_batches_is_a_data_error(tmp_path: Path):
    bad = write_tar(tmp_path / "other.tar.gz", [(member("readme.txt"), b"hello")])
    with pytest.raises(data.DataError, match="data_batch_1 is missing"):
        data.load_cifar10(tmp_path / "root", bad, data.file_digest(bad), progress=False)


def test_labels_out_of_range_are_a_data_error(archive: Path, tmp_path: Path):
    batch = batch_dict(archive, "test_batch")
    batch[b"labels"][3] = 10
    bad = rewrite(archive, tmp_path / "bad.tar.gz", "test_batch", pickle.dumps(batch, 2))
    with pytest.raises(data.DataError, match=r"test_batch: labels outside 0\.\.9"):
        data.load_cifar10(tmp_path / "root", bad, data.file_digest(bad), progress=False)


def test_label_count_must_match_images(archive: Path, tmp_path: Path):
    batch = batch_dict(archive, "data_batch_2")
    batch[b"labels"] = batch[b"labels"][:-1]
    bad = rewrite(archive, tmp_path / "bad.tar.gz", "data_batch_2", pickle.dumps(batch, 2))
    with pytest.raises(data.DataError, match="data_batch_2: 40 images but labels of shape"):
        data.load_cifar10(tmp_path / "root", bad, data.file_digest(bad), progress=False)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.target),)


def test_a_pickle_that_would_run_code_is_refused(archive: Path, tmp_path: Path):
    target = tmp_path / "pwned"
    bad = rewrite(archive, tmp_path / "bad.tar.gz", "data_batch_1",
                  pickle.dumps({b"data": _Exploit(target)}, 2))
    with pytest.raises(data.DataError, match="not allowed"):
        data.load_cifar10(tmp_path / "root", bad, data.file_digest(bad), progress=False)
    assert not target.exists()


# -- safe_extract -----------------------------------------------------------------------------


def test_safe_extract_extracts_a_genuine_archive(archive: Path, tmp_path: Path):
    data.safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "cifar-10-batches-py" / "test_batch").is_file()


UNSAFE = {
    "dotdot": lambda tmp: (member("../evil"), b"x"),
    "nested dotdot": lambda tmp: (member("cifar-10-batches-py/../../evil"), b"x"),
    "absolute": lambda tmp: (member(str(tmp / "abs_evil")), b"x"),
    "symlink": lambda tmp: (member("cifar-10-batches-py/link", tarfile.SYMTYPE, "../.."), None),
    "hardlink": lambda tmp: (member("cifar-10-batches-py/hard", tarfile.LNKTYPE,
                                    "cifar-10-batches-py/ok"), None),
    "device": lambda tmp: (member("cifar-10-batches-py/dev", tarfile.CHRTYPE), None),
    "fifo": lambda tmp: (member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), None),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_safe_extract_rejects_unsafe_members_and_writes_nothing(tmp_path: Path, kind: str):
    bad_member = UNSAFE[kind](tmp_path)
    # a harmless member first, and a file behind the link, to catch partial extraction
    members = [(member("cifar-10-batches-py/ok"), b"fine"), bad_member,
               (member("cifar-10-batches-py/link/escaped"), b"x")]
    bad = write_tar(tmp_path / "bad.tar.gz", members)
    before = listing(tmp_path)
    with pytest.raises(data.DataError, match="refusing to extract") as err:
        data.safe_extract(bad, tmp_path / "dest")
    assert repr(bad_member[0].name) in str(err.value)
    assert listing(tmp_path) == before


# -- download ---------------------------------------------------------------------------------


def test_download_verifies_and_leaves_no_part_file(server, tmp_path: Path):
    server.files["/f.tar.gz"] = PAYLOAD
    dest = tmp_path / "sub" / "f.tar.gz"
    assert data.download(server.url + "/f.tar.gz", dest, PAYLOAD_MD5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_suffix(".part").exists()


def test_download_resumes_a_partial_file_with_a_range_request(server, tmp_path: Path):
    server.files["/f.tar.gz"] = PAYLOAD
    dest = tmp_path / "f.tar.gz"
    dest.with_suffix(".part").write_bytes(PAYLOAD[:100_000])
    data.download(server.url + "/f.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert server.requests == [("/f.tar.gz", "bytes=100000-")]
    assert dest.read_bytes() == PAYLOAD


def test_download_restarts_when_the_server_ignores_ranges(server, tmp_path: Path):
    server.files["/f.tar.gz"], server.ranges = PAYLOAD, False
    dest = tmp_path / "f.tar.gz"
    dest.with_suffix(".part").write_bytes(b"stale bytes from something else")
    data.download(server.url + "/f.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_download_restarts_when_the_part_file_is_too_long(server, tmp_path: Path):
    server.files["/f.tar.gz"] = PAYLOAD
    dest = tmp_path / "f.tar.gz"
    dest.with_suffix(".part").write_bytes(PAYLOAD + b"extra")
    data.download(server.url + "/f.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert [r for _, r in server.requests] == [f"bytes={len(PAYLOAD) + 5}-", None]
    assert dest.read_bytes() == PAYLOAD


def test_download_retries_a_dropped_connection_and_resumes(server, tmp_path: Path):
    server.files["/f.tar.gz"], server.drops = PAYLOAD, 1
    dest = tmp_path / "f.tar.gz"
    data.download(server.url + "/f.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert [r for _, r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_md5_mismatch_leaves_no_file(server, tmp_path: Path):
    server.files["/f.tar.gz"] = PAYLOAD
    dest = tmp_path / "f.tar.gz"
    with pytest.raises(data.DataError, match=r"expected 0{31}1"):
        data.download(server.url + "/f.tar.gz", dest, "0" * 31 + "1", progress=False)
    assert listing(tmp_path) == set()


def test_download_http_error_is_not_retried(server, tmp_path: Path):
    with pytest.raises(data.DataError, match="HTTP 404"):
        data.download(server.url + "/missing", tmp_path / "f.tar.gz", None, progress=False)
    assert len(server.requests) == 1


def test_download_gives_up_after_timeouts(server, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(data.fetch, "_TIMEOUT", 0.2)
    monkeypatch.setattr(data.fetch, "_ATTEMPTS", 2)
    server.files["/f.tar.gz"], server.stall = PAYLOAD, 1.0
    with pytest.raises(data.DataError, match=r"after 2 attempts.*timed out"):
        data.download(server.url + "/f.tar.gz", tmp_path / "f.tar.gz", None, progress=False)
    assert len(server.requests) == 2 and not (tmp_path / "f.tar.gz").exists()


def test_download_unreachable_server_is_a_data_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(data.fetch, "_RETRY_WAIT", 0.0)
    port = free_port()
    with pytest.raises(data.DataError, match=r"could not download.*data\.archive"):
        data.download(f"http://127.0.0.1:{port}/f", tmp_path / "f.tar.gz", None, progress=False)


def test_download_from_a_file_url(tmp_path: Path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = data.download(source.as_uri(), tmp_path / "out" / "f.tar.gz", PAYLOAD_MD5, False)
    assert dest.read_bytes() == PAYLOAD


def test_fetch_official_downloads_once_and_replaces_a_bad_copy(
        server, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server.files["/cifar.tar.gz"] = archive.read_bytes()
    monkeypatch.setattr(data.fetch, "OFFICIAL_URL", server.url + "/cifar.tar.gz")
    monkeypatch.setattr(data.fetch, "OFFICIAL_MD5", data.file_digest(archive))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = data.load_cifar10(tmp_path, progress=False)
        assert data.fetch_archive(tmp_path, progress=False) == tmp_path / data.ARCHIVE_NAME
    assert raw.X_train.shape == (200, 3072) and len(server.requests) == 1

    (tmp_path / data.ARCHIVE_NAME).write_bytes(b"damaged")
    data.fetch_archive(tmp_path, progress=False)
    assert len(server.requests) == 2
    assert (tmp_path / data.ARCHIVE_NAME).read_bytes() == archive.read_bytes()


# -- split ------------------------------------------------------------------------------------


def test_split_sizes_disjointness_and_determinism():
    raw = indexed()
    s = data.split(raw, val_size=50, seed=3)
    assert s.X_train.shape == (250, 3072) and s.X_val.shape == (50, 3072)
    train, val = row_ids(s.X_train), row_ids(s.X_val)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(300))
    assert np.array_equal(s.y_train, raw.y_train[train]) and s.y_val.dtype == np.int64
    assert s.X_test is raw.X_test and s.y_test is raw.y_test and s.classes == data.CLASSES
    assert s.fingerprint == {"archive_sha256": "0" * 64, "n_train": 250, "n_val": 50,
                             "n_test": 20, "limit": None, "val_size": 50, "seed": 3}
    assert np.array_equal(row_ids(data.split(raw, val_size=50, seed=3).X_val), val)
    assert not np.array_equal(row_ids(data.split(raw, val_size=50, seed=4).X_val), val)


def test_split_limit_uses_only_the_first_images():
    s = data.split(indexed(), val_size=10, limit=40, seed=0)
    ids = np.concatenate([row_ids(s.X_train), row_ids(s.X_val)])
    assert sorted(ids) == list(range(40)) and len(s.y_val) == 10
    assert s.fingerprint["limit"] == 40 and s.fingerprint["n_train"] == 30
    assert len(data.split(indexed(), val_size=0).y_val) == 0


@pytest.mark.parametrize(("val_size", "limit", "key"), [
    (300, None, "data.val_size"), (40, 40, "data.val_size"), (-1, None, "data.val_size"),
    (10, 301, "data.limit"), (0, 0, "data.limit"),
])
def test_split_rejects_impossible_sizes(val_size: int, limit: int | None, key: str):
    with pytest.raises(data.DataError, match=key):
        data.split(indexed(), val_size=val_size, limit=limit)


# -- Normalizer -------------------------------------------------------------------------------


@pytest.fixture
def pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    channel_means = np.repeat([60, 120, 200], 1024)
    return np.clip(rng.normal(channel_means, 30, (50, 3072)), 0, 255).astype(np.uint8)


def test_mean_image_centres_every_pixel(pixels: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(data.normalize, "_FIT_ROWS", 7)  # several chunks
    norm = data.Normalizer("mean_image").fit(pixels)
    out = norm(pixels, np.float64)
    assert np.allclose(out.mean(axis=0), 0, atol=1e-9)
    assert np.allclose(out + norm.mean, pixels)


def test_channel_mode_gives_zero_mean_unit_std_per_channel(
        pixels: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(data.normalize, "_FIT_ROWS", 7)
    out = data.Normalizer("channel").fit(pixels)(pixels, np.float64).reshape(50, 3, 1024)
    assert np.allclose(out.mean(axis=(0, 2)), 0, atol=1e-9)
    assert np.allclose(out.std(axis=(0, 2)), 1, atol=1e-9)


def test_none_mode_keeps_raw_pixel_values(pixels: np.ndarray):
    out = data.Normalizer("none").fit(pixels)(pixels)
    assert out.dtype == np.float32 and np.array_equal(out, pixels.astype(np.float32))


def test_normalizer_writes_into_out_and_round_trips_its_state(pixels: np.ndarray,
                                                              tmp_path: Path):
    norm = data.Normalizer("channel").fit(pixels)
    buffer = np.empty((10, 3072), np.float32)
    result = norm(pixels[:10], out=buffer)
    assert result is buffer and np.allclose(buffer, norm(pixels[:10]))

    np.savez(tmp_path / "n.npz", **norm.state_dict())
    restored = data.Normalizer()
    with np.load(tmp_path / "n.npz", allow_pickle=False) as f:
        restored.load_state_dict({k: f[k] for k in f.files})
    assert restored.mode == "channel"
    assert np.array_equal(restored(pixels), norm(pixels))


def test_normalizer_misuse():
    with pytest.raises(data.DataError, match=r"data\.normalize"):
        data.Normalizer("zca")
    with pytest.raises(RuntimeError, match="fit"):
        data.Normalizer()(np.zeros((1, 3072), np.uint8))


# -- augment ----------------------------------------------------------------------------------


def image_rows(image: np.ndarray, n: int) -> np.ndarray:
    """n copies of a (3, 32, 32) image as uint8 rows (n, 3072)."""
    return np.tile(image.reshape(1, 3072), (n, 1)).astype(np.uint8)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image (3, 32, 32) with content moved down dy and right dx, zeros shifted in."""
    out = np.zeros_like(image)
    out[:, max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = \
        image[:, max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)]
    return out


# distinct, nonzero values everywhere, and not left-right symmetric
PICTURE = (1 + (np.arange(3 * 32 * 32) * 7) % 250).reshape(3, 32, 32).astype(np.uint8)


def test_flip_mirrors_some_images_and_flipping_twice_is_identity():
    X = image_rows(PICTURE, 64)
    out = data.augment(X, np.random.default_rng(0), pad=0, flip=True)
    assert out.shape == X.shape and out.dtype == np.uint8
    images = out.reshape(64, 3, 32, 32)
    flipped = np.array([np.array_equal(im, PICTURE[:, :, ::-1]) for im in images])
    kept = np.array([np.array_equal(im, PICTURE) for im in images])
    assert np.all(flipped ^ kept) and 10 < flipped.sum() < 54
    assert np.array_equal(images[flipped][:, :, :, ::-1], X.reshape(64, 3, 32, 32)[flipped])


def test_crop_shifts_content_by_at_most_pad_with_zero_fill():
    X, pad = image_rows(PICTURE, 64), 3
    out = data.augment(X, np.random.default_rng(1), pad=pad, flip=False)
    shifts = []
    for image in out.reshape(64, 3, 32, 32):
        matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                   if np.array_equal(image, shifted(PICTURE, dy, dx))]
        assert len(matches) == 1
        shifts.append(matches[0])
    assert len(set(shifts)) > 20
    assert {dy for dy, _ in shifts} == set(range(-pad, pad + 1))


def test_augment_is_deterministic_and_leaves_its_input_alone():
    X = np.random.default_rng(2).integers(0, 256, (16, 3072), dtype=np.uint8)
    before = X.copy()
    a = data.augment(X, np.random.default_rng(5))
    b = data.augment(X, np.random.default_rng(5))
    assert np.array_equal(a, b) and np.array_equal(X, before)
    assert not np.array_equal(a, data.augment(X, np.random.default_rng(6)))
    assert np.array_equal(data.augment(X, np.random.default_rng(5), pad=0, flip=False), X)


@pytest.mark.parametrize(("dy", "dx"), [(3, 0), (-3, 2), (0, -4), (0, 0), (40, 0)])
def test_shift_moves_every_image_and_fills_with_zeros(dy: int, dx: int):
    X = np.random.default_rng(5).integers(1, 256, (4, 3072), dtype=np.uint8)
    images, moved = X.reshape(4, 3, 32, 32), data.shift(X, dy, dx).reshape(4, 3, 32, 32)
    for y, x in [(0, 0), (31, 31), (5, 29), (28, 3), (16, 16)]:
        inside = 0 <= y + dy < 32 and 0 <= x + dx < 32
        expected = images[:, :, y + dy, x + dx] if inside else 0
        assert np.array_equal(moved[:, :, y, x], np.broadcast_to(expected, (4, 3))), (y, x)
    assert (moved == 0).sum() == 4 * 3 * (32 * 32 - max(32 - abs(dy), 0) * max(32 - abs(dx), 0))


def test_a_shift_is_a_crop_augment_can_draw():
    X = np.random.default_rng(6).integers(0, 256, (300, 3072), dtype=np.uint8)
    cropped = data.augment(X, np.random.default_rng(7), pad=2, flip=False)
    moves = {(dy, dx): data.shift(X, dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    for i in range(len(X)):  # every crop is one of the 25 moves of its image
        assert any(np.array_equal(cropped[i], m[i]) for m in moves.values())


def test_mirror_is_the_flip_augment_draws():
    X = np.random.default_rng(3).integers(0, 256, (64, 3072), dtype=np.uint8)
    mirrored = data.mirror(X)
    images, seen = X.reshape(64, 3, 32, 32), mirrored.reshape(64, 3, 32, 32)
    assert np.array_equal(seen[:, :, :, 0], images[:, :, :, 31])  # columns swap, rows stay
    assert np.array_equal(seen[:, 2, 5, 7], images[:, 2, 5, 24])
    assert np.array_equal(data.mirror(mirrored), X) and mirrored.dtype == X.dtype
    flipped = data.augment(X, np.random.default_rng(4), pad=0, flip=True)
    changed = (flipped != X).any(axis=1)
    assert 0 < changed.sum() < 64  # some flipped, some not
    assert np.array_equal(flipped[changed], mirrored[changed])


# -- batches ----------------------------------------------------------------------------------


def test_batches_cover_the_epochs_order_once():
    X = np.repeat(np.arange(103, dtype=np.uint8)[:, None], 3072, axis=1)
    y = np.arange(103)
    norm = data.Normalizer("none").fit(X)
    order = np.random.default_rng(0).permutation(103)
    got = list(data.batches(X, y, order, 10, norm))
    assert [b for b, _, _ in got] == list(range(11))
    assert [len(yb) for _, _, yb in got] == [10] * 10 + [3]
    assert np.array_equal(np.concatenate([yb for _, _, yb in got]), order)
    assert all(np.array_equal(xb[:, 0], yb) and xb.dtype == np.float32 for _, xb, yb in got)
    resumed = list(data.batches(X, y, order, 10, norm, first=4))
    assert [b for b, _, _ in resumed] == list(range(4, 11))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got[4:], resumed, strict=True))


@pytest.mark.parametrize("prefetch", [False, True])
def test_batches_are_the_same_prefetched_or_not_and_reuse_the_given_arrays(
        pixels: np.ndarray, prefetch: bool):
    y = np.arange(len(pixels))
    norm = data.Normalizer("mean_image").fit(pixels)
    order = np.random.default_rng(1).permutation(len(pixels))
    kwargs = {"seed": 3, "epoch": 2, "augment_pad": 4, "augment_flip": True}
    fresh = [xb.copy() for _, xb, _ in data.batches(pixels, y, order, 16, norm, **kwargs)]
    out = (np.empty((16, 3072), np.float32), np.empty((16, 3072), np.float32))
    for b, xb, _ in data.batches(pixels, y, order, 16, norm, prefetch=prefetch, out=out,
                                 **kwargs):
        assert np.shares_memory(xb, out[b % 2])
        assert np.array_equal(xb, fresh[b])
    other_epoch = next(data.batches(pixels, y, order, 16, norm, **{**kwargs, "epoch": 3}))
    assert not np.array_equal(other_epoch[1], fresh[0])


def test_batches_augment_only_when_asked(pixels: np.ndarray):
    y = np.arange(len(pixels))
    norm = data.Normalizer("mean_image").fit(pixels)
    order = np.arange(len(pixels))
    plain = np.concatenate([xb for _, xb, _ in data.batches(pixels, y, order, 16, norm,
                                                             np.float64)])
    assert np.array_equal(plain, norm(pixels, np.float64))
    _, xb, yb = next(data.batches(pixels, y, order, 16, norm, np.float64, augment_pad=4,
                                  augment_flip=True))
    assert xb.dtype == np.float64 and not np.allclose(xb, norm(pixels[yb], np.float64))


def test_batches_refuse_an_order_of_another_length(pixels: np.ndarray):
    norm = data.Normalizer("none").fit(pixels)
    with pytest.raises(ValueError, match="order"):
        next(data.batches(pixels, np.arange(len(pixels)), np.arange(3), 4, norm))


# -- offline first ----------------------------------------------------------------------------


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def download(*args: object, **kwargs: object) -> None:
        raise AssertionError("no download may be attempted")

    monkeypatch.setattr(data.fetch, "download", download)


def test_a_decoded_cache_of_the_official_archive_needs_no_archive_and_no_network(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The synthetic archive stands in for the official one; a first run (given the file)
    # builds the cache, later runs without data.archive use the cache alone.
    monkeypatch.setattr(data.fetch, "OFFICIAL_MD5", data.file_digest(archive))
    first = data.load_cifar10(tmp_path, archive, progress=False)
    _no_network(monkeypatch)
    again = data.load_cifar10(tmp_path, progress=False)
    assert again.digest == first.digest
    assert np.array_equal(again.X_train, first.X_train)


def test_a_cache_of_another_archive_does_not_stand_in_for_the_official_one(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data.load_cifar10(tmp_path, archive, data.file_digest(archive), progress=False)
    _no_network(monkeypatch)
    with pytest.raises(AssertionError, match="no download"):
        data.load_cifar10(tmp_path, progress=False)


def test_a_named_archive_is_used_without_network(archive: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    _no_network(monkeypatch)
    raw = data.load_cifar10(tmp_path, archive, data.file_digest(archive), progress=False)
    assert raw.X_train.shape == (200, 3072)
