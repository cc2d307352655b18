"""The one-cycle schedule: its start, peak and end, its shape, and its keys' checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlp.config import schema as configlib
from mlp.core.optim import Schedule


def _onecycle(**kwargs) -> Schedule:
    return Schedule(**{"name": "onecycle", "lr": 0.1, "steps_per_epoch": 10, "epochs": 10,
                       "warmup_epochs": 3, "min_lr": 1e-4, **kwargs})


def test_onecycle_starts_low_peaks_at_lr_and_ends_at_min_lr():
    s = _onecycle()
    assert s(0) == pytest.approx(0.1 / 25, rel=1e-12)        # lr / div_factor
    assert s(15) == pytest.approx((0.1 / 25 + 0.1) / 2, rel=1e-12)  # half way up
    assert s(30) == pytest.approx(0.1, rel=1e-12)             # peak at warmup_steps
    assert s(65) == pytest.approx((0.1 + 1e-4) / 2, rel=1e-12)  # half way down
    assert s(100) == pytest.approx(1e-4, rel=1e-12)           # after the last update
    assert s(99) == pytest.approx(1e-4 + 0.5 * (0.1 - 1e-4) * (1 + math.cos(math.pi * 69 / 70)))
    assert s(500) == pytest.approx(1e-4, rel=1e-12)


def test_onecycle_rises_and_falls_along_half_cosines():
    s = _onecycle(div_factor=10.0)
    lrs = np.array([s(k) for k in range(101)])
    assert np.all(np.diff(lrs[:31]) > 0) and np.all(np.diff(lrs[30:]) < 0)
    # a cosine rise is flat at both ends: its first and last steps are the smallest
    rise = np.diff(lrs[:31])
    assert rise[0] < rise[14] and rise[-1] < rise[14]
    k = np.arange(31)
    np.testing.assert_allclose(lrs[:31], 0.01 + (0.1 - 0.01) * (1 - np.cos(np.pi * k / 30)) / 2)


def test_onecycle_descends_as_the_cosine_schedule_after_its_warmup():
    one, cos = _onecycle(), _onecycle(name="cosine")
    assert [one(k) for k in range(30, 101)] == [cos(k) for k in range(30, 101)]
    assert cos(0) == pytest.approx(0.1 / 30)  # the cosine schedule's warmup is linear


@pytest.mark.parametrize(("kwargs", "key", "says"), [
    ({"warmup_epochs": 0.0}, "optim.schedule.warmup_epochs", "a number > 0 with"),
    ({"div_factor": 0.5}, "optim.schedule.div_factor", "a finite number >= 1"),
    ({"div_factor": math.inf}, "optim.schedule.div_factor", "a finite number >= 1"),
    ({"warmup_epochs": 10}, "optim.schedule.warmup_epochs", "leaves steps after the warmup"),
])
def test_onecycle_keys_are_checked_by_name(kwargs, key, says):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        _onecycle(**kwargs)
    assert says in str(err.value)


def test_onecycle_keys_act_only_in_a_onecycle_run():
    flat = configlib.schema_keys()
    assert not configlib.applies("optim.schedule.div_factor", flat)
    onecycle = flat | {"optim.schedule.name": "onecycle"}
    assert configlib.applies("optim.schedule.div_factor", onecycle)
    assert configlib.applies("optim.schedule.min_lr", onecycle)
    warning = configlib.inactive_overrides(flat, ["optim.schedule.div_factor"])
    assert "optim.schedule.name is one of ['onecycle']" in warning[0]


def test_a_onecycle_config_needs_its_rise():
    with pytest.raises(ValueError, match=r"optim\.schedule\.warmup_epochs=0\.0 .*onecycle"):
        configlib.validate(configlib.Config(optim=configlib.OptimConfig(
            schedule=configlib.ScheduleConfig(name="onecycle"))))
