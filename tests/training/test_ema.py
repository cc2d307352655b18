"""The moving average of the weights: its values by hand, what the trainer evaluates, keeps
and tests with it, its checkpoint (resume equals an uninterrupted run), and a run of
`mlp-train` with every accuracy option on."""

from __future__ import annotations

import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_train
from mlflow import MlflowClient
from test_train import Recorder, make_trainer

from mlp import data as datalib
from mlp.cli import train as cli
from mlp.config import schema as configlib
from mlp.core.model import MLP
from mlp.core.optim import Schedule
from mlp.tracking import keys as metrics
from mlp.training.checkpoint import CheckpointError
from mlp.training.ema import EMA
from mlp.training.trainer import Interrupted, Trainer

splits = test_train.splits  # the fixture: its synthetic splits, made once for this module


def _net(**kwargs) -> MLP:
    return MLP(6, [5], 3, dtype="float64", seed=0, **kwargs)


def _move(model: MLP, rng: np.random.Generator) -> None:
    """Stand-in for an optimizer step: new values for every parameter and buffer."""
    for p in [*model.params.values(), *model.buffers.values()]:
        p[...] = rng.random(p.shape)


def test_the_average_starts_at_the_weights_and_with_decay_0_follows_them():
    net, rng = _net(), np.random.default_rng(0)
    ema = EMA(net, 0.0)
    for name, p in net.params.items():
        np.testing.assert_array_equal(ema.model.params[name], p)
    _move(net, rng)
    ema.update(net, batch=0, last=False)
    for name, p in net.params.items():
        np.testing.assert_array_equal(ema.model.params[name], p)


def test_three_updates_match_a_hand_computation():
    net, rng = _net(norm="batch"), np.random.default_rng(1)
    ema = EMA(net, 0.9)
    want = {name: p.copy() for name, p in net.params.items()}
    for batch in range(3):
        _move(net, rng)
        ema.update(net, batch, last=False)
        for name, p in net.params.items():
            want[name] = 0.9 * want[name] + 0.1 * p
            np.testing.assert_allclose(ema.model.params[name], want[name], rtol=1e-12)
        for name, b in net.buffers.items():  # running statistics are copied, not averaged
            np.testing.assert_array_equal(ema.model.buffers[name], b)


def test_every_k_steps_the_update_uses_decay_to_the_k_and_the_epoch_end_catches_up():
    net, rng = _net(), np.random.default_rng(2)
    ema = EMA(net, 0.9, every=3)
    start = ema.model.params["W1"].copy()
    for batch in range(2):
        _move(net, rng)
        ema.update(net, batch, last=False)
        np.testing.assert_array_equal(ema.model.params["W1"], start)  # not yet
    _move(net, rng)
    ema.update(net, 2, last=False)
    after3 = 0.9**3 * start + (1 - 0.9**3) * net.params["W1"]
    np.testing.assert_allclose(ema.model.params["W1"], after3, rtol=1e-14)
    _move(net, rng)
    ema.update(net, 3, last=True)  # the epoch's last batch: one step since the last update
    np.testing.assert_allclose(ema.model.params["W1"], 0.9 * after3 + 0.1 * net.params["W1"],
                               rtol=1e-14)


