"""The training loop on synthetic data: learning, determinism, divergence, interrupt/resume."""

from __future__ import annotations

import io
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest

from mlp import data as datalib
from mlp.core import optim
from mlp.core.model import MLP
from mlp.training.checkpoint import CheckpointError
from mlp.training.trainer import (
    DivergenceError,
    Interrupted,
    Trainer,
    TrainSettings,
    train_eval_count,
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> datalib.Splits:
    root = tmp_path_factory.mktemp("train-data")
    archive = datalib.make_synthetic_archive(root / "synthetic.tar.gz", n_train=400, n_test=100)
    raw = datalib.load_cifar10(root, archive, datalib.file_digest(archive), progress=False)
    return datalib.split(raw, val_size=100, seed=0)


def make_trainer(splits: datalib.Splits, tmp: Path | None = None, dtype: str = "float64",
                 epochs: int = 3, lr: float = 0.01, observer=None, name: str = "momentum",
                 pad: int = 2, norm: str | None = None, dropout: float = 0.0) -> Trainer:
    model = MLP(3072, [32], 10, activation="relu", reg=1e-3, dtype=dtype, seed=0, norm=norm,
                dropout=dropout)
    opt = optim.make_optimizer(name, model.params)
    bs = 50
    schedule = optim.Schedule("cosine", lr, steps_per_epoch=math.ceil(len(splits.y_train) / bs),
                              epochs=epochs)
    norm = datalib.Normalizer("channel").fit(splits.X_train)
    settings = TrainSettings(epochs=epochs, batch_size=bs, dtype=dtype, train_eval_size=200,
                             eval_batch_size=64, augment_pad=pad, augment_flip=True,
                             checkpoint_dir=tmp, progress=False, seed=0)
    return Trainer(model, opt, schedule, splits, norm, settings,
                   observers=[observer] if observer else [])


class Recorder:
    def __init__(self, stop_at_step: int | None = None, trainer: Trainer | None = None):
        self.steps: list[tuple[int, float]] = []
        self.epochs: list[tuple[int, dict]] = []
        self.stop_at_step, self.trainer = stop_at_step, trainer

    def on_step(self, step: int, loss: float, lr: float) -> None:
        self.steps.append((step, loss))
        if step == self.stop_at_step:
            self.trainer._signal = signal.SIGTERM  # what the SIGTERM handler does

    def on_epoch(self, epoch: int, metrics: dict) -> None:
        self.epochs.append((epoch, metrics))


def test_the_train_subset_is_as_large_as_validation_unless_set(splits: datalib.Splits):
    assert (len(splits.y_train), len(splits.y_val)) == (300, 100)
    trainer = make_trainer(splits)
    assert len(trainer.train_eval[1]) == 200  # set
    trainer.s.train_eval_size = None
    assert len(Trainer(trainer.model, trainer.optimizer, trainer.schedule, splits,
                       trainer.normalizer, trainer.s).train_eval[1]) == 100  # as validation
    assert train_eval_count(None, 0, 300) == 1 and train_eval_count(None, 500, 300) == 300


def test_training_lowers_the_loss_and_beats_chance(splits: datalib.Splits, tmp_path: Path):
    rec = Recorder()
    result = make_trainer(splits, tmp_path, observer=rec).fit()
    losses = [loss for _, loss in rec.steps]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    assert result.test_acc > 0.3  # 10 classes: chance is 0.1
    assert [e for e, _ in rec.epochs] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "train_acc", "val_acc", "gap_acc", "gap_loss", "lr"):
        assert len(result.history[key]) == 3
    gap = np.subtract(result.history["train_acc"], result.history["val_acc"])
    np.testing.assert_allclose(result.history["gap_acc"], gap)
    assert result.best_val_acc == max(result.history["val_acc"])
    assert result.checkpoint == tmp_path / "last.npz" and result.checkpoint.exists()


def test_health_metrics_are_reported(splits: datalib.Splits):
    rec = Recorder()
    make_trainer(splits, epochs=1, observer=rec).fit()
    metrics = rec.epochs[0][1]
    assert 0 < metrics["health/W1/update_ratio"] < 1
    assert metrics["health/W1/grad_norm"] > 0
    assert 0 <= metrics["health/layer1/dead_frac"] <= 1


