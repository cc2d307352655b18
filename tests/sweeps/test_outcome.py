"""A sweep's outcome from its report's rows: what counts as failed, the parent's status,
its tag and the closing line."""

from __future__ import annotations

from mlp.sweeps.callback import SweepOutcome


def row(run: str, status: str, error: str = "") -> dict:
    return {"run": run, "status": status, "error": error}


def test_all_finished_is_a_finished_parent():
    outcome = SweepOutcome.of([row("lr=1e-2", "FINISHED"), row("lr=3e-2", "FINISHED")])
    assert outcome.ok and outcome.status == "FINISHED"
    assert outcome.tag() == "2 of 2 finished"
    assert outcome.summary() == "mlp-lab: 2 of 2 children finished"


def test_a_failed_child_fails_the_parent_and_is_named_with_its_error():
    outcome = SweepOutcome.of([row("lr=1e-2", "FINISHED"),
                               row("lr=1e6", "FAILED", "training diverged at step 2 (epoch 1)")])
    assert not outcome.ok and outcome.status == "FAILED"
    assert outcome.tag() == "1 of 2 failed"
    assert outcome.summary() == ("mlp-lab: 1 of 2 children failed: lr=1e6: training diverged "
                                 "at step 2 (epoch 1)")


def test_pruned_and_running_jobs_are_not_failures_but_killed_ones_are():
    rows = [row("a", "FINISHED"), row("b", "PRUNED"), row("c", "RUNNING")]
    outcome = SweepOutcome.of(rows)
    assert outcome.ok and outcome.tag() == "1 of 3 finished, 1 pruned, 1 still running"
    killed = SweepOutcome.of([*rows, row("d", "KILLED")])
    assert killed.status == "FAILED" and killed.failed == ["d: killed"]
    assert killed.summary() == "mlp-lab: 1 of 4 children failed: d: killed"


def test_an_outcome_that_could_not_be_read_is_a_failure():
    outcome = SweepOutcome(error="OperationalError: database is locked")
    assert outcome.status == "FAILED"
    assert outcome.summary() == ("mlp-lab: the sweep's outcome could not be read: "
                                 "OperationalError: database is locked")
