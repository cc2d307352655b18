"""A run's figures drawn by the painter process while a sweep's tails are deferred: the
same PNG bytes as drawn here, at the lowest priority, never lost to a painter that dies,
and a figure's own error raised as its own."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from mlp.tracking import deferred, painter

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture
def sweep(monkeypatch):
    """Tails deferred (as in a sweep) with a painter of this test's own."""
    monkeypatch.setattr(deferred, "_pool", None)
    monkeypatch.setattr(deferred, "_pending", [])
    monkeypatch.setattr(painter, "_painter", None)
    monkeypatch.setattr(painter, "_given_up", False)
    monkeypatch.setattr(painter, "_client", None)
    deferred.allow()
    yield
    painter.stop()
    deferred.wait()
    deferred._pool.shutdown()


def _arguments() -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    # A history as a resumed run has it (floats) and as training appends it (float32).
    history = {k: [float(v) for v in np.linspace(0.1, 0.9, 6)]
               for k in ("train_loss", "val_loss", "train_acc", "val_acc")}
    history["val_acc"] = [np.float32(v) for v in history["val_acc"]]
    y_true = rng.integers(0, 10, 500)
    y_pred = np.where(rng.random(500) < 0.5, y_true, rng.integers(0, 10, 500))
    return {"curves": (history,), "glance": (history,),
            "confusion_matrix": (y_true, y_pred, CLASSES),
            "per_class_accuracy": (y_true, y_pred, CLASSES),
            "first_layer_weights": (rng.standard_normal((3072, 20)).astype(np.float32),)}


def test_the_painter_draws_what_would_be_drawn_here_byte_for_byte(sweep):
    arguments = _arguments()
    assert set(arguments) == set(painter.FIGURES)
    for name, args in arguments.items():
        drawn = painter.submit(name, *args, dpi=40).result()
        assert drawn.startswith(b"\x89PNG"), name
        assert drawn == painter.draw(name, list(args), dpi=40), name
    assert painter._painter is not None  # drawn there, not here


def test_the_painter_runs_at_the_lowest_priority_and_outlives_ctrl_c(sweep):
    history = _arguments()["curves"]
    painter.submit("curves", *history, dpi=20).result()
    pid = painter._painter.proc.pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == painter.NICE
    os.kill(pid, signal.SIGINT)  # what Ctrl-C sends the sweep's whole process group
    assert painter.submit("curves", *history, dpi=20).result().startswith(b"\x89PNG")
    assert painter._painter.proc.pid == pid and painter._painter.proc.poll() is None
    painter.stop()
    assert painter._painter is None


def test_a_painter_that_dies_costs_no_figure(sweep, mlp_log):
    history = _arguments()["curves"]
    painter.submit("curves", *history, dpi=20).result()
    proc = painter._painter.proc
    proc.kill()
    proc.wait()
    drawn = painter.submit("curves", *history, dpi=20).result()
    assert drawn == painter.draw("curves", list(history), dpi=20)
    assert "the figure painter stopped" in mlp_log.text
    assert painter._painter is None and painter._given_up  # drawn here from then on
    assert painter.submit("glance", *history, dpi=20).result().startswith(b"\x89PNG")


def test_a_painter_that_does_not_answer_is_stopped(sweep, monkeypatch, mlp_log):
    history = _arguments()["curves"]
    painter.submit("curves", *history, dpi=20).result()
    proc = painter._painter.proc
    monkeypatch.setattr(painter, "ANSWER_WITHIN", 0.5)
    os.kill(proc.pid, signal.SIGSTOP)  # hung
    started = time.monotonic()
    assert painter.submit("curves", *history, dpi=20).result().startswith(b"\x89PNG")
    assert time.monotonic() - started < 10
    assert "no answer within" in mlp_log.text
    assert proc.poll() is not None  # killed, not left behind


def test_a_figures_own_error_is_raised_as_its_own(sweep):
    with pytest.raises(ValueError, match=r"expected first-layer weights \(3072, H\)"):
        painter.submit("first_layer_weights", np.zeros((10, 4), dtype=np.float32)).result()
    assert painter._painter.proc.poll() is None  # the painter goes on


def test_alone_the_figures_are_drawn_here(monkeypatch):
    monkeypatch.setattr(deferred, "_pool", None)
    monkeypatch.setattr(painter, "_painter", None)
    history = _arguments()["curves"]
    drawn = painter.submit("curves", *history, dpi=20)
    assert drawn.done() and drawn.result() == painter.draw("curves", list(history), 20)
    assert painter._painter is None


def test_figures_asked_together_come_back_in_order_while_the_caller_goes_on(sweep):
    arguments = _arguments()
    futures = {name: painter.submit(name, *args, dpi=30) for name, args in arguments.items()}
    for args in arguments.values():  # the caller's arrays change: the figures do not
        for arg in args:
            if isinstance(arg, np.ndarray):
                arg[...] = 0
    for name, future in futures.items():
        assert future.result(timeout=60) == painter.draw(name, list(_arguments()[name]), 30)
    painter.stop()  # waits for what was asked, then ends the painter
    assert painter._painter is None and painter._client is None