def test_same_seed_same_metrics(splits: datalib.Splits):
    a = make_trainer(splits, dtype="float32", epochs=2).fit()
    b = make_trainer(splits, dtype="float32", epochs=2).fit()
    for key in ("train_loss", "val_loss", "val_acc"):
        assert a.history[key] == b.history[key]
    assert a.test_acc == b.test_acc


def test_prefetching_batches_changes_nothing(splits: datalib.Splits):
    # each batch's crop and flip come from its own seeded generator, so preparing it one
    # step ahead on another thread gives the very same training
    ahead = make_trainer(splits, dtype="float32", epochs=2)
    inline = make_trainer(splits, dtype="float32", epochs=2)
    inline.s.prefetch = False
    a, b = ahead.fit(), inline.fit()
    assert a.history["train_loss"] == b.history["train_loss"]
    for name, p in ahead.model.params.items():
        np.testing.assert_array_equal(p, inline.model.params[name])


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 0.0), ("float32", 1e-5)])
@pytest.mark.parametrize("stop_at_step", [3, 8])  # mid-epoch, and right at an epoch's end
def test_interrupt_and_resume_equals_an_uninterrupted_run(
        splits: datalib.Splits, tmp_path: Path, dtype: str, tol: float, stop_at_step: int):
    reference = make_trainer(splits, tmp_path / "full", dtype=dtype)
    full = reference.fit()

    first = make_trainer(splits, tmp_path / "cut", dtype=dtype)
    first.observers = [Recorder(stop_at_step=stop_at_step, trainer=first)]
    with pytest.raises(Interrupted) as stopped:
        first.fit()
    assert stopped.value.checkpoint == tmp_path / "cut" / "last.npz"
    assert stopped.value.signum == signal.SIGTERM

    second = make_trainer(splits, tmp_path / "cut", dtype=dtype)
    second.load_checkpoint(stopped.value.checkpoint)
    resumed = second.fit()
    for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
        np.testing.assert_allclose(resumed.history[key], full.history[key], rtol=tol, atol=tol)
    assert abs(resumed.test_loss - full.test_loss) <= tol
    for name, p in second.model.params.items():
        np.testing.assert_allclose(p, reference.model.params[name], rtol=tol, atol=tol)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_resume_with_norm_and_dropout_is_exact(splits: datalib.Splits, tmp_path: Path,
                                               norm: str):
    reference = make_trainer(splits, tmp_path / "full", norm=norm, dropout=0.3)
    full = reference.fit()
    first = make_trainer(splits, tmp_path / "cut", norm=norm, dropout=0.3)
    first.observers = [Recorder(stop_at_step=5, trainer=first)]
    with pytest.raises(Interrupted) as stopped:
        first.fit()
    second = make_trainer(splits, tmp_path / "cut", norm=norm, dropout=0.3)
    second.load_checkpoint(stopped.value.checkpoint)
    resumed = second.fit()
    assert resumed.history["val_loss"] == full.history["val_loss"]
    assert resumed.test_loss == full.test_loss
    for name, b in second.model.buffers.items():
        np.testing.assert_array_equal(b, reference.model.buffers[name])


def test_divergence_stops_with_a_clear_error(splits: datalib.Splits):
    trainer = make_trainer(splits, lr=1e4, name="sgd")
    with pytest.raises(DivergenceError, match=r"diverged.*optim\.lr"):
        trainer.fit()


def test_early_stopping_uses_patience(splits: datalib.Splits):
    trainer = make_trainer(splits, epochs=30)
    trainer.s.patience = 1
    result = trainer.fit()
    assert result.stopped_early and result.epochs_run < 30


def test_resume_rejects_another_architecture(splits: datalib.Splits, tmp_path: Path):
    make_trainer(splits, tmp_path, epochs=1).fit()
    other = make_trainer(splits, epochs=1)
    other.model = MLP(3072, [16], 10, dtype="float64")
    with pytest.raises(ValueError, match="arch"):
        other.load_checkpoint(tmp_path / "last.npz")


def test_resume_refuses_a_checkpoint_written_by_another_run(splits: datalib.Splits,
                                                           tmp_path: Path):
    written = make_trainer(splits, tmp_path, epochs=1)
    written.meta["run_id"] = "run-a"
    written.fit()
    other = make_trainer(splits, epochs=1)
    before = _trainer_state(other)
    with pytest.raises(CheckpointError, match="written by run run-a, not by run run-b"):
        other.load_checkpoint(tmp_path / "last.npz", run_id="run-b")
    assert _same(_trainer_state(other), before)
    assert other.load_checkpoint(tmp_path / "last.npz", run_id="run-a")["run_id"] == "run-a"


