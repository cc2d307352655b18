"""mlp/tracking/spool.py: torn and damaged lines, a full disk, replay twice, no secret kept.

The store is a real SQLite store (one per module: creating one costs seconds); each test
has its own run in it. Faults are made for real where cheap (/dev/full for a full disk,
bytes cut off or changed in the file) and by a failing client otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from mlp.cli import sync
from mlp.tracking import spool, store
from mlp.tracking.spool import SPOOL_NAME, Spool, SpoolError


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(URI, experiment id) of a SQLite store made once for the module."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return uri, store.open_client(uri).create_experiment("spool")


@pytest.fixture
def run(sqlite_store: tuple[str, str]) -> tuple[MlflowClient, str]:
    """(client, run id) of a new RUNNING run in the module's store."""
    uri, experiment_id = sqlite_store
    client = MlflowClient(uri)
    return client, client.create_run(experiment_id).info.run_id


def _points(n: int, key: str = "val") -> list[Metric]:
    return [Metric(key, i / 10, 1_000 + i, i) for i in range(n)]


def _history(client: MlflowClient, run_id: str, key: str = "val") -> list[tuple]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _spool_of(tmp_path: Path, client: MlflowClient, run_id: str, n: int) -> Path:
    path = tmp_path / "ckpt" / SPOOL_NAME
    Spool(path).append(spool.metric_records(client.tracking_uri, run_id, _points(n)))
    return path