def test_an_update_allocates_nothing_of_the_weights_size():
    net = MLP(3072, [256], 10, seed=0)
    ema = EMA(net, 0.99)
    ema.update(net, 0, last=False)  # the chunks' scratch array is made once per thread
    arrays = {name: a for name, a in ema.model.params.items()}
    tracemalloc.start()
    ema.update(net, 1, last=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000  # W1 alone is 3 MB
    assert all(ema.model.params[name] is a for name, a in arrays.items())


def test_ema_every_acts_only_with_an_average():
    flat = configlib.schema_keys()
    assert not configlib.applies("trainer.ema_every", flat)
    assert configlib.applies("trainer.ema_every", flat | {"trainer.ema": 0.999})
    warning = configlib.inactive_overrides(flat, ["trainer.ema_every"])
    assert "it applies when trainer.ema is a decay > 0 (this run: 0.0)" in warning[0]


@pytest.mark.parametrize(("decay", "every"), [(1.0, 1), (-0.1, 1), (0.9, 0)])
def test_impossible_settings_are_refused_by_name(decay, every):
    with pytest.raises(ValueError, match=r"trainer\.ema"):
        EMA(_net(), decay, every)


# -- in the trainer ------------------------------------------------------------------------


def _with_ema(trainer: Trainer, decay: float = 0.8, every: int = 4) -> Trainer:
    """test_train's trainer, with a moving average of its weights."""
    t = trainer
    return Trainer(t.model, t.optimizer, t.schedule, t.splits, t.normalizer,
                   replace(t.s, ema=decay, ema_every=every), t.observers)


def test_the_trainer_evaluates_keeps_and_tests_the_average(splits: datalib.Splits):
    trainer = _with_ema(make_trainer(splits, epochs=1, norm="batch"))
    plain = make_trainer(splits, epochs=1, norm="batch")
    result, reference = trainer.fit(), plain.fit()
    # the same training weights underneath, but another model evaluated
    assert result.history["train_loss"] != reference.history["train_loss"]
    # one epoch: the best is its average, which the model ends with and the test measures
    for name, p in trainer.model.params.items():
        np.testing.assert_array_equal(p, trainer.ema.model.params[name])
    val_loss, val_acc, _ = trainer.evaluate(splits.X_val, splits.y_val, trainer.model)
    assert (val_loss, val_acc) == (result.history["val_loss"][0], result.history["val_acc"][0])
    assert trainer.evaluate(splits.X_test, splits.y_test)[0] == result.test_loss


# 6 batches an epoch, the average updated after the 4th and the 6th: stopped between two
# updates, at the end of the epoch, inside the next one
@pytest.mark.parametrize("stop_at_step", [5, 6, 8])
def test_resume_with_the_average_equals_an_uninterrupted_run(
        splits: datalib.Splits, tmp_path: Path, stop_at_step: int):
    reference = _with_ema(make_trainer(splits, tmp_path / "full", norm="batch", dropout=0.3))
    full = reference.fit()

    first = _with_ema(make_trainer(splits, tmp_path / "cut", norm="batch", dropout=0.3))
    first.observers = [Recorder(stop_at_step=stop_at_step, trainer=first)]
    with pytest.raises(Interrupted) as stopped:
        first.fit()
    second = _with_ema(make_trainer(splits, tmp_path / "cut", norm="batch", dropout=0.3))
    second.load_checkpoint(stopped.value.checkpoint)
    resumed = second.fit()
    for key, values in full.history.items():
        if key not in ("epoch_time", "images_per_sec"):
            assert resumed.history[key] == values, key
    assert resumed.test_loss == full.test_loss and resumed.best_epoch == full.best_epoch
    for ema_state, want in ((second.ema.state_dict(), reference.ema.state_dict()),
                            (second.model.params, reference.model.params)):
        for name, a in ema_state.items():
            np.testing.assert_array_equal(a, want[name])


def test_a_checkpoint_resumes_only_with_the_average_it_was_written_with(
        splits: datalib.Splits, tmp_path: Path):
    trainer = _with_ema(make_trainer(splits, tmp_path, epochs=1))
    trainer.fit()
    with pytest.raises(CheckpointError, match=r"with a moving average .*trainer\.ema.* without"):
        make_trainer(splits, epochs=1).load_checkpoint(trainer.checkpoint_path())
    plain = make_trainer(splits, tmp_path / "plain", epochs=1)
    plain.fit()
    with pytest.raises(CheckpointError, match=r"without a moving average"):
        _with_ema(make_trainer(splits, epochs=1)).load_checkpoint(plain.checkpoint_path())


# -- every option, end to end ------------------------------------------------------------


def test_a_synthetic_run_with_every_accuracy_option_trains(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "mlp-train", "data=synthetic", "data.synthetic.n_train=300", "data.synthetic.n_test=100",
        "data.val_size=60", "model.hidden_sizes=[32]", "trainer.epochs=3",
        "trainer.batch_size=50", "trainer.train_eval_size=100", "trainer.progress=false",
        "optim.lr=0.05", "gradcheck.max_width=8", "gradcheck.num_checks=10",
        "gradcheck.stop_on_fail=true", "tracking.plots=false", "tracking.log_model=false",
        "tracking.system_metrics=false", "model.label_smoothing=0.1", "trainer.ema=0.9",
        "trainer.ema_every=2", "optim.schedule.name=onecycle",
        "optim.schedule.warmup_epochs=1"])
    cli.train_main()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mlp-lab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["gradcheck.passed"] == "true"
    params = run.data.params
    assert (params["model.label_smoothing"], params["trainer.ema"], params["trainer.ema_every"],
            params["optim.schedule.div_factor"]) == ("0.1", "0.9", "2", "25.0")
    # 240 training images in batches of 50: 5 steps an epoch, the peak at step 5
    cycle = Schedule("onecycle", 0.05, steps_per_epoch=5, epochs=3, warmup_epochs=1)
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, metrics.LR)]
    assert lrs == pytest.approx([cycle(4), cycle(9), cycle(14)], rel=1e-12)
    assert max(m.value for m in client.get_metric_history(run.info.run_id, metrics.ACC_VAL)
               ) > 0.2