def test_resume_past_the_asked_for_epochs_is_refused(splits: datalib.Splits, tmp_path: Path):
    make_trainer(splits, tmp_path, epochs=3).fit()
    shorter = make_trainer(splits, epochs=2)
    before = _trainer_state(shorter)
    with pytest.raises(CheckpointError, match=r"3 completed epochs, more than "
                                              r"trainer.epochs=2.*at least 3"):
        shorter.load_checkpoint(tmp_path / "last.npz")
    assert _same(_trainer_state(shorter), before)
    make_trainer(splits, epochs=3).load_checkpoint(tmp_path / "last.npz")  # ends at once


def test_resume_of_a_missing_file_is_a_clear_error(splits: datalib.Splits, tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nope\.npz: no such file"):
        make_trainer(splits).load_checkpoint(tmp_path / "nope.npz")


def test_checkpoint_holds_no_pickles(splits: datalib.Splits, tmp_path: Path):
    make_trainer(splits, tmp_path, epochs=1).fit()
    with np.load(tmp_path / "last.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


# -- checkpoints are validated completely before anything changes ---------------------------


@pytest.fixture(scope="module")
def stopped_checkpoint(splits: datalib.Splits, tmp_path_factory: pytest.TempPathFactory
                       ) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint written mid-epoch (so it holds an order)."""
    directory = tmp_path_factory.mktemp("stopped")
    trainer = make_trainer(splits, directory)
    trainer.observers = [Recorder(stop_at_step=3, trainer=trainer)]
    with pytest.raises(Interrupted):
        trainer.fit()
    with np.load(directory / "last.npz") as f:
        return {k: f[k] for k in f.files}


def _with_meta(arrays: dict, **changes: object) -> dict:
    meta = json.loads(str(arrays["meta"]))
    return {**arrays, "meta": np.array(json.dumps({**meta, **changes}))}


def _trainer_state(trainer: Trainer) -> list:
    st = trainer.state
    return [{k: v.copy() for k, v in trainer.model.params.items()},
            {k: v.copy() for k, v in trainer.best_params.items()},
            trainer.optimizer.state_dict(), trainer.normalizer.state_dict(),
            trainer.rng.bit_generator.state, trainer.model.dropout_rng.bit_generator.state,
            (st.epoch, st.step, st.batch, st.first_loss, st.best_val_acc, st.order,
             json.dumps(st.history))]


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


BAD_CHECKPOINTS = {
    "empty": (lambda a: b"", "empty file"),
    "truncated": (lambda a: _npz(a)[:len(_npz(a)) // 2], "not a readable .npz"),
    "random bytes": (lambda a: np.random.default_rng(0).bytes(4096), r"not an \.npz \(zip\)"),
    "meta-less": (lambda a: {k: v for k, v in a.items() if k != "meta"}, "no 'meta' entry"),
    "meta not JSON": (lambda a: {**a, "meta": np.array("{epoch")}, "'meta' is not JSON"),
    "pickle inside": (lambda a: {**a, "order": np.array([{"x": 1}], dtype=object)},
                      "without pickles"),
    "wrong shape": (lambda a: {**a, "param/W1": a["param/W1"][:-1]}, r"param/W1 is .*\(3071, 32\)"),
    "wrong dtype": (lambda a: {**a, "optim/v/W1": a["optim/v/W1"].astype(np.float32)},
                    r"optim/v/W1 is float32"),
    "missing array": (lambda a: {k: v for k, v in a.items() if k != "best/b2"},
                      r"best entries .*missing \['b2'\]"),
    "unexpected array": (lambda a: {**a, "extra/x": np.zeros(1)}, "unexpected entry 'extra/x'"),
    "NaN parameter": (lambda a: {**a, "param/b1": np.full_like(a["param/b1"], np.nan)},
                      "param/b1 holds NaN"),
    "order not a permutation": (lambda a: {**a, "order": np.zeros_like(a["order"])},
                                "not a permutation"),
    "order of floats": (lambda a: {**a, "order": a["order"].astype(np.float64)},
                        "not a permutation"),
    "order missing mid-epoch": (lambda a: {k: v for k, v in a.items() if k != "order"},
                                "no shuffle order"),
    "steps do not add up": (lambda a: _with_meta(a, step=99), "do not add up"),
    "negative epoch": (lambda a: _with_meta(a, epoch=-1), "'epoch' is -1"),
    "epoch as text": (lambda a: _with_meta(a, epoch="0"), "'epoch' is '0'"),
    "history too long": (lambda a: _with_meta(a, history={
        **json.loads(str(a["meta"]))["history"], "val_acc": [0.5]}), "history 'val_acc'"),
    "bad rng state": (lambda a: _with_meta(a, rng={"bit_generator": "PCG64", "state": 3}),
                      "'rng' is not a random generator state"),
    "another optimizer": (lambda a: _with_meta(a, optimizer="adam"), "optimizer 'adam'"),
    "missing meta key": (lambda a: {**a, "meta": np.array(json.dumps({
        k: v for k, v in json.loads(str(a["meta"])).items() if k != "best_epoch"}))},
        r"missing \['best_epoch'\]"),
    "first loss missing": (lambda a: _with_meta(a, first_loss=None), "first_loss None"),
    "optimizer t": (lambda a: {**a, "optim/t": np.array(7)}, "t=7 but meta step 3"),
    "normalizer scale 0": (lambda a: {**a, "norm/scale": np.zeros_like(a["norm/scale"])},
                           "scale > 0"),
    "normalizer mode": (lambda a: {**a, "norm/mode": np.array("mean_image")},
                        "norm/mode is .*'mean_image'.*'channel'"),
}


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_before_anything_changes(
        splits: datalib.Splits, stopped_checkpoint: dict, tmp_path: Path, case: str):
    mutate, message = BAD_CHECKPOINTS[case]
    content = mutate(stopped_checkpoint)
    path = tmp_path / "bad.npz"
    path.write_bytes(content if isinstance(content, bytes) else _npz(content))
    trainer = make_trainer(splits)
    before = _trainer_state(trainer)
    with pytest.raises(CheckpointError, match=message) as refused:
        trainer.load_checkpoint(path)
    assert str(path) in str(refused.value)
    assert isinstance(refused.value, ValueError)
    assert _same(_trainer_state(trainer), before)


def test_the_unchanged_checkpoint_loads(splits: datalib.Splits, stopped_checkpoint: dict,
                                        tmp_path: Path):
    # the cases above fail for their mutation, not for something in the file itself
    path = tmp_path / "good.npz"
    path.write_bytes(_npz(stopped_checkpoint))
    trainer = make_trainer(splits)
    trainer.load_checkpoint(path)
    assert (trainer.state.epoch, trainer.state.step, trainer.state.batch) == (0, 3, 3)


# -- the divergence message names a checkpoint only when one exists -----------------------


def test_divergence_before_the_first_checkpoint_names_none(splits: datalib.Splits,
                                                            tmp_path: Path):
    with pytest.raises(DivergenceError, match="no checkpoint was written") as diverged:
        make_trainer(splits, tmp_path, lr=1e4, name="sgd").fit()
    assert "trainer.resume" not in str(diverged.value)
    assert not (tmp_path / "last.npz").exists()


def test_divergence_without_a_checkpoint_dir_says_so(splits: datalib.Splits):
    with pytest.raises(DivergenceError, match="checkpoint_dir is not set"):
        make_trainer(splits, lr=1e4, name="sgd").fit()


def test_divergence_after_an_epoch_names_its_checkpoint(splits: datalib.Splits,
                                                        tmp_path: Path):
    trainer = make_trainer(splits, tmp_path, epochs=3)
    real_step = trainer._step

    def step(Xb, yb, lr, **kwargs):
        if trainer.state.epoch == 1:
            trainer.model.params["W2"] *= 1e6
        return real_step(Xb, yb, lr, **kwargs)

    trainer._step = step
    with pytest.raises(DivergenceError) as diverged:
        trainer.fit()
    path = tmp_path / "last.npz"
    assert f"the checkpoint after epoch 1, {path}, can be resumed with trainer.resume={path}" in (
        str(diverged.value))
    assert json.loads(str(np.load(path)["meta"]))["epoch"] == 1