def test_a_record_is_one_json_line_with_the_checksum_of_its_payload():
    record = spool.metric_records("sqlite:////x.db", "r1", [Metric("val", 0.1, 5, 1)])[0]
    line = spool.frame(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line)["record"] == record
    assert spool.unframe(line) == record
    assert spool.unframe(json.dumps(record)) == record  # a line of the previous version
    changed = line.replace('"value":0.1', '"value":0.7')
    with pytest.raises(ValueError, match="checksum mismatch"):
        spool.unframe(changed)
    with pytest.raises(ValueError, match="torn"):
        spool.unframe(line[:len(line) // 2])
    with pytest.raises(ValueError, match="metric record without step"):
        spool.unframe(json.dumps({k: v for k, v in record.items() if k != "step"}))


def test_a_torn_last_line_is_reported_and_skipped_and_the_rest_is_sent(
        tmp_path: Path, run: tuple[MlflowClient, str], capsys: pytest.CaptureFixture,
        mlp_log: pytest.LogCaptureFixture):
    client, run_id = run
    path = _spool_of(tmp_path, client, run_id, 5)
    path.write_bytes(path.read_bytes()[:-20])  # the writer died in the middle of line 5
    assert sync.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:5: damaged spool record skipped (not JSON, torn or damaged" in mlp_log.text
    assert "1 damaged record(s) skipped and lost (line(s) 5)" in err
    assert _history(client, run_id) == [(i, i / 10) for i in range(4)]
    assert not path.exists()


def test_a_record_changed_on_disk_does_not_block_those_after_it(
        tmp_path: Path, run: tuple[MlflowClient, str], mlp_log: pytest.LogCaptureFixture):
    client, run_id = run
    path = _spool_of(tmp_path, client, run_id, 5)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"step":1', '"step":7')  # still JSON, not the record
    path.write_text("".join(lines))
    sent = Spool(path).send()
    assert [(d.line, d.reason) for d in sent.damaged] == [
        (2, "checksum mismatch: the record was changed on disk")]
    assert f"{path}:2: damaged spool record skipped (checksum mismatch" in mlp_log.text
    assert sent.metric == 4
    assert [step for step, _ in _history(client, run_id)] == [0, 2, 3, 4]


def test_an_append_after_a_torn_line_does_not_glue_itself_to_it(tmp_path: Path):
    path = tmp_path / SPOOL_NAME
    Spool(path).append(spool.tag_records("sqlite:////x.db", "r1", {"a": "1", "b": "2"}))
    path.write_bytes(path.read_bytes()[:-10])
    Spool(path).append(spool.tag_records("sqlite:////x.db", "r1", {"c": "3"}))
    records, damaged = Spool(path).scan()
    assert [r["key"] for r in records] == ["a", "c"]
    assert [d.line for d in damaged] == [2]


def test_lines_of_the_previous_version_are_sent(
        tmp_path: Path, run: tuple[MlflowClient, str]):
    client, run_id = run
    path = tmp_path / SPOOL_NAME
    bare = spool.metric_records(client.tracking_uri, run_id, _points(3))
    path.write_text("".join(json.dumps(r) + "\n" for r in bare))
    sent = Spool(path).send()
    assert (sent.metric, sent.damaged) == (3, [])
    assert len(_history(client, run_id)) == 3


def test_a_full_disk_is_a_spool_error_naming_the_file(tmp_path: Path):
    path = tmp_path / SPOOL_NAME
    path.symlink_to("/dev/full")  # every write: ENOSPC
    records = spool.tag_records("sqlite:////x.db", "r1", {"a": "1"})
    with pytest.raises(SpoolError, match=rf"tracking spool {path}: .*\[ENOSPC\] \(the disk "
                                         "is full"):
        Spool(path).append(records)


def test_an_append_cut_short_by_a_full_disk_leaves_the_file_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / SPOOL_NAME
    Spool(path).append(spool.tag_records("sqlite:////x.db", "r1", {"a": "1"}))
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(SpoolError, match="cannot keep 2 tracking records"):
        Spool(path).append(spool.tag_records("sqlite:////x.db", "r1", {"b": "2", "c": "3"}))
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_a_spool_sent_twice_stores_each_point_once(
        tmp_path: Path, run: tuple[MlflowClient, str]):
    client, run_id = run
    path = tmp_path / SPOOL_NAME
    produced = _points(1500) + _points(7, "loss")  # more than one log_batch
    Spool(path).append(spool.metric_records(client.tracking_uri, run_id, produced)
                       + spool.tag_records(client.tracking_uri, run_id, {"t": "1"})
                       + [spool.status_record(client.tracking_uri, run_id, "FINISHED", 9)])
    copy = shutil.copy(path, tmp_path / "copy.jsonl")
    first = Spool(path).send()
    shutil.copy(copy, path)
    second = Spool(path).send()
    assert (first.metric, first.already) == (1507, 0)
    assert (second.metric, second.already, second.tag, second.status) == (0, 1507, 1, 1)
    assert "1507 metric points were already stored: not sent again" in str(second)
    stored = Counter(m.key for key in ("val", "loss")
                     for m in client.get_metric_history(run_id, key))
    assert stored == Counter(p.key for p in produced)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_batch_whose_answer_was_lost_is_not_stored_twice(
        tmp_path: Path, run: tuple[MlflowClient, str], monkeypatch: pytest.MonkeyPatch):
    """The store took the batch but the answer never came: the points are in the store
    and still in the spool; the next send finds them there."""
    client, run_id = run
    path = _spool_of(tmp_path, client, run_id, 3)
    real = MlflowClient.log_batch

    def stored_then_lost(self: MlflowClient, *args, **kwargs) -> None:
        real(self, *args, **kwargs)
        raise MlflowException("API request failed: Read timed out")

    monkeypatch.setattr(MlflowClient, "log_batch", stored_then_lost)
    with pytest.raises(MlflowException):
        Spool(path).send()
    monkeypatch.undo()
    assert len(Spool(path).read()) == 3
    assert Spool(path).send().already == 3
    assert _history(client, run_id) == [(i, i / 10) for i in range(3)]


SECRET_URI = "http://alice:pw-123@mlflow.example:5000/?token=tok-456&x=1"


def test_no_credential_is_kept_and_the_file_is_its_owners_only(tmp_path: Path):
    path = tmp_path / "new-dir" / SPOOL_NAME
    Spool(path).append(spool.metric_records(SECRET_URI, "r1", _points(2))
                       + spool.tag_records(SECRET_URI, "r1", {"a": "1"})
                       + [spool.status_record(SECRET_URI, "r1", "FINISHED", 9)])
    text = path.read_text()
    assert "pw-123" not in text and "tok-456" not in text
    assert {r["uri"] for r in Spool(path).read()} == {"http://alice@mlflow.example:5000/?x=1"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_spool_of_the_previous_version_loses_its_credentials_when_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / SPOOL_NAME
    bare = [{"uri": SECRET_URI, "run_id": "r1", "kind": "tag", "key": "a", "value": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in bare))
    path.chmod(0o644)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(store.STORE_ERRORS):
        Spool(path).send(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    assert "pw-123" not in path.read_text() and len(Spool(path).read()) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_credentials_come_back_from_the_run_s_uri_or_the_environment(
        monkeypatch: pytest.MonkeyPatch):
    recorded = spool.tag_records(SECRET_URI, "r1", {"a": "1"})[0]["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    assert spool.credentialed(recorded) == SECRET_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:other@elsewhere:5000")
    assert spool.credentialed(recorded) == recorded  # another store: its own login
    assert spool.credentialed(recorded, known=(SECRET_URI,)) == SECRET_URI  # the run's own


def test_mlp_sync_prints_no_password_when_the_store_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    from conftest import free_port

    path = tmp_path / SPOOL_NAME
    Spool(path).append(spool.tag_records(SECRET_URI, "r1", {"a": "1"}))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://alice:pw-123@127.0.0.1:{free_port()}"
    assert sync.main([str(path), "--tracking-uri", uri]) == 1
    out, err = capsys.readouterr()
    assert "records left in the file" in err and "alice:***@127.0.0.1" in err
    assert "pw-123" not in out + err
