"""A run's tail deferred to a helper thread in a sweep's own process, inline otherwise; the
sweep waits for every tail and learns which failed."""

from __future__ import annotations

import threading

import pytest

from mlp.tracking import deferred


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setattr(deferred, "_pool", None)
    monkeypatch.setattr(deferred, "_pending", [])
    deferred.allow()
    yield
    deferred.wait()
    deferred._pool.shutdown()


def test_alone_the_tail_runs_inline_and_its_error_propagates(monkeypatch):
    monkeypatch.setattr(deferred, "_pool", None)
    done = []
    deferred.run(lambda: done.append(threading.current_thread()), "r1", "lr=1e-2")
    assert done == [threading.current_thread()] and not deferred.allowed()

    def fails() -> None:
        raise RuntimeError("the store refused the model")

    with pytest.raises(RuntimeError, match="refused"):
        deferred.run(fails, "r2", "lr=1e-3")


def test_in_a_sweep_the_next_job_goes_on_while_the_tail_records(allowed):
    release, order = threading.Event(), []

    def slow_tail() -> None:
        release.wait()
        order.append(("r1", threading.current_thread()))

    deferred.run(slow_tail, "r1", "lr=1e-2")  # returns with the tail still waiting
    order.append(("next job", threading.current_thread()))
    deferred.run(lambda: order.append(("r2", threading.current_thread())), "r2", "lr=1e-3")
    release.set()
    assert deferred.wait() == {}
    assert [what for what, _ in order] == ["next job", "r1", "r2"]  # tails in job order
    assert order[1][1] is not threading.current_thread()
    assert deferred.wait() == {}  # nothing pending any more


def test_the_sweep_learns_which_tails_failed(allowed, mlp_log):
    def fails() -> None:
        raise OSError("disk full\nsecond line")

    deferred.run(fails, "r1", "lr=1e-2")
    deferred.run(lambda: None, "r2", "lr=1e-3")
    assert deferred.wait() == {"r1": "lr=1e-2: OSError: disk full"}
    assert "run r1 (lr=1e-2): its record failed: OSError" in mlp_log.text
