"""A run's receipt (`mlp.tracking.receipt`): the run counts what it produced, reads the store
back at its end and says `complete` or what is missing where; mlp-sync and the next run
complete it; the sweep and the exit code say so. The store's faults come from a client
whose log_batch fails for the calls chosen (a partial outage: set_tag and the end pass)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.figure
import mlflow.pyfunc
import numpy as np
import pytest
from helpers import migrated_store
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlp.cli import exits, sync
from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.sweeps import callback
from mlp.tracking import glance, keys, plots, receipt, serving, spool, store
from mlp.tracking import recorder as tracking


class _FailingBatches:
    """Makes log_batch fail for the calls whose number (from 1) `fails` says, raising
    `error` (a store's by default); counts the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fails, error: type = MlflowException):
        self.calls, self.fails, self.error = 0, fails, error
        real = MlflowClient.log_batch

        def log_batch(client: MlflowClient, *args, **kwargs):
            self.calls += 1
            if self.fails(self.calls):
                raise self.error("API request to .../runs/log-batch failed: too many 503")
            return real(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def _refuse(monkeypatch: pytest.MonkeyPatch, method: str, failed: str):
    """Make `MlflowClient.<method>` fail as a store that answers `failed` would; returns
    the real method, to put back."""
    real = getattr(MlflowClient, method)

    def refused(*args, **kwargs):
        raise MlflowException(f"API request to {failed}")

    monkeypatch.setattr(MlflowClient, method, refused)
    return real


def _recorder(tmp_path: Path, with_spool: bool = True) -> tracking.RunRecorder:
    client, experiment = store.connect(migrated_store(tmp_path / "mlflow.db"), "receipt")
    return tracking.start_run(client, experiment, "run", {}, log_every_steps=1,
                              spool_path=tmp_path / "ckpt" / spool.SPOOL_NAME
                              if with_spool else None)


def _train(recorder: tracking.RunRecorder, last: int = 4, first: int = 1) -> None:
    """Epochs first..last: one loss/batch point and three epoch points each."""
    for epoch in range(first, last + 1):
        recorder.on_step(epoch * 10, 1.0 / epoch, 0.1)
        recorder.on_epoch(epoch, {"val_acc": epoch / 10, "train_acc": epoch / 8,
                                  "gap_acc": epoch / 40})
        recorder.sink.flush(wait=True)


def _each(n: int) -> dict[str, int]:
    return {"acc/gap": n, "acc/train": n, "acc/val": n, "loss/batch": n}


def _counts(client: MlflowClient, run_id: str) -> dict[str, int]:
    return {k: len(client.get_metric_history(run_id, k))
            for k in client.get_run(run_id).data.metrics}


def test_a_whole_record_is_complete_and_says_what_it_holds(tmp_path: Path):
    recorder = _recorder(tmp_path)
    _train(recorder)
    recorder.finish("FINISHED")
    tags = recorder.client.get_run(recorder.run_id).data.tags
    assert tags[keys.RECORD_TAG] == "complete" and recorder.receipt.complete
    expected = json.loads(tags[keys.RECORD_EXPECTED_TAG])
    assert expected["points"] == _each(4)
    assert expected["points"] == _counts(recorder.client, recorder.run_id)
    assert "mlp.heartbeat" in expected["tags"]


def test_a_partial_outage_ends_finished_with_an_incomplete_receipt_that_mlp_sync_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    recorder = _recorder(tmp_path)
    monkeypatch.setattr(recorder.sink, "RETRY_AFTER", 0.0)
    outage = _FailingBatches(monkeypatch, lambda n: n >= 2)  # the first epoch only passes
    with pytest.warns(UserWarning, match="kept in"):
        _train(recorder)
        recorder.finish("FINISHED")
    client, path = recorder.client, tmp_path / "ckpt" / spool.SPOOL_NAME
    run = client.get_run(recorder.run_id)
    assert run.info.status == "FINISHED"  # how training ended; the record is apart
    assert _counts(client, recorder.run_id) == _each(1)
    # 4 keys x 3 epochs of points; the heartbeat's later values are still in the spool
    assert run.data.tags[keys.RECORD_TAG] == (
        f"incomplete: 12 points, 1 tags, 0 files, 0 models in {path}")
    assert not recorder.receipt.complete
    assert recorder.receipt.sync_command() == f"mlp-sync {path.parent}"

    outage.fails = lambda n: False
    assert sync.main([str(path.parent)]) == 0
    assert f"run {recorder.run_id}: record complete" in capsys.readouterr().out
    assert client.get_run(recorder.run_id).data.tags[keys.RECORD_TAG] == "complete"
    assert _counts(client, recorder.run_id) == _each(4)


def test_files_the_store_refused_make_the_record_incomplete_until_mlp_sync_sends_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Artifacts count in the receipt: a run whose figures the store refused (a proxy
    that takes metrics but not uploads) is not `complete`; the files are kept beside the
    spool, byte for byte, without holding the run's next points back, and mlp-sync sends
    them and completes the record."""
    recorder = _recorder(tmp_path)
    monkeypatch.setattr(recorder.sink, "RETRY_AFTER", 0.0)
    upload = _refuse(monkeypatch, "log_artifacts", ".../mlflow-artifacts/artifacts failed: 403")
    figure = matplotlib.figure.Figure(figsize=(2, 1))
    figure.subplots().plot([1, 2], [3, 4])
    _train(recorder, 2)
    with pytest.warns(UserWarning) as caught:
        recorder.log_files("the parameters", {"model_npz/model.npz": b"weights"})
        recorder.log_png(plots.png(figure), "curves")
        _train(recorder, 4, first=3)  # the files kept do not hold the next points back
        client, path = recorder.client, tmp_path / "ckpt" / spool.SPOOL_NAME
        assert _counts(client, recorder.run_id) == _each(4)
        recorder.finish("FINISHED")
    said = [str(w.message) for w in caught]
    assert re.match(r"the figure plots/curves.png not recorded yet.*kept in "
                    r".*tracking-spool-files", said[1])
    assert "0 metric points, 0 tags, 2 files, 0 models are kept in" in said[-1]
    tags = client.get_run(recorder.run_id).data.tags
    assert tags[keys.RECORD_TAG] == (
        f"incomplete: 0 points, 0 tags, 2 files, 0 models in {path}")
    assert json.loads(tags[keys.RECORD_EXPECTED_TAG])["files"] == [
        "model_npz/model.npz", "plots/curves.png"]
    assert client.list_artifacts(recorder.run_id) == []

    monkeypatch.setattr(MlflowClient, "log_artifacts", upload)
    assert sync.main([str(path.parent)]) == 0
    assert f"run {recorder.run_id}: record complete" in capsys.readouterr().out
    assert client.get_run(recorder.run_id).data.tags[keys.RECORD_TAG] == "complete"
    back = Path(client.download_artifacts(recorder.run_id, "", str(tmp_path / "back")))
    assert (back / "model_npz" / "model.npz").read_bytes() == b"weights"
    assert (back / "plots" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (path.parent / spool.FILES_NAME).exists() or not any(
        (path.parent / spool.FILES_NAME).iterdir())


def test_a_servable_model_the_store_refused_is_kept_and_logged_by_mlp_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The servable model counts in the receipt: kept beside the spool (its data and input
    example) when the store fails, logged by mlp-sync, and then it predicts what the
    trained model does."""
    recorder = _recorder(tmp_path)
    monkeypatch.setattr(recorder.sink, "RETRY_AFTER", 0.0)
    create = _refuse(monkeypatch, "create_logged_model", ".../logged-models failed: 503")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    normalizer = Normalizer("mean_image")
    normalizer.fit(images)
    model = MLP(input_dim=3072, num_classes=10, hidden_sizes=[8], seed=0)
    _train(recorder, 1)
    with pytest.warns(UserWarning) as caught:
        assert recorder.log_model(model, normalizer, tuple("abcdefghij"), "lr=0.1",
                                  example=images[:3]) is None
        recorder.finish("FINISHED")
    said = [str(w.message) for w in caught]
    assert said[0].startswith("the model 'lr_0_1' not recorded yet")
    assert "0 files, 1 models are kept in" in said[-1]
    client, path = recorder.client, tmp_path / "ckpt" / spool.SPOOL_NAME
    assert client.get_run(recorder.run_id).data.tags[keys.RECORD_TAG] == (
        f"incomplete: 0 points, 0 tags, 0 files, 1 models in {path}")

    monkeypatch.setattr(MlflowClient, "create_logged_model", create)
    assert sync.main([str(path.parent)]) == 0
    assert "1 models" in capsys.readouterr().out
    assert client.get_run(recorder.run_id).data.tags[keys.RECORD_TAG] == "complete"
    (logged,) = client.search_logged_models(
        experiment_ids=[client.get_run(recorder.run_id).info.experiment_id])
    assert logged.name == "lr_0_1" and str(logged.status).endswith("READY")
    with store.process_uri(client):
        served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    expected = serving.softmax(model.scores(normalizer(images, np.float64)))
    assert np.allclose(served.predict(images.astype(np.float64)), expected)


def test_a_resumed_run_counts_the_files_an_earlier_attempt_still_keeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An attempt killed with figures kept beside the spool, resumed while uploads still
    fail: the resumed attempt logs no figure itself, yet its record is not complete."""
    first = _recorder(tmp_path)
    staged = tmp_path / "staged" / "plots"
    staged.mkdir(parents=True)
    (staged / "curves.png").write_bytes(b"png")
    first.sink.spool.keep_folder(first.client.tracking_uri, first.run_id, staged.parent,
                                 "files", paths=["plots/curves.png"])
    _refuse(monkeypatch, "log_artifacts", ".../mlflow-artifacts/artifacts failed: 503")
    resumed = tracking.start_run(first.client, first.client.get_run(
        first.run_id).info.experiment_id, "run", {}, run_id=first.run_id,
        spool_path=tmp_path / "ckpt" / spool.SPOOL_NAME)
    _train(resumed, 1)
    with pytest.warns(UserWarning, match="1 files, 0 models are kept"):
        resumed.finish("FINISHED")
    assert resumed.receipt.files == 1 and not resumed.receipt.complete


def test_a_file_missing_from_the_store_is_counted_even_without_an_upload_error(
        tmp_path: Path):
    """The receipt reads the store back: a file the run logged but the store does not
    hold (deleted, or lost by an artifact store that answered) is missing."""
    recorder = _recorder(tmp_path)
    _train(recorder, 1)
    recorder.log_files("the report", {"gradcheck/report.json": "{}", "plots/a.png": b"png"})
    artifacts = Path(recorder.client.get_run(recorder.run_id).info.artifact_uri.removeprefix(
        "file://"))
    (artifacts / "plots" / "a.png").unlink()
    recorder.finish("FINISHED")
    assert recorder.receipt.files == 1 and not recorder.receipt.complete
    assert recorder.client.get_run(recorder.run_id).data.tags[keys.RECORD_TAG].startswith(
        "incomplete: 0 points, 0 tags, 1 files, 0 models in ")


def test_mlp_sync_says_the_sweep_outcome_again_once_its_children_are_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    client, experiment = store.connect(migrated_store(tmp_path / "mlflow.db"), "receipt")
    parent = client.create_run(experiment, run_name="lr_reg",
                               tags={"mlp.sweep": "true"}).info.run_id
    recorder = tracking.start_run(client, experiment, "lr=0.1", {}, log_every_steps=1,
                                  parent_run_id=parent,
                                  spool_path=tmp_path / "ckpt" / spool.SPOOL_NAME)
    monkeypatch.setattr(recorder.sink, "RETRY_AFTER", 0.0)
    outage = _FailingBatches(monkeypatch, lambda n: n >= 2)
    with pytest.warns(UserWarning, match="kept in"):
        _train(recorder)
        recorder.finish("FINISHED")
    client.set_tag(parent, "mlflow.note.content", "Sweep **lr_reg**: the table")
    ended = callback.recheck_outcome(client, parent)  # as the sweep's end records it
    assert ended.tag() == "1 of 1 incomplete"
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert glance.headline(note) == "<b>Outcome: 1 of 1 incomplete</b>: lr=0.1"

    outage.fails = lambda n: False
    assert sync.main([str(tmp_path / "ckpt")]) == 0
    assert f"sweep parent {parent}: 1 of 1 finished" in capsys.readouterr().out
    tags = client.get_run(parent).data.tags
    assert tags[callback.OUTCOME_TAG] == "1 of 1 finished"
    assert tags["mlflow.note.content"] == (glance.slot("<b>Outcome: 1 of 1 finished</b>")
                                           + "\n\nSweep **lr_reg**: the table")  # replaced


def test_a_store_gone_at_the_end_spools_the_receipt_too(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    recorder = _recorder(tmp_path)
    _train(recorder, 1)
    outage = _FailingBatches(monkeypatch, lambda n: True)
    for name in ("set_tag", "set_terminated", "get_run"):
        monkeypatch.setattr(MlflowClient, name, _refusing)
    with pytest.warns(UserWarning) as caught:
        _train(recorder, 2, first=2)
        recorder.finish("FINISHED")
    assert any("and its final status are kept" in str(w.message) for w in caught)
    assert recorder.receipt.answered is False and not recorder.receipt.complete
    kept = spool.Spool(tmp_path / "ckpt" / spool.SPOOL_NAME).read()
    assert [r["key"] for r in kept[-2:]] == [keys.RECORD_EXPECTED_TAG, keys.RECORD_TAG]
    monkeypatch.undo()
    outage.fails = lambda n: False
    assert sync.main([str(tmp_path / "ckpt")]) == 0
    run = recorder.client.get_run(recorder.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[keys.RECORD_TAG] == "complete"


def _refusing(*args, **kwargs):
    raise MlflowException("Max retries exceeded (Connection refused)")


def test_an_unexpected_error_in_the_sender_thread_is_logged_and_spooled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlp_log: pytest.LogCaptureFixture):
    """Not a store error (a bug, a library's own exception): before, it stayed in a future
    nobody read and the batch was lost."""
    recorder = _recorder(tmp_path)
    monkeypatch.setattr(recorder.sink, "RETRY_AFTER", 0.0)
    _FailingBatches(monkeypatch, lambda n: n == 2, error=TypeError)
    with pytest.warns(UserWarning, match="kept in"):
        _train(recorder, 3)
    assert "failed: TypeError" in mlp_log.text
    recorder.finish("FINISHED")  # the spool went out with the next batch
    assert recorder.receipt.complete
    assert _counts(recorder.client, recorder.run_id)["acc/val"] == 3


def test_the_next_run_sends_the_spools_of_incomplete_runs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    recorder = _recorder(tmp_path)
    outage = _FailingBatches(monkeypatch, lambda n: n >= 2)
    with pytest.warns(UserWarning):
        _train(recorder, 2)
        recorder.finish("FINISHED")
    assert not recorder.receipt.complete
    outage.fails = lambda n: False
    experiment = recorder.client.get_run(recorder.run_id).info.experiment_id
    ((run_id, now),) = receipt.repair_incomplete(recorder.client, experiment)
    assert run_id == recorder.run_id and now.complete
    assert receipt.repair_incomplete(recorder.client, experiment) == []  # nothing left


def test_incomplete_exits_4_naming_the_sync_command(capsys: pytest.CaptureFixture):
    kept = receipt.Receipt(3, 1, Path("/runs/a/ckpt/tracking-spool.jsonl"))
    with pytest.raises(SystemExit) as exited:
        exits.incomplete("run abc", kept)
    assert exited.value.code == exits.EXIT_INCOMPLETE == 4
    assert capsys.readouterr().err.strip() == (
        "mlp-lab: run abc trained, but its record is incomplete: 3 points, 1 tags, 0 files, "
        "0 models in "
        "/runs/a/ckpt/tracking-spool.jsonl; send it with: mlp-sync /runs/a/ckpt")


def test_a_sweep_outcome_counts_incomplete_children():
    rows = [{"run": "lr=1e-2", "status": "FINISHED", "record": "complete"},
            {"run": "lr=3e-2", "status": "FINISHED",
             "record": "incomplete: 5 points, 0 tags in /s/x/tracking-spool.jsonl"},
            {"run": "lr=1e-1", "status": "FINISHED", "record": None},  # before receipts
            {"run": "lr=1", "status": "PRUNED", "record": "complete"}]
    outcome = callback.SweepOutcome.of(rows)
    assert outcome.ok and not outcome.complete and outcome.status == "FINISHED"
    assert outcome.tag() == "1 of 4 incomplete"
    assert outcome.sync_commands() == ["mlp-sync /s/x"]
    assert outcome.summary().endswith("send it with: mlp-sync /s/x")
    assert callback.SweepOutcome.of(rows[:1]).complete


def test_a_finished_config_whose_record_is_incomplete_is_repaired_or_trained_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recorder = _recorder(tmp_path)
    recorder.set_tags({keys.CONFIG_HASH_TAG: "abc"})
    outage = _FailingBatches(monkeypatch, lambda n: n >= 2)
    with pytest.warns(UserWarning):
        _train(recorder, 2)
        recorder.log_metrics({keys.ACC_BEST_VAL: 0.2}, step=keys.SUMMARY_STEP)
        recorder.finish("FINISHED")
    client = recorder.client
    experiment = client.get_run(recorder.run_id).info.experiment_id
    path = tmp_path / "ckpt" / spool.SPOOL_NAME
    still_down = callback.earlier_attempts(client, experiment, "abc", None)
    assert still_down == (None, None, None)  # not skipped: trained again
    outage.fails = lambda n: False
    finished, _, _ = callback.earlier_attempts(client, experiment, "abc", None)
    assert finished == pytest.approx(0.2)  # its spool sent: skipped as finished
    assert not path.exists()
    assert client.get_run(recorder.run_id).data.tags[keys.RECORD_TAG] == "complete"
